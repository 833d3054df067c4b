"""The testbed's two delayers side by side in one run: the compiled one (delayer.c, the
default) against the Python one (delayer.py), and the bare link without either, on the
same link, at the same packet rates, interleaved:

- accuracy: how late each delayer let its packets go against their due time (its own
  account: mean, p99, max), and the probe's RTT through the delayed link against the
  configured RTT plus the bare link's RTT (the probe's and the echo's own time; on a
  loaded machine the probe's own scheduling shows in it);
- CPU per packet: the delayer's (user space and kernel apart: the kernel part is mostly
  the packet's own path through the stack, which runs when the verdict is given), and
  the link's whole (delayer + echo server + probe client) against the bare link's, so
  that the difference is what delaying costs.

    flock /run/enorm-bench.lock .venv/bin/python -m bench.delayers [--quick]

A namespace `enbdx` (10.86.254.0/30) on a veth link with the near cloud's delay and no
jitter (so every ms above the configured RTT is the emulator's), a UDP echo inside it,
the probe on the host sending on a schedule. Writes bench/results/delayers.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from bench.testbed import cost, delayer, probe
from bench.testbed.cost import process_cpu_s
from bench.testbed.netns import Namespace
from bench.testbed.profiles import Link

RESULTS = Path(__file__).resolve().parent / "results"
LINK = Link("near, no jitter", delay_ms=5.5, jitter_ms=0.0)


IMPLS = ("none", *delayer.IMPLS)


def _self_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)  # the probe client runs in this process
    return r.ru_utime + r.ru_stime


def one(ns: Namespace, echo_pid: int, impl: str, pps: int, seconds: float) -> dict:
    """`seconds` of probes at `pps` each way through the link, delayed by `impl`."""
    if impl != "none":
        ns.shape(LINK, impl=impl)
    try:
        n = int(pps * seconds)
        c0, t0 = ns.counters(), time.monotonic()
        (u0, k0), e0, p0 = cost.DELAYERS.user_sys_s(), process_cpu_s(echo_pid), _self_cpu_s()
        rtts = probe.rtts(ns.ip, 7, n, 1 / pps)
        (u1, k1), e1, p1 = cost.DELAYERS.user_sys_s(), process_cpu_s(echo_pid), _self_cpu_s()
        c1, t1 = ns.counters(), time.monotonic()
    finally:
        if impl != "none":
            ns.unshape()
    late = [x for x in ns.lateness if x] if impl != "none" else []
    n_late = sum(x["packets"] for x in late)
    packets = (c1["rx_packets"] - c0["rx_packets"]) + (c1["tx_packets"] - c0["tx_packets"])
    user, kernel = u1 - u0, k1 - k0
    link = user + kernel + (e1 - e0) + (p1 - p0)
    s = probe.summary(rtts, n)
    per = (lambda x: round(x * 1e6 / packets, 2)) if packets else (lambda x: None)
    return {"impl": impl, "pps_each_way": pps, **{k: round(v, 3) for k, v in s.items()},
            "packets": packets, "delayer_cpu_s": round(user + kernel, 3),
            "delayer_us_per_packet": per(user + kernel), "delayer_user_us_per_packet": per(user),
            "delayer_kernel_us_per_packet": per(kernel), "link_us_per_packet": per(link),
            "delayer_share_of_a_core": round((user + kernel) / (t1 - t0), 4),
            "late_mean_us": round(sum(x["mean_us"] * x["packets"] for x in late) / n_late, 1)
            if n_late else None,
            "late_p99_us": max((x["p99_us"] for x in late), default=None),
            "late_max_us": max((x["max_us"] for x in late), default=None)}  # fmt: skip


def compare(runs: list[dict]) -> list[dict]:
    """Per rate and delayer: RTT and link CPU beyond the bare link's (mean of rounds)."""
    def mean(rs: list[dict], k: str) -> float:
        return sum(r[k] for r in rs) / len(rs)

    out = []
    for pps in sorted({r["pps_each_way"] for r in runs}):
        at = {i: [r for r in runs if r["pps_each_way"] == pps and r["impl"] == i] for i in IMPLS}
        bare_rtt, bare_cpu = mean(at["none"], "mean_ms"), mean(at["none"], "link_us_per_packet")
        for impl in delayer.IMPLS:
            rs = at[impl]
            out.append({
                "impl": impl, "pps_each_way": pps,
                "added_ms": round(mean(rs, "mean_ms") - LINK.rtt_ms - bare_rtt, 3),
                "p99_ms": round(mean(rs, "p99_ms"), 3),
                "late_mean_us": round(mean(rs, "late_mean_us"), 1),
                "late_p99_us": max(r["late_p99_us"] for r in rs),
                "late_max_us": max(r["late_max_us"] for r in rs),
                "delayer_us_per_packet": round(mean(rs, "delayer_us_per_packet"), 2),
                "delayer_user_us_per_packet": round(mean(rs, "delayer_user_us_per_packet"), 2),
                "delaying_us_per_packet": round(mean(rs, "link_us_per_packet") - bare_cpu, 2),
            })  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="two rates, 2 s each, one round")
    ap.add_argument("--rates", nargs="*", type=int, help="packets/s each way")
    ap.add_argument("--seconds", type=float, help="per run (default 5; 2 with --quick)")
    ap.add_argument("--rounds", type=int, help="interleaved rounds (default 2; 1 --quick)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    rates = a.rates or ([500, 2000] if a.quick else [500, 2000, 5000])
    seconds = a.seconds or (2.0 if a.quick else 5.0)
    rounds = a.rounds or (1 if a.quick else 2)
    delayer.binary()  # built before anything is timed
    runs = []
    load0 = os.getloadavg()
    ns = Namespace("enbdx", "10.86.254.0/30", queue_base=8680)
    try:
        ns.open()
        echo = ns.popen(sys.executable, "-m", "bench.testbed.probe", "serve", ns.ip, "7",
                        stdout=subprocess.PIPE, cwd=Path(__file__).resolve().parents[1])
        try:
            echo.stdout.readline()
            for r in range(rounds):
                for pps in rates:
                    for impl in IMPLS if r % 2 == 0 else IMPLS[::-1]:
                        res = one(ns, echo.pid, impl, pps, seconds)
                        runs.append({"round": r, **res})
                        print(f"{impl:6s} {pps:5d} pps each way: RTT mean {res['mean_ms']:.2f} "
                              f"ms, p99 {res['p99_ms']:.2f} ms, {res['received']}/{res['sent']}"
                              f" back; delayer {res['delayer_us_per_packet']} us CPU per packet"
                              f" ({res['delayer_user_us_per_packet']} in user space), link "
                              f"{res['link_us_per_packet']} us", flush=True)
        finally:
            echo.kill()
            echo.wait()
    finally:
        ns.close()
        cost.DELAYERS.close()
    data = {"experiment": "the testbed's delayers, compiled vs Python, one run",
            "link": {"delay_ms": LINK.delay_ms, "jitter_ms": LINK.jitter_ms},
            "seconds": seconds, "loadavg": {"start": load0, "end": os.getloadavg()},
            "compared": compare(runs), "runs": runs}  # fmt: skip
    for c in data["compared"]:
        print(f"{c['impl']:6s} {c['pps_each_way']:5d} pps: packets late by {c['late_mean_us']} us "
              f"(p99 <= {c['late_p99_us']:.0f}, max {c['late_max_us']:.0f}); probe RTT "
              f"{c['added_ms']:+.2f} ms over the configured and bare RTT; delayer "
              f"{c['delayer_us_per_packet']} us/packet "
              f"({c['delayer_user_us_per_packet']} user), delaying costs "
              f"{c['delaying_us_per_packet']} us/packet over the bare link")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "delayers.json").write_text(json.dumps(data, indent=1))
    print(f"wrote {a.out / 'delayers.json'}")


if __name__ == "__main__":
    main()
