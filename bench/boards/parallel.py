"""The boards side by side: one thread per board, and whether the host has room for it.

A TCG VM keeps about one host core busy (the serial full run of session 7 used 0.87 of
this machine's 2 cores on average), so two boards at once take about the longer board's
time instead of the sum. Each board's thread prepares its disk, wheelhouse and image and
runs its board; what they share is made safe where it lives (`lab.free_block` hands a port
out once per process, `results.Results` writes under a lock, the image cache takes its own
file locks, the wheelhouse's resolver is built under `WHEELHOUSE` here).

Stopping (^C, or SIGTERM turned into it by `__main__`): the main thread stops every live
board's VM (the board's blocking SSH or playbook then returns at once) and raises
KeyboardInterrupt in each board's thread, which unwinds through the board's own cleanup
(`lab.BoardRun.close`: its cloud, its VM, its overlay).
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable
from pathlib import Path

from bench.boards import lab

# What one board takes on the host: the VM's 1 GB, QEMU's own memory (TCG's translation
# cache among it, up to 1 GB) and the board's host side (its cloud tier, ansible-playbook).
# QEMU's RSS reached 1,776 MB (amd64) and 1,720 MB (arm64) in the quick run side by side,
# and 2,362 / 2,348 MB in the full run side by side (session 8).
BOARD_MB = 3072
# The wheelhouse's resolver venv and pip's cache are shared by the architectures.
WHEELHOUSE = threading.Lock()
# How long the boards' threads get to unwind once stopped, before their VMs are removed
# from here.
STOP_GRACE_S = 120.0


def available_mb(meminfo: Path = Path("/proc/meminfo")) -> int:
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) >> 10
    raise RuntimeError(f"no MemAvailable in {meminfo}")


def why_serial(boards: int, *, serial: bool, cores: int, free_mb: int) -> str | None:
    """Why the boards run one after the other, in words; None: side by side."""
    if serial:
        return "--serial"
    if boards < 2:
        return None
    if cores < boards:
        return f"{cores} core(s) for {boards} boards (each VM keeps about one busy)"
    if free_mb < boards * BOARD_MB:
        return (f"{free_mb} MB available, {boards} boards side by side need "
                f"{boards * BOARD_MB} MB ({BOARD_MB} each)")
    return None


def prefixed(arch: str, log: Callable[[str], None]) -> Callable[[str], None]:
    """A board's log: every line says which board (the lab's own lines say it already)."""
    tag = f"[{arch}]"
    return lambda msg: log(msg if msg.startswith(tag) else f"{tag} {msg}")


def _interrupt(thread: threading.Thread) -> None:
    """KeyboardInterrupt raised in `thread` at its next Python instruction."""
    if thread.ident is not None:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident),
                                                   ctypes.py_object(KeyboardInterrupt))


def run(jobs: dict[str, Callable[[], None]], live: dict[str, lab.BoardRun],
        log: Callable[[str], None]) -> None:
    """Each job (a board, by its architecture) in a thread of its own, until all end.
    `live` is filled by the jobs with their board runs as they start (what a stop stops).
    A job's own failure is its business (recorded in the results); ^C stops all.

    The main thread waits on events of its own, not `Thread.join`: a join interrupted by
    ^C can leave the thread it waited for reported as ended while it still runs (CPython
    3.11; seen here: that board's VM was then removed under its feet)."""
    done = {arch: threading.Event() for arch in jobs}

    def body(arch: str) -> None:
        try:
            jobs[arch]()
        except KeyboardInterrupt:  # the stop below raised it: the job has unwound
            pass
        except Exception as exc:  # noqa: BLE001 (the other board goes on)
            log(f"[{arch}] ended by {type(exc).__name__}: {exc}")
        finally:
            done[arch].set()

    threads = {arch: threading.Thread(target=body, args=(arch,), name=f"board-{arch}",
                                      daemon=True) for arch in jobs}
    for t in threads.values():
        t.start()
    try:
        for ev in done.values():
            while not ev.wait(0.5):
                pass
    except KeyboardInterrupt:
        left = [arch for arch, ev in done.items() if not ev.is_set()]
        log(f"stopping the boards ({', '.join(left)})")
        for r in list(live.values()):
            r.vm.stop()
        for arch in left:
            _interrupt(threads[arch])
        deadline = time.monotonic() + STOP_GRACE_S
        for arch in left:
            done[arch].wait(max(0.0, deadline - time.monotonic()))
        for arch in left:  # a thread that did not unwind: its VM at least
            if not done[arch].is_set() and arch in live:
                log(f"[{arch}] did not stop in {STOP_GRACE_S:.0f} s: its VM removed")
                live[arch].vm.remove()
        raise
