"""The results of a board lab run, written to disk as they come, from one thread per board.

Both boards run side by side: each puts its own entries (`boards`, `prepare_s`, keyed by
its architecture) and the file is rewritten whole after each, under one lock, so a run
stopped halfway keeps what every board measured and one board's save never carries a
half-made entry of the other's. The file also says what the host's cores did: the CPU
seconds of the lab and of the processes it waited for (the VMs, the playbooks), beside the
wall time, and the load average at the start and at the last save.
"""

from __future__ import annotations

import json
import os
import resource
import threading
import time
from pathlib import Path


def cpu_seconds() -> dict[str, float]:
    """User and system CPU seconds of this process (all its threads) and of its children
    that ended and were waited for (a VM counts once it is stopped)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return {"user": round(me.ru_utime + kids.ru_utime, 1),
            "system": round(me.ru_stime + kids.ru_stime, 1)}


class Results:
    """One run's results file: `put` an entry of a board, `save` the whole (atomically)."""

    def __init__(self, out: Path, head: dict) -> None:
        self.out = out
        self.data: dict = {**head, "boards": {}, "prepare_s": {},
                           "host": {"cores": os.cpu_count(),
                                    "loadavg_start": list(os.getloadavg())}}
        self._t0 = time.monotonic()
        self._lock = threading.Lock()

    def put(self, section: str, arch: str, entry: dict) -> None:
        """One board's entry in `section` (replacing its earlier one), then saved."""
        with self._lock:
            self.data[section][arch] = entry
            self._save(complete=False)

    def fail(self, arch: str, why: str) -> None:
        """A board that ended early: its entry says so, with the steps it passed kept; a
        failure it recorded itself stays the one it shows."""
        with self._lock:
            entry = self.data["boards"].setdefault(arch, {
                "arch": arch, "facts": {}, "steps_s": {}, "passed": [], "figures": {},
                "failed": None})
            entry["failed"] = entry["failed"] or why
            self._save(complete=False)

    def save(self, complete: bool = False, **extra: object) -> None:
        with self._lock:
            self.data.update(extra)
            self._save(complete)

    def failed(self) -> dict[str, str]:
        """The boards that failed, with what failed."""
        with self._lock:
            return {a: b["failed"] for a, b in self.data["boards"].items() if b["failed"]}

    def _save(self, complete: bool) -> None:
        wall = round(time.monotonic() - self._t0, 1)
        cpu = cpu_seconds()
        self.data["complete"] = complete
        self.data["total_s"] = wall
        self.data["host"].update({
            "cpu_s": cpu, "cores_busy": round((cpu["user"] + cpu["system"]) / wall, 2)
            if wall else None, "loadavg_last": list(os.getloadavg())})
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        tmp.replace(self.out)
