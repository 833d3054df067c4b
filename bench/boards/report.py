"""The board lab's plot: each figure as a ratio to its floor, per board."""

from __future__ import annotations

from pathlib import Path


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    boards = {a: b for a, b in results["boards"].items()
              if b["figures"].get("onboard") and not b["figures"]["onboard"].get("floor_error")}
    if not boards:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    jobs = [("handshake", "handshake_s", "handshake_floor_s"),
            ("resize", "resize_s", "resize_floor_s"),
            ("termination", "terminate_s", "terminate_floor_s")]
    width = 0.8 / len(boards)
    for i, (arch, b) in enumerate(boards.items()):
        f = b["figures"]["onboard"]
        xs = [j + i * width for j in range(len(jobs))]
        ax1.bar(xs, [f[k] for _, k, _ in jobs], width, label=f"{arch}: enorm")
        ax1.scatter(xs, [f[k] for _, _, k in jobs], marker="_", s=400, color="black",
                    zorder=3, label="floor (bare LXC / cgroup write)" if i == 0 else None)
    ax1.set_yscale("log")
    ax1.set_xticks([j + width * (len(boards) - 1) / 2 for j in range(len(jobs))],
                   [j for j, _, _ in jobs])
    ax1.set_ylabel("seconds (p50, log)")
    ax1.set_title("on the emulated boards (QEMU TCG)")
    ax1.legend(fontsize=8)
    labels = ["daemon idle", "daemon, 8 servers", "bare interpreter"]
    for i, (arch, b) in enumerate(boards.items()):
        f = b["figures"]["onboard"]
        vals = [f["daemon_idle"]["rss_mb"], f["daemon_loaded"]["rss_mb"],
                f["bare_interpreter"]["rss_mb"]]
        ax2.bar([j + i * width for j in range(3)], vals, width, label=arch)
    ax2.axhline(80, color="red", linestyle="--", label="target 80 MB")
    ax2.set_xticks([j + width * (len(boards) - 1) / 2 for j in range(3)], labels)
    ax2.set_ylabel("RSS (MB)")
    ax2.set_title("daemon memory on a 1 GB board")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
