"""CPU calibration: the CFS quota that makes one edge unit as fast as a board's core.

The edge unit on this machine is a share of a server core, which is several times faster
than a single-board computer's. To make the testbed's edge behave like a board, we run a
fixed CPU benchmark (7-Zip's built-in benchmark, single-threaded: `7zz b -mmt1`, the one
sbc-bench publishes for hundreds of boards) in a cgroup with no CPU limit, divide a
board's published per-core rating by ours, and check the result by running the benchmark
again under that quota. Board figures (sbc-bench Results.md, 7-Zip rating over all cores,
divided here by the core count; MIPS):

- Raspberry Pi 3 B+ (Cortex-A53, 4 cores, Raspbian Stretch, http://ix.io/1iI5): 3600 -> 900
- Raspberry Pi 4 B (Cortex-A72 at 1.5 GHz, 4 cores, Buster, http://ix.io/3EgS): 5750 -> 1440

(The paper's ODROID-XU4 has 4 big and 4 small cores; its all-core rating cannot be split
into a per-core figure honestly, and its big cores sit between the two Pi figures.)

    flock /run/enorm-bench.lock python -m bench.calibration [--runs 3]

Writes bench/results/calibration.json (the quota per board, read by `bench.latency
--board`) and calibration.png. The cgroup it makes (enorm-calib-<pid>) is removed at the
end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
from contextlib import contextmanager
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
BOARDS = {  # per-core 7-Zip rating (MIPS) and where it comes from
    "rpi3": {"mips": 3600 / 4, "name": "Raspberry Pi 3 B+", "source": "http://ix.io/1iI5"},
    "rpi4": {"mips": 5750 / 4, "name": "Raspberry Pi 4 B", "source": "http://ix.io/3EgS"},
}
PERIOD_US = 100_000
BENCH = ["7zz", "b", "-mmt1", "-md22"]  # 4 MB dictionary: a small working set, ~10-20 s


def ensure_7zip() -> None:
    if shutil.which("7zz") is None:
        subprocess.run(["apt-get", "install", "-y", "-o", "DPkg::Lock::Timeout=600",
                        "7zip"], check=True, capture_output=True)


@contextmanager
def cgroup():
    """A CPU cgroup of our own (v1 cpu controller, or v2), removed afterwards."""
    name = f"enorm-calib-{os.getpid()}"
    v1 = Path("/sys/fs/cgroup/cpu")
    path = (v1 if (v1 / "cpu.cfs_quota_us").exists() else Path("/sys/fs/cgroup")) / name
    path.mkdir()
    try:
        yield path
    finally:
        path.rmdir()


def set_quota(cg: Path, cores: float | None) -> None:
    if (cg / "cpu.cfs_quota_us").exists():
        (cg / "cpu.cfs_period_us").write_text(str(PERIOD_US))
        (cg / "cpu.cfs_quota_us").write_text(
            "-1" if cores is None else str(round(cores * PERIOD_US)))
    else:
        q = "max" if cores is None else str(round(cores * PERIOD_US))
        (cg / "cpu.max").write_text(f"{q} {PERIOD_US}")


def rating(cg: Path) -> float:
    """One single-threaded 7-Zip benchmark inside `cg`: its total rating in MIPS."""
    procs = cg / ("cgroup.procs")
    out = subprocess.run(["sh", "-c", f"echo $$ > {procs} && exec " + " ".join(BENCH)],
                         capture_output=True, text=True, check=True).stdout
    tot = [ln for ln in out.splitlines() if ln.startswith("Tot:")]
    if not tot:
        raise RuntimeError(f"7zz printed no total:\n{out[-1000:]}")
    return float(re.split(r"\s+", tot[-1].strip())[-1])


def run(runs: int) -> dict:
    ensure_7zip()
    with cgroup() as cg:
        set_quota(cg, None)
        host = [rating(cg) for _ in range(runs)]
        host_mips = statistics.median(host)
        boards = {}
        for key, b in BOARDS.items():
            quota = round(b["mips"] / host_mips, 3)
            set_quota(cg, quota)
            check = [rating(cg) for _ in range(runs)]
            got = statistics.median(check)
            boards[key] = {**b, "quota_cores": quota, "measured_mips": got,
                           "error": round(got / b["mips"] - 1, 3), "runs": check}
    return {"benchmark": " ".join(BENCH), "host_mips": host_mips, "host_runs": host,
            "cfs_period_us": PERIOD_US, "boards": boards, "loadavg": os.getloadavg()}


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = ["this host, one core"]
    vals = [res["host_mips"]]
    for b in res["boards"].values():
        names += [f"{b['name']} (published)", f"unit at {b['quota_cores']} core"]
        vals += [b["mips"], b["measured_mips"]]
    ax.barh(names, vals, color=["#888"] + ["#d98c4a", "#4a90d9"] * len(res["boards"]))
    ax.set_xlabel("7-Zip rating, one thread (MIPS)")
    ax.set_title("CPU calibration of the edge unit", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def quota_for(board: str) -> float:
    """The calibrated unit for `board`, from the last calibration run."""
    res = json.loads((RESULTS / "calibration.json").read_text())
    return res["boards"][board]["quota_cores"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args()
    res = run(a.runs)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "calibration.json").write_text(json.dumps(res, indent=1) + "\n")
    plot(res, a.out / "calibration.png")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
