"""Where a group of users goes: the order in which the cloud manager asks edge nodes.

`first` is the paper's (and the old) rule: the configured order, the next node on a 409.
`scored` orders the nodes by a cost, lowest first, from what each node reports:

    cost = latency_weight * latency_ms            (users -> node, the node's own probe;
                                                    unknown: `unknown_latency_ms`)
         + load_weight * 100 * load               (1-minute load average per core)
         + free_weight * 100 / (1 + free_units)   (units the node could still give)
         + priority_weight * 100 * [needs pre-emption to admit]

so with the default weights (1, 0.2, 0.2, 0.5) a millisecond of the users' latency counts
as much as a hundredth of a loaded core, a node with one free unit costs 10 more than
one with plenty, and a node that would have to evict somebody for this priority 50 more.
A node whose last offer says it cannot admit at all (no free unit and no pre-emption, or
the priority below its minimum) goes last, not away: the offer may be stale. Pure, so
that each rule is tested from a table (tests/unit/test_placement.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Policy = Literal["first", "scored"]


@dataclass(frozen=True)
class Weights:
    latency: float = 1.0
    load: float = 0.2
    free: float = 0.2
    priority: float = 0.5
    unknown_latency_ms: float = 1000.0

    def __post_init__(self) -> None:
        for name in ("latency", "load", "free", "priority"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"placement weight {name} must be a number >= 0, not {v}")
        if not self.unknown_latency_ms >= 0:
            raise ValueError("unknown_latency_ms must be >= 0")


@dataclass(frozen=True)
class Candidate:
    """One edge node as its last offer and its probe of the users describe it."""

    name: str
    latency_ms: float | None = None  # median RTT from the node to the users; None: unknown
    free_units: float = 0.0
    load: float = 0.0  # load average per core
    admits: bool = True  # a unit fits, or pre-emption can make room, and priority >= minimum
    needs_preemption: bool = False


def cost(c: Candidate, w: Weights) -> float:
    lat = w.unknown_latency_ms if c.latency_ms is None else c.latency_ms
    return (w.latency * lat + w.load * 100.0 * max(0.0, c.load)
            + w.free * 100.0 / (1.0 + max(0.0, c.free_units))
            + (w.priority * 100.0 if c.needs_preemption else 0.0))


def order(candidates: Sequence[Candidate], policy: Policy = "first",
          weights: Weights | None = None) -> list[str]:
    """Node names in the order to ask them. `first`: as given. `scored`: nodes that
    admit by lowest cost (ties: as given), then those that do not, by lowest cost."""
    if policy == "first":
        return [c.name for c in candidates]
    if policy != "scored":
        raise ValueError(f"unknown placement policy {policy!r}")
    w = weights or Weights()
    ranked = sorted(enumerate(candidates),
                    key=lambda ic: (not ic[1].admits, cost(ic[1], w), ic[0]))
    return [c.name for _, c in ranked]
