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
import time
from pathlib import Path

import requests

from bench.calibration import BOARDS, quota_for
from bench.load import Load
from bench.testbed import ACCESS, WAN, Testbed
from bench.testbed import probe as probe_mod

RESULTS = Path(__file__).resolve().parent / "results"


def cloud_requests(bed: Testbed) -> int:
    return requests.get(bed.cloud_url + "/stats", timeout=10).json()["requests"]


def one_run(bed: Testbed, target: str, users: int, duration: float, behaviour: str) -> dict:
    """target: edge (offloaded, WAN near), near or far (cloud only over that WAN)."""
    bed.wan("near" if target == "edge" else target)
    sources = bed.edges[0].users.addrs[:users]
    load = Load(bed.edges[0].users.name, bed.cloud_url, sources, duration, behaviour)
    ids = load.start()
    dep = bed.offload(list(zip(ids, sources, strict=True))) if target == "edge" else None
    c0, r0 = bed.wan_counters(), cloud_requests(bed)
    res = load.run()
    c1, r1 = bed.wan_counters(), cloud_requests(bed)
    if dep:
        bed.withdraw(dep["server_id"])
    res.update(target=target,
               wan_bytes=(c1["rx_bytes"] - c0["rx_bytes"]) + (c1["tx_bytes"] - c0["tx_bytes"]),
               cloud_requests=r1 - r0 - 1)  # the /stats read itself  # fmt: skip
    return res


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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 and 8 users, 3 s per run")
    ap.add_argument("--access", nargs="*", choices=list(ACCESS),
                    help="access profiles (default: all; 4g with --quick)")
    ap.add_argument("--board", choices=["host", *BOARDS], default="rpi4",
                    help="the edge unit's CPU: a board core as calibrated by bench.calibration "
                         "(default rpi4), or a whole host core")
    ap.add_argument("--users", nargs="*", type=int,
                    help="user counts (default: 1 2 4 8 16 32; 1 8 with --quick)")
    ap.add_argument("--duration", type=float, help="seconds per run (default 20; 3 with --quick)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    unit_cores = 1.0 if a.board == "host" else quota_for(a.board)
    users = a.users or ([1, 8] if a.quick else [1, 2, 4, 8, 16, 32])
    duration = a.duration or (3.0 if a.quick else 20.0)
    access = a.access or (["4g"] if a.quick else list(ACCESS))
    runs = []
    t0 = time.monotonic()
    with Testbed(users_per_node=max(users), unit_cores=unit_cores) as bed:
        accuracy = emulator_accuracy(bed, pps=1000)
        for acc in access:
            bed.access(acc)
            for n in users:
                for target in ("edge", "near", "far"):
                    r = one_run(bed, target, n, duration, "aggressive")
                    runs.append({"access": acc, **r})
                    print(f"{acc} {n:3d} users {target:4s}: p50 {r['p50_ms']:.1f} ms, "
                          f"{r['throughput_rps']:.1f} req/s, WAN {r['wan_bytes']} B, "
                          f"cloud requests {r['cloud_requests']}", flush=True)
            for target in ("edge", "near"):
                r = one_run(bed, target, max(users), duration, "mixed")
                runs.append({"access": acc, **r})
    data = {"experiment": "latency (c), edge<->cloud bytes (d) and requests (e)",
            "quick": a.quick, "duration_s": duration,
            "edge_unit": {"board": a.board, "cores": unit_cores}, "loadavg_at_end": os.getloadavg(),
            "wall_s": time.monotonic() - t0, "emulator": accuracy, "runs": runs,
            "note": "taken on a shared 2-core machine loaded by other helpers"}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "latency.json").write_text(json.dumps(data, indent=1))
    plot(data, a.out / "latency.png")
    print(f"wrote {a.out / 'latency.json'} in {data['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
