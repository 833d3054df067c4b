"""Experiment a on the testbed (paper Figs. 5-6): the provisioning overheads seen by the
cloud manager when the cloud is near (Dublin from Belfast) or far (N. Virginia): the
handshake, the deployment (SSH, upload and start, the users' data copied cloud -> edge,
the server answering, the redirection) and the termination (users back to the cloud, the
edge's merge edge -> cloud, the container destroyed), with one user and with many users
per server. Every call between the cloud manager and the edge node, the SSH session and
both data copies cross the emulated WAN link. Writes bench/results/overheads.json + .png.

    flock /run/enorm-bench.lock .venv/bin/python -m bench.overheads [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from bench.latency import RESULTS
from bench.testbed import WAN, Testbed

DEPLOY = ("handshake", "ssh", "upload_start", "data", "ready", "redirect", "total")
TERMINATE = ("restore", "terminate", "withdraw_total")


def p50(values: list[float]) -> float:
    return round(statistics.median(values), 4)


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["summary"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    labels = [f"{r['wan']}\n{r['users']} users" for r in rows]
    for ax, phase, title in ((axes[0], "total", "deployment (offload) total"),
                             (axes[1], "withdraw_total", "termination total")):  # fmt: skip
        ax.bar(labels, [r["p50_s"][phase] for r in rows], color=[
            "tab:blue" if r["wan"] == "near" else "tab:orange" for r in rows])
        ax.set_title(f"{title}, p50 of {data['runs']}")
        ax.set_ylabel("seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 and 64 users, 2 runs each")
    ap.add_argument("--users", nargs="*", type=int, help="users per server (default 1 64 1024)")
    ap.add_argument("--runs", type=int, help="runs per case (default 5; 2 with --quick)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    sizes = a.users or ([1, 64] if a.quick else [1, 64, 1024])
    runs = a.runs or (2 if a.quick else 5)
    t0 = time.monotonic()
    samples = []
    with Testbed(users_per_node=min(max(sizes), 250)) as bed:
        bed.access("wifi")
        players = bed.players(max(sizes), prefix="overheads")
        for k in range(runs):
            for wan in ("near", "far"):  # interleaved: machine noise hits both alike
                bed.wan(wan)
                for n in sizes:
                    dep = bed.offload([(p.uid, p.src) for p in players[:n]])
                    end = bed.withdraw(dep["server_id"])
                    samples.append({"run": k, "wan": wan, "users": n, "keys": dep["keys"],
                                    "keys_migrated": end["keys_migrated"], "state": end["state"],
                                    "deploy_s": dep["timings"], "terminate_s": end["timings"]})
                    print(f"{wan} {n:5d} users: deploy {dep['timings']['total']:.2f} s, "
                          f"terminate {end['timings']['withdraw_total']:.2f} s", flush=True)
    summary = []
    for wan in ("near", "far"):
        for n in sizes:
            sel = [s for s in samples if s["wan"] == wan and s["users"] == n]
            times = {**{p: p50([s["deploy_s"][p] for s in sel]) for p in DEPLOY},
                     **{p: p50([s["terminate_s"][p] for s in sel]) for p in TERMINATE}}
            summary.append({"wan": wan, "rtt_ms": WAN[wan].rtt_ms, "users": n, "p50_s": times,
                            "all_withdrawn": all(s["state"] == "withdrawn" for s in sel)})
    data = {"experiment": "provisioning overheads near vs far cloud (a, paper Figs. 5-6)",
            "runs": runs, "loadavg_at_end": os.getloadavg(), "wall_s": time.monotonic() - t0,
            "summary": summary, "samples": samples}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "overheads.json").write_text(json.dumps(data, indent=1))
    plot(data, a.out / "overheads.png")
    for r in summary:
        t = r["p50_s"]
        print(f"{r['wan']:4s} {r['users']:5d} users: handshake {t['handshake']:.3f} s, "
              f"deploy {t['total']:.2f} s (data {t['data']:.2f}), "
              f"terminate {t['withdraw_total']:.2f} s")
    print(f"wrote {a.out / 'overheads.json'} in {data['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
