"""The Resource Allocator: capacity, basic service, allocations, and admission (policy).

free = capacity - max(reserve, basic service) - allocated. The basic service is what the
board's own processes use (the Monitor measures it); the reserve is the floor the
operator keeps for them even when they are quiet. Admission is a pure function so that
the paper's rule and the optional pre-emptive rule can be tested without a node.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from enorm.protocol import RejectReason, Resources

ZERO = Resources(cores=0, memory_mb=0)


def add(a: Resources, b: Resources) -> Resources:
    return Resources(cores=round(a.cores + b.cores, 6), memory_mb=a.memory_mb + b.memory_mb)


def sub(a: Resources, b: Resources) -> Resources:
    """a - b, never below zero."""
    return Resources(
        cores=max(0.0, round(a.cores - b.cores, 6)), memory_mb=max(0, a.memory_mb - b.memory_mb)
    )


def fits(need: Resources, free: Resources) -> bool:
    return need.cores <= free.cores + 1e-9 and need.memory_mb <= free.memory_mb


def total(items: Iterable[Resources]) -> Resources:
    cores, mem = 0.0, 0
    for r in items:
        cores += r.cores
        mem += r.memory_mb
    return Resources(cores=round(cores, 6), memory_mb=mem)


@dataclass
class Allocator:
    """The node's resources; `basic` is updated by the Monitor each round."""

    capacity: Resources
    reserve: Resources
    basic: Resources = field(default_factory=lambda: ZERO)

    def held_back(self) -> Resources:
        """What the basic service keeps: its measured use, at least the reserve."""
        return Resources(
            cores=max(self.reserve.cores, self.basic.cores),
            memory_mb=max(self.reserve.memory_mb, self.basic.memory_mb),
        )

    def free(self, allocated: Resources) -> Resources:
        return sub(sub(self.capacity, self.held_back()), allocated)


@dataclass(frozen=True)
class Tenant:
    """What admission needs to know of a running server."""

    id: str
    priority: int
    limits: Resources
    created_at: float = 0.0


@dataclass(frozen=True)
class Decision:
    admit: bool
    reason: RejectReason | None = None
    detail: str = ""
    evict: tuple[str, ...] = ()


def admit(
    *,
    unit: Resources,
    free: Resources,
    priority: int,
    min_priority: int,
    ports_needed: int,
    ports_free: int,
    tenants: list[Tenant],
    policy: str = "paper",
) -> Decision:
    """Procedure 2's checks, in the paper's order: resources, priority, ports.

    `paper`: admit when a unit fits in the free resources. `preempt`: when it does not,
    evict tenants of lower priority (lowest first, newest first among equals) until it
    fits; if even evicting all of them is not enough, reject for `priority`.
    """
    evict: list[str] = []
    if not fits(unit, free):
        if policy != "preempt":
            return Decision(False, "insufficient_resources",
                            f"needs {unit.cores} cores/{unit.memory_mb} MB, free "
                            f"{free.cores} cores/{free.memory_mb} MB")
        lower = sorted((t for t in tenants if t.priority < priority),
                       key=lambda t: (t.priority, -t.created_at))
        room = free
        for t in lower:
            if fits(unit, room):
                break
            evict.append(t.id)
            room = add(room, t.limits)
        if not fits(unit, room):
            return Decision(False, "insufficient_resources" if not lower else "priority",
                            "not enough resources even after pre-empting every tenant of "
                            f"lower priority than {priority}")
    if priority < min_priority:
        return Decision(False, "priority",
                        f"priority {priority} is below the node's minimum {min_priority}")
    if ports_needed > ports_free:
        return Decision(False, "ports_unavailable",
                        f"needs {ports_needed} host ports, {ports_free} free")
    return Decision(True, evict=tuple(evict))
