"""Fast protection of the basic service: memory headroom watched between rounds.

The paper's auto-scaler looks every 5 minutes; memory pressure from the board's own
service kills things in seconds (kubelet learned this: acting on old figures, the
system OOM came first). So, besides the round, a small loop measures the basic service's
memory every `pressure_interval_s` (the machine's use minus the containers', as the
round does) and, when the memory left for it falls below `pressure_headroom_mb`,
terminates the lowest-priority tenants (data merged back, as always) until the shortfall
is covered, without waiting for the round. It also reads the kernel's pressure stall
information (PSI, /proc/pressure/memory) and records it with each eviction.

`evictions` is the policy (pure); `PressureWatcher` the loop around it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import psutil

from enorm.monitor import free_after
from enorm.protocol import Resources

log = logging.getLogger(__name__)
PSI_MEMORY = Path("/proc/pressure/memory")


class Tenant(Protocol):
    id: str
    priority: int
    created_at: float
    limits: Resources
    state: str


def evictions(servers: Sequence[Tenant], shortfall_mb: float) -> list[str]:
    """Who goes to free `shortfall_mb`: running servers, lowest priority first and, among
    equals, the newest first (it has the least to lose), until their memory covers it."""
    if shortfall_mb <= 0:
        return []
    order = sorted((s for s in servers if s.state == "running"),
                   key=lambda s: (s.priority, -s.created_at))
    out: list[str] = []
    freed = 0
    for s in order:
        if freed >= shortfall_mb:
            break
        out.append(s.id)
        freed += s.limits.memory_mb
    return out


def psi_some_avg10(path: Path = PSI_MEMORY) -> float | None:
    """The share of the last 10 s in which some task stalled on memory (%), if known."""
    try:
        for ln in path.read_text().splitlines():
            if ln.startswith("some "):
                return float(dict(f.split("=") for f in ln.split()[1:])["avg10"])
    except (OSError, KeyError, ValueError):
        return None
    return None


class PressureWatcher:
    """The loop: measure, update the allocator's view of the basic service, evict."""

    def __init__(self, mgr, interval_s: float, headroom_mb: int) -> None:
        self.mgr = mgr
        self.interval_s, self.headroom_mb = interval_s, headroom_mb
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def basic_memory_mb(self) -> int:
        """The machine's memory use outside the node's containers (MB)."""
        vm = psutil.virtual_memory()
        used = (vm.total - vm.available) >> 20
        inside = 0
        for s in self.mgr.store.servers():
            if s.state != "running":
                continue
            try:
                inside += self.mgr.containers.usage(s.container).memory_bytes >> 20
            except Exception:  # noqa: BLE001 (gone meanwhile: it uses nothing)
                continue
        return max(0, used - inside)

    def check(self) -> list[str]:
        """One look; returns the servers it terminated."""
        alloc = self.mgr.allocator
        basic = self.basic_memory_mb()
        alloc.basic = Resources(cores=alloc.basic.cores, memory_mb=basic)
        # Signed: the allocator's own `free` stops at zero, the shortfall must not.
        left = int(free_after(alloc.capacity, alloc.basic, [self.mgr.allocated()],
                              alloc.reserve).memory_mb)
        if left >= self.headroom_mb:
            return []
        victims = evictions(self.mgr.store.servers(), self.headroom_mb - left)
        numbers = {"basic_service_mb": basic, "left_mb": left,
                   "headroom_mb": self.headroom_mb, "psi_some_avg10": psi_some_avg10()}
        done = []
        for sid in victims:
            try:
                self.mgr.terminate(sid, reason="basic_service_pressure", numbers=numbers)
                done.append(sid)
            except Exception as exc:  # noqa: BLE001 (gone already, or merge pending)
                log.warning("pressure eviction of %s: %s", sid, exc)
        return done

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check()
            except Exception:  # the watcher must outlive a bad sample
                log.exception("pressure check")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="enorm-pressure", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
