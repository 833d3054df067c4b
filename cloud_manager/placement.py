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
the priority below its minimum) goes last, not away: the offer may be stale. `cost` and
`order` are pure, so that each rule is tested from a table (tests/unit/test_placement.py);
`Placer` asks the nodes for what they need: the registry's view (nodes down are passed
over), each node's offer and its own probe of a sample of the users.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from .edge_client import EdgeClient, EdgeError

if TYPE_CHECKING:
    from enorm.protocol import SetupRequest

    from .registry import Registry

log = logging.getLogger(__name__)

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


class Placer:
    """Asks the nodes what `order` needs: the nodes the registry holds down are passed
    over; with `scored` each node's offer (the registry's, else asked now) and its own
    probe of a sample of the users, side by side."""

    def __init__(self, registry: Registry | None = None, policy: Policy = "first",
                 weights: Weights | None = None, probe_sample: int = 64) -> None:
        if policy not in ("first", "scored"):
            raise ValueError(f"placement must be 'first' or 'scored', not {policy!r}")
        self.registry = registry
        self.policy, self.weights = policy, weights or Weights()
        self.probe_sample = probe_sample

    def place(self, nodes: Iterable[EdgeClient], req: SetupRequest,
              exclude: Iterable[str] = (), only: str | None = None
              ) -> tuple[list[EdgeClient], dict[str, str], dict]:
        """Of `nodes`, the ones to ask, in order, the ones passed over (down) and, for the
        record, the figures the order came from; never the nodes in `exclude`, only
        `only` if given."""
        refused: dict[str, str] = {}
        skip = set(exclude)
        edges = [e for e in nodes if e.name not in skip and only in (None, e.name)]
        if only is not None and not edges:
            raise ValueError(f"no edge node named {only!r} besides the excluded ones")
        if self.registry is not None:
            edges, candidates = [], edges
            for e in candidates:
                if self.registry.up(e.name):
                    edges.append(e)
                else:
                    refused[e.name] = "down (no heartbeat)"
        if self.policy == "first" or len(edges) < 2:
            return edges, refused, {"policy": self.policy, "order": [e.name for e in edges]}
        sample = [str(u.address) for u in req.users[: self.probe_sample]]
        with ThreadPoolExecutor(min(16, len(edges))) as pool:
            cands = list(pool.map(lambda e: self.candidate(e, req, sample), edges))
        names = order(cands, "scored", self.weights)
        by_name = {e.name: e for e in edges}
        return [by_name[n] for n in names], refused, {
            "policy": "scored", "order": names,
            "nodes": {c.name: {"latency_ms": c.latency_ms, "free_units": c.free_units,
                               "load": c.load, "admits": c.admits,
                               "cost": round(cost(c, self.weights), 3)}
                      for c in cands}}

    def candidate(self, edge: EdgeClient, req: SetupRequest, sample: list[str]) -> Candidate:
        """One node's figures: its offer (the registry's, else asked now) and its probe of
        a sample of the users; what it cannot answer counts as unknown."""
        offer = None
        if self.registry is not None and (st := self.registry.get(edge.name)) is not None:
            offer = st.offer
        try:
            offer = offer or edge.offer()
        except EdgeError:
            return Candidate(edge.name, admits=False)
        try:
            latency = edge.probe(sample).median_ms if sample else None
        except EdgeError as exc:
            log.info("edge %s: probe failed: %s", edge.name, exc)
            latency = None
        units = min(offer.free.cores / offer.unit.cores if offer.unit.cores else 0.0,
                    offer.free.memory_mb / offer.unit.memory_mb if offer.unit.memory_mb else 0.0)
        room = units >= 1.0
        preempt = not room and offer.admission == "preempt"
        return Candidate(
            edge.name, latency_ms=latency, free_units=units, load=offer.load,
            admits=req.priority >= offer.min_priority and (room or preempt),
            needs_preemption=preempt)
