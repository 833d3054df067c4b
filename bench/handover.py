"""Handover between edge nodes on the testbed (issue 12): users playing without pause
(JMeter-like aggressive clients, each from its own address in the users' namespace) while
the cloud manager moves their server around three nodes (bed0 -> bed1 -> bed2 -> bed0
...), start-first: the new server is started, then
- direct: the old node fences its server and gives the users' keys to the new node
  (node to node: on this testbed the nodes share a host, so that path has no delay), the
  users are sent there, and the old node merges its shared keys home afterwards;
- cloud: the users go to the cloud, the old node fences its server, merges its data back
  and destroys it, the data is copied to the new server and the users are sent there.
Every cloud <-> edge call (and in `cloud` both data copies) crosses the emulated WAN.
Both paths run in the same run, one after the other per WAN link.

Per handover: the manager's own figures (start phase, interruption = from the first call
that touches the old server to the users' redirection: in `cloud` the time the cloud
serves them, in `direct` the time their requests wait), and what the users saw (failed
requests, latency before, during the start phase and around the switch, the slowest
request); at the end, the cloud's keys compared with what it had before the first
offload (none may be missing). Writes bench/results/handover.json + .png.

    flock /run/enorm-bench.lock .venv/bin/python -m bench.handover [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from pathlib import Path

from bench.latency import RESULTS
from bench.load import Load
from bench.testbed import WAN, Testbed
from enorm import datasync


def quantiles(ms: list[float]) -> dict:
    if not ms:
        return {"n": 0}
    q = statistics.quantiles(ms, n=100) if len(ms) > 1 else ms * 99
    return {"n": len(ms), "p50_ms": round(q[49], 1), "p95_ms": round(q[94], 1),
            "max_ms": round(max(ms), 1)}


def window(trace: list, t0: float, t1: float) -> dict:
    """Requests that ended in [t0, t1): their latency and how many failed."""
    sel = [ms for t, ms in trace if t0 <= t < t1]
    ok = [ms for ms in sel if ms is not None]
    return {**quantiles(ok), "errors": len(sel) - len(ok)}


def user_keys(client) -> set[bytes]:
    return {k for k in client.scan_iter(count=1000)}


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 1, figsize=(11, 3.6 * len(runs)), squeeze=False)
    for ax, run in zip(axes[:, 0], runs, strict=True):
        trace = run["trace"]
        t0 = trace[0][0]
        ok = [(t - t0, ms) for t, ms in trace if ms is not None]
        ax.scatter([t for t, _ in ok], [ms for _, ms in ok], s=1, alpha=0.3, label="request")
        bad = [t - t0 for t, ms in trace if ms is None]
        if bad:
            ax.scatter(bad, [1] * len(bad), s=12, color="red", marker="x", label="failed")
        for i, h in enumerate(run["handovers"]):
            ax.axvspan(h["t_call"] - t0, h["t_switch"] - t0, color="tab:green", alpha=0.15,
                       label="new server starting" if i == 0 else None)
            ax.axvspan(h["t_switch"] - t0, h["t_return"] - t0, color="tab:orange", alpha=0.35,
                       label=("users on the cloud" if run["path"] == "cloud" else
                              "switch (data node to node)") if i == 0 else None)
        ax.set_yscale("log")
        ax.set_xlabel("seconds")
        ax.set_ylabel("request latency (ms)")
        ax.set_title(f"{run['users']} users playing through {len(run['handovers'])} "
                     f"{run['path']} handovers ({run['wan']} cloud, RTT "
                     f"{run['wan_rtt_ms']:.0f} ms)")
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def run(bed: Testbed, wan: str, users: int, count: int, gap: float, path: str) -> dict:
    """One load run over `wan` with `count` handovers around the nodes by `path`."""
    bed.wan(wan)
    addrs = bed.edges[0].users.addrs[:users]
    load = Load(bed.edges[0].users.name, bed.cloud_url, addrs, gap * (count + 1) + 2.0,
                "aggressive", trace=True)
    uids = load.start()
    cloud = datasync.connect(f"redis://{bed.cloud_ns.ip}:6379/0")
    before = user_keys(cloud)
    dep = bed.offload(list(zip(uids, addrs, strict=True)))
    out: dict = {}
    start = load.go()
    runner = threading.Thread(target=lambda: out.update(load.run()))
    runner.start()
    handovers, node = [], 0
    for k in range(count):
        time.sleep(max(0.0, start + gap * (k + 1) - time.time()))
        t_call = time.time()
        node = (node + 1) % len(bed.edges)
        new = bed.handover(dep["server_id"], to=f"bed{node}", path=path)
        t_return = time.time()
        handovers.append({
            "from": new["old"]["node"], "to": new["node"], "path": new["path"],
            "t_call": t_call,
            "t_switch": t_return - new["timings"]["interruption"], "t_return": t_return,
            "keys_copied": new["keys"], "old_state": new["old"]["state"],
            "old_confirmed": new["old"]["confirmed"], "keys_merged": new["old"]["keys_migrated"],
            "manager_s": {k: round(v, 4) for k, v in new["timings"].items()},
            # the old node's part of the switch: its merge and end (cloud), or its fence
            # and the keys given to the new node (direct)
            "old_terminate_s": round(new["old"]["timings"].get(
                "terminate" if new["path"] == "cloud" else "handover", 0), 4)})
        print(f"{wan}: {new['path']} handover {k + 1}: {new['old']['node']} -> "
              f"{new['node']} in {new['timings']['total']:.2f} s, switch "
              f"{new['timings']['interruption']:.2f} s", flush=True)
        dep = new
    runner.join()
    end = bed.withdraw(dep["server_id"])
    after = user_keys(cloud)
    cloud.close()
    trace = out.pop("trace")
    for h in handovers:
        h["users_saw"] = {
            "before": window(trace, h["t_call"] - 2.0, h["t_call"]),
            "start_phase": window(trace, h["t_call"], h["t_switch"]),
            "switch": window(trace, h["t_switch"], h["t_return"] + 1.0),
        }
    lost = sorted(k.decode() for k in before - after)
    inter = [h["manager_s"]["interruption"] for h in handovers]
    return {
        "users": users, "wan": wan, "wan_rtt_ms": WAN[wan].rtt_ms, "access": "wifi",
        "path": path,
        "summary": {
            "paths_taken": sorted({h["path"] for h in handovers}),
            "interruption_s": {"p50": round(statistics.median(inter), 3),
                               "max": round(max(inter), 3)},
            "old_terminate_s_p50": round(statistics.median(
                h["old_terminate_s"] for h in handovers), 3),
            "copy_s_p50": round(statistics.median(h["manager_s"]["data"] for h in handovers), 3),
            "total_s_p50": round(statistics.median(h["manager_s"]["total"]
                                                   for h in handovers), 3),
            "requests": out["requests"], "failed_requests": out["errors"],
            "switch_window_max_ms": max(h["users_saw"]["switch"].get("max_ms", 0)
                                        for h in handovers),
            "all_old_confirmed": all(h["old_confirmed"] for h in handovers),
            "keys_before": len(before), "keys_after": len(after), "keys_lost": len(lost),
            "final_withdraw": end["state"],
        },
        "handovers": handovers, "load": out, "keys_lost_sample": lost[:20], "trace": trace,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="16 users, 2 handovers, far cloud")
    ap.add_argument("--users", type=int, help="users of the server (default 64)")
    ap.add_argument("--handovers", type=int, help="per WAN link (default 6)")
    ap.add_argument("--gap", type=float, default=6.0, help="seconds between handovers")
    ap.add_argument("--wan", nargs="*", choices=sorted(WAN), help="default: near far")
    ap.add_argument("--path", nargs="*", choices=("direct", "cloud"),
                    help="default: direct cloud")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    users = a.users or (16 if a.quick else 64)
    count = a.handovers or (2 if a.quick else 6)
    wans = a.wan or (["far"] if a.quick else ["near", "far"])
    wall0 = time.monotonic()
    with Testbed(nodes=3, users_per_node=users) as bed:
        bed.access("wifi")
        runs = [run(bed, wan, users, count, a.gap, path) for wan in wans
                for path in a.path or ("direct", "cloud")]
    data = {"experiment": "handover between three edge nodes under load (issue 12)",
            "runs": [{k: v for k, v in r.items() if k != "trace"} for r in runs],
            "loadavg_at_end": os.getloadavg(), "wall_s": round(time.monotonic() - wall0, 1)}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "handover.json").write_text(json.dumps(data, indent=1))
    plot(runs, a.out / "handover.png")
    for r in runs:
        s = r["summary"]
        print(f"{r['wan']} cloud, {len(r['handovers'])} {r['path']} handovers of "
              f"{r['users']} users: switch p50 {s['interruption_s']['p50']} s "
              f"(max {s['interruption_s']['max']}; old node's part "
              f"{s['old_terminate_s_p50']} s, data {s['copy_s_p50']} s), "
              f"{s['failed_requests']} failed of {s['requests']} requests, slowest around "
              f"a switch {s['switch_window_max_ms']} ms, keys lost {s['keys_lost']}")
    print(f"wrote {a.out / 'handover.json'} in {data['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
