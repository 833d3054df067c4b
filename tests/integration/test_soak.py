"""A short run of bench/soak.py (the full one is `make reliability`): concurrent
handshake/termination cycles and big setup requests leave nothing behind, keep the
daemon's RSS flat and never allocate more than the capacity."""

from __future__ import annotations

import fcntl
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.system
ROOT = Path(__file__).resolve().parents[2]


def test_short_soak_leaves_nothing_and_keeps_memory_flat(tmp_path: Path) -> None:
    # bench/soak.py's names and ports are its own: one soak at a time on this machine
    # (its own lock, so that the suite does not queue behind unrelated benchmarks).
    with open("/run/enorm-bench-soak.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        proc = subprocess.run([sys.executable, "-m", "bench.soak", "--cycles", "24",
                               "--clients", "8", "--big", "4", "--out", str(tmp_path)],
                              cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "soak.json").read_text())
    assert (tmp_path / "soak.png").stat().st_size > 0
    # cycles + warm-up, none failed or refused (bench/soak.py fails the run otherwise)
    assert res["ok"] == 24 + 16 and res["refused"] == res["errors"] == 0
    assert res["leftovers"] == {"containers": [], "directories": [], "veths": [],
                                "forward_rules": [],
                                "records": 0, "ports_held": 0, "mounts": [],
                                "loop_devices": [], "id_claims": []}
    assert 0 < res["handshake_s"]["n"] <= 24  # after the warm-up
    assert res["rss_ratio"] <= 1.10, res
    assert res["samples"] > 0 and res["samples_over_capacity"] == 0
    # After the first big request the RSS steps up by ~30 MB now and then (which worker
    # threads served the bodies) and levels off: 142 -> 203 MB over 10 cycles in the long
    # soak, 140 -> 178 in 4 here once. Before enorm/memory.py it grew by ~30 MB a cycle
    # (160 -> 257 MB, 1.6x, in 4): that must not come back.
    _, first, *rest = res["big_cycles_rss_mb"]
    assert max(rest) <= first * 1.5, res["big_cycles_rss_mb"]
