"""The pressure watch's PSI trigger on this kernel: accepted, and woken by a real stall.

A process in a scratch memory cgroup of 24 MB reads a 40 MB file (on disk, out of the
page cache) over and over: its reads refault pages that the limit just evicted, which the
kernel counts as memory stall (~110 ms a second here), and the node's trigger (100 ms of
stall within 2 s) must wake the control loop's watcher, which runs the pressure look at
once."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from enorm.autoscaler import NodeSnapshot, Snapshot
from enorm.control_loop import ControlLoop
from enorm.pressure import TRIGGER, psi_trigger
from enorm.resources import ZERO

pytestmark = pytest.mark.system

THRASH = r"""
import sys
path = sys.argv[1]
while True:
    with open(path, "rb") as f:
        while f.read(1 << 20):
            pass
"""


def _memory_cgroup(name: str) -> Path:
    v1 = Path("/sys/fs/cgroup/memory")
    root = v1 if v1.is_dir() else Path("/sys/fs/cgroup")
    d = root / name
    d.mkdir(exist_ok=True)
    if (d / "memory.limit_in_bytes").exists():
        (d / "memory.limit_in_bytes").write_text(str(24 << 20))
    else:
        (d / "memory.max").write_text(str(24 << 20))
    return d


def test_the_trigger_is_accepted_and_wakes_on_a_memory_stall(tmp_path):
    fd = psi_trigger()
    assert fd is not None, f"this kernel refused the PSI trigger {TRIGGER!r}"
    data = tmp_path / "big"
    with data.open("wb") as f:
        for _ in range(40):
            f.write(os.urandom(1 << 20))
        f.flush()
        os.fsync(f.fileno())
        # Out of the cache: the thrashing process must read it (and be charged for it).
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    group = _memory_cgroup(f"enorm-psi-test-{os.getpid()}")
    proc = None
    looked = threading.Event()
    loop = ControlLoop(lambda: Snapshot(NodeSnapshot(ZERO), ()), manager=None,
                       interval_s=3600)  # only the trigger's watcher is used here
    try:
        quiet = select.poll()
        quiet.register(fd, select.POLLPRI)
        assert quiet.poll(0) == [], "woken before any stall (a quiet machine expected)"
        loop.wake_on("enorm-pressure", fd, looked.set)  # the loop owns fd from here
        loop.start()
        proc = subprocess.Popen([sys.executable, "-c", THRASH, str(data)],
                                preexec_fn=lambda: (group / "cgroup.procs").write_text(
                                    str(os.getpid())))
        assert looked.wait(20), "the trigger did not wake the watcher within 20 s"
    finally:
        if proc is not None:
            proc.kill()
            proc.wait(10)
        loop.shutdown()  # closes fd
        for _ in range(50):
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)
