"""Experiment c, second half (paper Fig. 9): mixed users on the testbed, edge against the
near cloud, in the paper's three configurations, up to 16,384 users:

- one server, many users: one edge server (one unit) serves 1 .. 16,384 users;
- many servers, one user: 1 .. 8 edge servers on the node, one user each;
- many servers, many users: 8 edge servers sharing 128 .. 16,384 users.

Users follow the mixed JMeter plan (data-intensive and regular requests in equal
numbers, each after the recorded session's think time, about 8.4 s), so 16,384 users
offer about 1,960 requests/s; JMeter multiplexes them onto at most 200 threads in all.
Every run reports the rate offered beside the rate achieved: where they part, the edge
server (or the load generator on the same 2 cores) is saturated, and the latency is that
of a queue. Writes bench/results/mixed.json and mixed.png.

    flock /run/enorm-bench.lock .venv/bin/python -m bench.mixed [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from bench import jmeter
from bench.calibration import BOARDS, quota_for
from bench.latency import RESULTS, measure, report
from bench.testbed import ACCESS, Testbed
from games.pokemon.jmeter.plans import session_think_ms

SERVERS = 8
CONFIGS = {
    # name -> [(servers, users in all), ...]
    "one server, many users": [(1, n) for n in (1, 16, 256, 4096, 16384)],
    "many servers, one user": [(s, s) for s in (1, 2, 4, 8)],
    "many servers, many users": [(SERVERS, n) for n in (128, 2048, 16384)],
}
QUICK = {"many servers, many users": [(2, 256)]}  # few users need long runs: left out


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["config"] for r in data["runs"]))
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        x_of = (lambda r: r["servers"]) if "one user" in name else (lambda r: r["users"])
        for target in ("edge", "near"):
            rs = [r for r in data["runs"] if r["config"] == name and r["target"] == target]
            ax.plot([x_of(r) for r in rs], [r["p50_ms"] for r in rs], "o-", label=f"{target} p50")
            ax.plot([x_of(r) for r in rs], [r["p95_ms"] for r in rs], "x--", alpha=0.6,
                    label=f"{target} p95")  # fmt: skip
        ax.axhline(100, color="grey", lw=0.8, ls=":")
        ax.set_title(f"mixed users: {name}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("edge servers" if "one user" in name else "users in all")
        ax.set_ylabel("latency per request (ms)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _point(spec: str) -> tuple[int, int]:
    servers, users = (int(x) for x in spec.split(":"))
    if not 1 <= servers <= SERVERS or users < servers:
        raise argparse.ArgumentTypeError(f"{spec}: 1..{SERVERS} servers, at least one user each")
    return servers, users


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a reduced set, 8 s per run")
    ap.add_argument("--access", choices=list(ACCESS), default="wifi")
    ap.add_argument("--board", choices=["host", *BOARDS], default="rpi4",
                    help="the edge unit's CPU (see bench.latency)")
    ap.add_argument("--duration", type=float,
                    help="seconds per run (default 30; 8 with --quick), longer where a few "
                         "users would send too few requests in it")
    ap.add_argument("--engine", choices=jmeter.ENGINES, default="wrk",
                    help="load generator (default wrk: a fraction of JMeter's CPU per request, "
                         "see BENCHMARKS.md)")
    ap.add_argument("--points", nargs="*", type=_point, metavar="SERVERS:USERS",
                    help="run only these points (e.g. 1:16384 8:16384)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    unit_cores = 1.0 if a.board == "host" else quota_for(a.board)
    configs = {"chosen points": a.points} if a.points else QUICK if a.quick else CONFIGS
    duration = a.duration or (8.0 if a.quick else 30.0)
    most = max(n for runs in configs.values() for _, n in runs)
    think_s = session_think_ms() / 1000
    min_samples = 4 if a.quick else 12
    runs = []
    t0, load0 = time.monotonic(), os.getloadavg()
    # The node holds the 8 servers of the many-server runs: its capacity is 8 units
    # (CFS quotas are caps, so the 8 share the machine's cores when all are busy).
    with Testbed(users_per_node=250, unit_cores=unit_cores, node_cores=SERVERS * unit_cores,
                 node_memory_mb=SERVERS * 256) as bed:  # fmt: skip
        bed.access(a.access)
        players = bed.players(most, prefix="mixed")
        for name, points in configs.items():
            for servers, users in points:
                for target in ("edge", "near"):
                    # few users send a request every think time: long enough for
                    # `min_samples` of them
                    span = max(duration, min_samples * think_s / users)
                    r = measure(bed, target, players[:users], span, "mixed",
                                servers=servers, engine=a.engine)  # fmt: skip
                    runs.append({"config": name, "access": a.access, **r})
                    report(name, r)
    data = {"experiment": "latency of mixed users (c, paper Fig. 9)", "quick": a.quick,
            "duration_s": duration, "access": a.access,
            "edge_unit": {"board": a.board, "cores": unit_cores},
            "think_ms": round(think_s * 1000), "engine": a.engine,
            "loadavg_at_start": load0, "loadavg_at_end": os.getloadavg(),
            "wall_s": time.monotonic() - t0, "runs": runs}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "mixed.json").write_text(json.dumps(data, indent=1))
    plot(data, a.out / "mixed.png")
    print(f"wrote {a.out / 'mixed.json'} in {data['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
