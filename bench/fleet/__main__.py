"""The fleet bench: `python -m bench.fleet [--sizes 100 1000 10000] [--users 1000000]`.

Per size: 4 cloud-manager processes on a 3-master cluster with replicas, heartbeats
alone for a phase, then offloads; the largest size also fills the ledger to `--users`
users and times `where`; with `--faults`, during the offloads of every size a master is
killed (kill -9, its replica promoted) and one cloud-manager process half-way (kill -9),
whose orphans the others' reconcile ends (`--orphans-*`; the survivors run until they
are past their bound).
Results: bench/results/fleet.json and fleet.png (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from bench.fleet.run import Run

RESULTS = Path(__file__).resolve().parents[1] / "results"


def one(n: int, a: argparse.Namespace, users: int) -> dict:
    run = Run(n, procs=a.procs, interval_s=a.interval, max_rate=a.max_rate,
              workers=a.workers, churn=a.churn, orphans_interval_s=a.orphans_interval,
              orphans_grace_s=a.orphans_grace, orphans_max_rate=a.orphans_rate,
              lease_s=a.lease, deploy_s=a.deploy).start()
    try:
        warm = run.warm_up(timeout=run.period_s * 3 + 60)
        hb = run.heartbeats(max(a.seconds, run.ttl_s * 1.5 + 5))
        decision = run.decision(rounds=a.decisions)
        off = run.offloads(a.seconds, failover=a.faults, kill_process=a.faults)
        res = {"nodes": n, "processes": a.procs, "warm_up_s": round(warm, 1),
               "heartbeats": hb, "placement_alone": decision,
               "offloads": off, "ledger": run.ledger_check()}
        if users:
            res["ledger_at_scale"] = run.memory_and_where(users)
        print(json.dumps(res), flush=True)
        return res
    finally:
        run.stop()


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = sorted(results, key=lambda r: r["nodes"])
    ns = [r["nodes"] for r in results]
    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    ax[0].plot(ns, [r["heartbeats"]["heartbeat_requests_per_s"] for r in results], "o-",
               label="heartbeat requests/s (total)")
    ax[0].plot(ns, [r["heartbeats"]["redis_ops_per_s"] for r in results], "s-",
               label="Redis ops/s (total)")
    ax[0].set_xscale("log"), ax[0].set_xlabel("simulated nodes"), ax[0].legend()
    # (the offload phase's shares are left out: a promoted replica's count includes the
    # replication stream it applied before, so the phase with a failover overstates it)
    ax[1].plot(ns, [r["heartbeats"]["busiest_master_share"] for r in results], "o-",
               label="heartbeats")
    ax[1].axhline(0.5, color="grey", ls=":")
    ax[1].set_ylim(0, 1), ax[1].set_xscale("log"), ax[1].set_xlabel("simulated nodes")
    ax[1].set_title("busiest master's share of ops"), ax[1].legend()
    for q in ("p50", "p99"):
        ax[2].plot(ns, [r["placement_alone"][f"decision_ms_{q}"] for r in results], "o-",
                   label=f"decision alone (rank, head in memory), {q}")
        if all("rank_read_ms_p50" in r["placement_alone"] for r in results):
            ax[2].plot(ns, [r["placement_alone"][f"rank_read_ms_{q}"] for r in results],
                       "^--", label=f"decision alone (rank read from the cluster), {q}")
        if all("whole_fleet_ms_p50" in r["placement_alone"] for r in results):
            ax[2].plot(ns, [r["placement_alone"][f"whole_fleet_ms_{q}"] for r in results],
                       "x:", label=f"decision alone (whole fleet), {q}")
    ax[2].plot(ns, [r["offloads"]["placement_ms_p50"] for r in results], "s--",
               label="with the probes of 16 nodes, p50")
    ax[2].set_xscale("log"), ax[2].set_yscale("log"), ax[2].set_xlabel("candidates (nodes)")
    ax[2].axhline(50, color="grey", ls=":")
    ax[2].set_title("placement (ms)"), ax[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    ap.add_argument("--users", type=int, default=1_000_000, help="ledger size at the largest")
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--interval", type=float, default=5.0)
    ap.add_argument("--max-rate", type=float, default=200.0)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--churn", type=float, default=0.0)
    ap.add_argument("--faults", action="store_true")
    ap.add_argument("--orphans-interval", type=float, default=5.0,
                    help="the orphans' reconcile in every process (0: none)")
    ap.add_argument("--orphans-grace", type=float, default=5.0)
    ap.add_argument("--lease", type=float, default=8.0,
                    help="an offload in flight's lease (its process renews it): 1.5 times "
                    "the cluster's failover (about 4 s here) at least, to hold through it")
    ap.add_argument("--deploy", type=float, default=0.0,
                    help="seconds each offload is held between its admission and its record "
                    "(the SSH deploy and the data copy's place)")
    ap.add_argument("--orphans-rate", type=float, default=400.0)
    ap.add_argument("--decisions", type=int, default=100,
                    help="placement decisions timed alone, each way")
    ap.add_argument("--out", type=Path, default=RESULTS / "fleet.json")
    a = ap.parse_args()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    for n in a.sizes:  # the file is written after each size: a cut run keeps what it did
        load = os.getloadavg()
        results.append(one(n, a, a.users if n == max(a.sizes) else 0) | {"load_before": load})
        a.out.write_text(json.dumps({
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "settings": vars(a) | {"out": str(a.out)}, "runs": results}, indent=1) + "\n")
        plot(results, a.out.with_suffix(".png"))


if __name__ == "__main__":
    if sys.argv[1:] == ["--plot"]:  # the plot again from the results
        plot(json.loads((RESULTS / "fleet.json").read_text())["runs"], RESULTS / "fleet.png")
    else:
        main()
