"""Experiments c, d and e on the testbed: application latency of users served by the edge
against the near and the far cloud, per access profile and number of users (paper Figs.
8-9), with the bytes (on the WAN link's interface counters) and the requests (the cloud
server's counter) that cross between edge and cloud in each run (paper Figs. 10-11).

    flock /run/enorm-bench.lock .venv/bin/python -m bench.latency [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

import requests

from bench import jmeter
from bench.calibration import BOARDS, quota_for
from bench.jmeter import Player
from bench.testbed import ACCESS, WAN, Testbed, cost
from bench.testbed import probe as probe_mod
from bench.testbed.bed import CLOUD_PORT

RESULTS = Path(__file__).resolve().parent / "results"


def cloud_requests(bed: Testbed) -> int:
    return requests.get(bed.cloud_url + "/stats", timeout=10).json()["requests"]


def measure(bed: Testbed, target: str, players: list[Player], duration: float,
            behaviour: str, *, servers: int = 1, engine: str = "jmeter") -> dict:  # fmt: skip
    """One run of the game's JMeter plan `behaviour` from the users' namespace.

    target "edge": the cloud manager offloads the players, split into `servers` groups,
    one edge server each (WAN near; the cloud still gets the edge servers' pushes);
    "near" / "far": every player stays on the cloud over that WAN. The same `servers`
    load-generator processes run either way, so the generator's own cost is alike.
    Returns the latency of the HTTP samples (ramp-up left out), the rates, the bytes
    (the WAN link's counters) and requests (the cloud's counter) in the load's window,
    and what each part cost over the load's whole run (`cost`: testbed/cost.py)."""
    bed.wan("near" if target == "edge" else target)
    groups = [players[k::servers] for k in range(servers)]
    deps = []
    try:
        if target == "edge":
            for g in groups:
                deps.append(bed.offload([(p.uid, p.src) for p in g]))
            ends = [urlsplit(d["url"]) for d in deps]
            ends = [(u.hostname, u.port) for u in ends]
        else:
            ends = [(bed.cloud_ns.ip, CLOUD_PORT)] * servers
        if engine != "jmeter":  # only JMeter binds per-user source addresses
            groups = [[replace(p, src="") for p in g] for g in groups]
        warmup = max(2.0, min(5.0, duration / 10))
        with tempfile.TemporaryDirectory(prefix="enbd-jtl-") as tmp:
            def one(k: int) -> jmeter.Result:
                host, port = ends[k]
                return jmeter.run(behaviour, host, port, len(groups[k]), duration + warmup,
                                  players=groups[k], engine=engine, netns=bed.edges[0].users.name,
                                  max_threads=max(1, jmeter.MAX_THREADS // servers),
                                  rampup=warmup, out_dir=Path(tmp) / str(k),
                                  launcher=cost.GENERATOR.open().launcher())  # fmt: skip

            c0, r0 = bed.wan_counters(), cloud_requests(bed)
            s0 = bed.cost_sample()
            with ThreadPoolExecutor(servers) as pool:
                parts = list(pool.map(one, range(servers)))
            s1 = bed.cost_sample()
            c1, r1 = bed.wan_counters(), cloud_requests(bed)
            res = jmeter.parse_jtl(
                jmeter.join_jtl([Path(r.jtl) for r in parts], Path(tmp) / "all.jtl", warmup),
                plan=behaviour, users=len(players))
    finally:
        for d in deps:
            bed.withdraw(d["server_id"])
    targets = [r.target_rate for r in parts if r.target_rate]
    spent = cost.between(s0, s1, requests=sum(r.requests for r in parts))
    return {
        "target": target, "behaviour": behaviour, "users": len(players), "servers": servers,
        "engine": engine, "threads": sum(r.threads for r in parts), "duration_s": res.duration_s,
        "requests": res.requests, "errors": res.errors, "error_codes": res.error_codes,
        "throughput_rps": res.throughput, "achieved_rps": res.achieved_rate,
        "offered_rps": round(sum(targets), 1) if targets else None,
        "p50_ms": res.p50, "p95_ms": res.p95, "p99_ms": res.p99, "mean_ms": res.mean,
        "client_cpu_s": spent["cpu_s"]["generator"],
        "cost": spent,
        "wan_bytes": (c1["rx_bytes"] - c0["rx_bytes"]) + (c1["tx_bytes"] - c0["tx_bytes"]),
        "wan_packets": (c1["rx_packets"] - c0["rx_packets"])
        + (c1["tx_packets"] - c0["tx_packets"]),
        "cloud_requests": r1 - r0 - 1,  # the /stats read itself
    }  # fmt: skip


def emulator_accuracy(bed: Testbed, pps: float) -> list[dict]:
    """Probe RTT through each profile against the configured RTT, at a low rate and at
    `pps` (about the highest packet rate of the runs)."""
    ns = bed.cloud_ns
    echo = ns.popen(sys.executable, "-m", "bench.testbed.probe", "serve", ns.ip, "7",
                    stdout=subprocess.PIPE, cwd=Path(__file__).resolve().parents[1])
    echo.stdout.readline()
    out = []
    try:
        for name, link in WAN.items():
            bed.wan(link)
            for rate in (20, pps):
                n = int(min(2000, rate * 2))
                s = probe_mod.summary(probe_mod.rtts(ns.ip, 7, n, 1 / rate), n)
                out.append({"profile": name, "configured_rtt_ms": link.rtt_ms,
                            "configured_jitter_ms": link.jitter_ms, "pps": rate, **s,
                            "added_ms": s["mean_ms"] - link.rtt_ms})
    finally:
        echo.kill()
        echo.wait()
    return out


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    profiles = sorted({r["access"] for r in data["runs"]})
    fig, axes = plt.subplots(1, len(profiles), figsize=(5 * len(profiles), 4), squeeze=False)
    for ax, acc in zip(axes[0], profiles, strict=True):
        for target in ("edge", "near", "far"):
            rs = [r for r in data["runs"] if r["access"] == acc and r["target"] == target
                  and r["behaviour"] == "aggressive"]
            ax.plot([r["users"] for r in rs], [r["p50_ms"] for r in rs], "o-", label=target)
        ax.set_title(f"aggressive users, access {acc}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("users on one server")
        ax.set_ylabel("median latency per request pair (ms)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def report(label: str, r: dict) -> None:
    print(f"{label} {r['behaviour']:10s} {r['users']:5d} users on {r['servers']} "
          f"{r['target']:4s}: p50 {r['p50_ms']:.0f} ms p95 {r['p95_ms']:.0f} ms, "
          f"{r['achieved_rps']:.1f} req/s (offered {r['offered_rps']}), {r['errors']} errors, "
          f"WAN {r['wan_bytes']} B, cloud requests {r['cloud_requests']}", flush=True)
    print(cost.summary(r["cost"]), flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 and 8 users, 3 s per run")
    ap.add_argument("--access", nargs="*", choices=list(ACCESS),
                    help="access profiles (default: all; 4g with --quick)")
    ap.add_argument("--board", choices=["host", *BOARDS], default="rpi4",
                    help="the edge unit's CPU: a board core as calibrated by bench.calibration "
                         "(default rpi4), or a whole host core")
    ap.add_argument("--users", nargs="*", type=int,
                    help="user counts (default: 1 2 4 8 16 32 64; 1 8 with --quick)")
    ap.add_argument("--duration", type=float, help="seconds per run (default 20; 3 with --quick)")
    ap.add_argument("--engine", choices=jmeter.ENGINES, default="jmeter",
                    help="load generator: JMeter (default) or Locust, the same plans")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    unit_cores = 1.0 if a.board == "host" else quota_for(a.board)
    users = a.users or ([1, 8] if a.quick else [1, 2, 4, 8, 16, 32, 64])
    duration = a.duration or (3.0 if a.quick else 20.0)
    access = a.access or (["4g"] if a.quick else list(ACCESS))
    runs = []
    t0, load0 = time.monotonic(), os.getloadavg()
    with Testbed(users_per_node=min(max(users), 250), unit_cores=unit_cores) as bed:
        # the busiest runs cross the WAN link at about 2,000 packets/s each way
        accuracy = emulator_accuracy(bed, pps=2000)
        players = bed.players(max(users))
        for acc in access:
            bed.access(acc)
            for n in users:
                for target in ("edge", "near", "far"):
                    r = measure(bed, target, players[:n], duration, "aggressive", engine=a.engine)
                    runs.append({"access": acc, **r})
                    report(acc, r)
            for target in ("edge", "near"):
                r = measure(bed, target, players, duration, "mixed", engine=a.engine)
                runs.append({"access": acc, **r})
                report(acc, r)
    data = {"experiment": "latency (c), edge<->cloud bytes (d) and requests (e)",
            "quick": a.quick, "duration_s": duration,
            "edge_unit": {"board": a.board, "cores": unit_cores},
            "loadavg_at_start": load0, "loadavg_at_end": os.getloadavg(),
            "wall_s": time.monotonic() - t0, "emulator": accuracy, "runs": runs,
            "engine": a.engine}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "latency.json").write_text(json.dumps(data, indent=1))
    plot(data, a.out / "latency.png")
    print(f"wrote {a.out / 'latency.json'} in {data['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
