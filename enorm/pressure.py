"""Fast protection of the basic service: memory headroom watched between rounds.

The paper's auto-scaler looks every 5 minutes; memory pressure from the board's own
service kills things in seconds (kubelet learned this: acting on old figures, the
system OOM came first). So, besides the round, a small loop measures the basic service's
memory every `pressure_interval_s` (the machine's use minus the containers', as the
round does) and, when the memory left for it falls below `pressure_headroom_mb`,
terminates the lowest-priority tenants (data merged back, as always) until the shortfall
is covered, without waiting for the round. It also reads the kernel's pressure stall
information (PSI, /proc/pressure/memory) and records it with each eviction, and, where
the kernel accepts a PSI trigger, looks at once when tasks start stalling on memory
instead of waiting for the next poll.

`evictions` is the policy (pure); the control loop's `protect_basic_service` runs it.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from enorm.protocol import Resources

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


# 100 ms of stall within 2 s. The window is a multiple of 2 s: without CAP_SYS_RESOURCE
# (a container, a sandbox) the kernel refuses any other (EINVAL).
TRIGGER = "some 100000 2000000"


def psi_trigger(path: Path = PSI_MEMORY, trigger: str = TRIGGER) -> int | None:
    """A descriptor that `poll` wakes (POLLPRI) when the trigger's stall is reached; None
    where the kernel has no PSI or refuses the trigger (the node then only polls)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        os.write(fd, trigger.encode() + b"\0")
    except OSError as exc:
        os.close(fd)
        if exc.errno not in (errno.EINVAL, errno.EPERM, errno.EOPNOTSUPP, errno.EACCES):
            raise
        return None
    return fd
