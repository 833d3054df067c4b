"""The Resource Allocator and the one arithmetic of cores and memory on the node.

`Amount` is the only type anything adds, subtracts or compares in: signed (an
over-committed node has negative free resources, and a shortfall must be seen, not
clipped to zero), one epsilon for fractional cores. `protocol.Resources` is what goes on
the wire and into the store (never negative); `Amount.of` and `Amount.resources` are the
two crossings.

free = capacity - max(reserve, basic service) - headroom - allocated: the basic service
is what the board's own processes use (the Monitor measures it); the reserve is the
floor the operator keeps for them even when they are quiet; the headroom is what the
pressure watcher keeps them free to grow into (0 without the watcher), so that nothing
is admitted or scaled up into it only to be ended at the watcher's next look.
Admission is a pure function so that the paper's rule and the optional pre-emptive rule
can be tested without a node.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from enorm.protocol import RejectReason, Resources

EPS = 1e-9


@dataclass(frozen=True)
class Amount:
    """Cores (fractional: a CFS quota) and memory (MB); may be negative."""

    cores: float
    memory_mb: float

    @classmethod
    def of(cls, r: Resources | Amount) -> Amount:
        return r if isinstance(r, Amount) else cls(float(r.cores), float(r.memory_mb))

    def __add__(self, o: Amount) -> Amount:
        return Amount(round(self.cores + o.cores, 6), self.memory_mb + o.memory_mb)

    def __sub__(self, o: Amount) -> Amount:
        return Amount(round(self.cores - o.cores, 6), self.memory_mb - o.memory_mb)

    def covers(self, o: Amount) -> bool:
        """True when `o` fits into self in both dimensions."""
        return self.cores + EPS >= o.cores and self.memory_mb + EPS >= o.memory_mb

    def at_least_zero(self) -> Amount:
        return Amount(max(0.0, self.cores), max(0.0, self.memory_mb))

    def is_zero(self) -> bool:
        return abs(self.cores) <= EPS and abs(self.memory_mb) <= EPS

    def resources(self) -> Resources:
        """As a protocol `Resources` (cores rounded to 1/1000, memory to whole MB, never
        below zero)."""
        return Resources(
            cores=max(0.0, round(self.cores, 3)), memory_mb=max(0, int(round(self.memory_mb)))
        )


ZERO = Amount(0.0, 0.0)
DEFAULT_UNIT = Amount(1.0, 200.0)  # the paper: 1 core, 200 MB


def fits(need: Resources | Amount, room: Resources | Amount) -> bool:
    return Amount.of(room).covers(Amount.of(need))


def total(items: Iterable[Resources | Amount]) -> Amount:
    out = ZERO
    for r in items:
        out = out + Amount.of(r)
    return out


def held_back(reserve: Resources | Amount, basic: Resources | Amount) -> Amount:
    """What the basic service keeps: its measured use, at least the reserve."""
    r, b = Amount.of(reserve), Amount.of(basic)
    return Amount(max(r.cores, b.cores), max(r.memory_mb, b.memory_mb))


def free(capacity: Resources | Amount, reserve: Resources | Amount,
         basic: Resources | Amount, allocated: Resources | Amount) -> Amount:
    """capacity - max(reserve, basic service) - allocated, per dimension; may be < 0."""
    return Amount.of(capacity) - held_back(reserve, basic) - Amount.of(allocated)


@dataclass
class Allocator:
    """The node's resources; `basic` is the Monitor's latest figure of the basic service
    (the rounds and the pressure watcher update it; admission reads it)."""

    capacity: Resources
    reserve: Resources
    basic: Resources = field(default_factory=lambda: Resources(cores=0, memory_mb=0))
    headroom: Resources = field(default_factory=lambda: Resources(cores=0, memory_mb=0))

    def held_back(self) -> Amount:
        return held_back(self.reserve, self.basic) + Amount.of(self.headroom)

    def free(self, allocated: Resources | Amount) -> Amount:
        return Amount.of(self.capacity) - self.held_back() - Amount.of(allocated)


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
    unit: Resources | Amount,
    free: Resources | Amount,
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
    unit, room = Amount.of(unit), Amount.of(free)
    evict: list[str] = []
    if not room.covers(unit):
        if policy != "preempt":
            shown = room.resources()
            return Decision(False, "insufficient_resources",
                            f"needs {unit.cores:g} cores/{unit.memory_mb:g} MB, free "
                            f"{shown.cores} cores/{shown.memory_mb} MB")
        lower = sorted((t for t in tenants if t.priority < priority),
                       key=lambda t: (t.priority, -t.created_at))
        for t in lower:
            if room.covers(unit):
                break
            evict.append(t.id)
            room = room + Amount.of(t.limits)
        if not room.covers(unit):
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
