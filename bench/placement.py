"""Scored placement against first-fit on the testbed (issue 12): three edge nodes at
different distances from one group of users and with different room, the cloud manager
choosing where the group's server goes, and the users' latency measured where it went.

The nodes (0.5-core units, three per node): bed0 is the first in the configured order
and the farthest from the users (+12 ms each way on top of their Wi-Fi access link),
bed1 the nearest but holding two other tenants (one unit left), bed2 in between (+4 ms).
Each node probes the users itself from its own address (`probe_source`), so each sees
its own distance. Per round, interleaved: the group offloaded to each node in turn (the
best node is the one where the users measure the lowest p50), then by `first` and by
`scored`; every time the same 8 aggressive users play for a while (few enough that the
path, not the server's queue, sets their latency) and the server is withdrawn. The
nodes share one host, so their load average is the same: load differs here only as room
(free units). Writes bench/results/placement.json + .png.

    flock /run/enorm-bench.lock .venv/bin/python -m bench.placement [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from bench.latency import RESULTS
from bench.load import Load
from bench.testbed import Testbed

EXTRA_MS = {0: 12.0, 1: 0.0, 2: 4.0}  # one way, from the users of namespace 0
FILLERS = 2  # other tenants on bed1


def play(bed: Testbed, users: int, seconds: float, **where) -> dict:
    """The group offloaded (`placement` / `exclude`), played on, withdrawn."""
    addrs = bed.edges[0].users.addrs[:users]
    load = Load(bed.edges[0].users.name, bed.cloud_url, addrs, seconds, "aggressive")
    uids = load.start()
    dep = bed.offload(list(zip(uids, addrs, strict=True)), **where)
    res = load.run()
    bed.withdraw(dep["server_id"])
    return {"node": dep["node"], "placement": dep["placement"], "p50_ms": res["p50_ms"],
            "p95_ms": res["p95_ms"], "requests": res["requests"], "errors": res["errors"]}


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = data["summary"]
    labels = [*s["per_node_p50_ms"], "first", "scored"]
    values = [*s["per_node_p50_ms"].values(), s["first"]["p50_ms"], s["scored"]["p50_ms"]]
    colors = ["tab:gray"] * len(s["per_node_p50_ms"]) + ["tab:orange", "tab:blue"]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(labels, values, color=colors)
    ax.axhline(s["best_p50_ms"] * 1.1, color="k", ls=":", label="best node + 10%")
    ax.set_ylabel("users' p50 latency (ms)")
    ax.set_title(f"{data['users']} aggressive users: where each placement put them "
                 f"(p50 of {data['rounds']} rounds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 round of 4 s")
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--rounds", type=int, help="default 3")
    ap.add_argument("--seconds", type=float, help="play per placement (default 6)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    rounds = a.rounds or (1 if a.quick else 3)
    seconds = a.seconds or (4.0 if a.quick else 6.0)
    wall0 = time.monotonic()
    nodes = [f"bed{k}" for k in EXTRA_MS]
    runs: list[dict] = []
    with Testbed(nodes=3, users_per_node=max(a.users, 8), node_cores=1.5,
                 unit_cores=0.5) as bed:  # fmt: skip
        bed.access("wifi")
        bed.wan("near")
        bed.distances(EXTRA_MS)
        fill = bed.players(FILLERS * 4, prefix="filler")
        for i in range(FILLERS):
            bed.offload([(p.uid, p.src) for p in fill[4 * i: 4 * i + 4]],
                        exclude=["bed0", "bed2"])
        for r in range(rounds):
            for node in nodes:
                out = play(bed, a.users, seconds, exclude=[n for n in nodes if n != node])
                runs.append({"round": r, "case": node, **out})
            for policy in ("first", "scored"):
                out = play(bed, a.users, seconds, placement=policy)
                runs.append({"round": r, "case": policy, **out})
                print(f"round {r}: {policy} -> {out['node']}: p50 {out['p50_ms']:.1f} ms",
                      flush=True)

    def p50(case: str) -> float:
        return round(statistics.median(x["p50_ms"] for x in runs if x["case"] == case), 1)

    per_node = {n: p50(n) for n in nodes}
    best = min(per_node, key=per_node.get)
    summary = {
        "per_node_p50_ms": per_node, "best_node": best, "best_p50_ms": per_node[best],
        **{pol: {"nodes": sorted({x["node"] for x in runs if x["case"] == pol}),
                 "p50_ms": p50(pol),
                 "vs_best": round(p50(pol) / per_node[best], 3)}
           for pol in ("first", "scored")},
        "errors": sum(x["errors"] for x in runs),
        "probe_ms": next(x["placement"]["nodes"] for x in runs if x["case"] == "scored"),
    }
    data = {"experiment": "scored placement vs first-fit on three testbed nodes (issue 12)",
            "users": a.users, "rounds": rounds, "seconds": seconds, "extra_one_way_ms": EXTRA_MS,
            "fillers_on_bed1": FILLERS, "summary": summary, "runs": runs,
            "loadavg_at_end": os.getloadavg(), "wall_s": round(time.monotonic() - wall0, 1)}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "placement.json").write_text(json.dumps(data, indent=1))
    plot(data, a.out / "placement.png")
    print("users' p50 per node: " + ", ".join(f"{n} {v} ms" for n, v in per_node.items()))
    for pol in ("first", "scored"):
        s = summary[pol]
        print(f"{pol}: {'/'.join(s['nodes'])}, p50 {s['p50_ms']} ms "
              f"({s['vs_best']}x the best node, {best})")
    print(f"wrote {a.out / 'placement.json'} in {data['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
