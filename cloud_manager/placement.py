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
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from .edge_client import EdgeClient, EdgeError
from .registry import Registry, Summary

if TYPE_CHECKING:
    from enorm.protocol import NodeOffer, SetupRequest

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
    probe of a sample of the users, side by side. Of a large fleet only the
    `probe_nodes` best by their offers are probed (a probe is a request to the node):
    the others follow them in the order of their offers."""

    def __init__(self, registry: Registry | None = None, policy: Policy = "first",
                 weights: Weights | None = None, probe_sample: int = 64,
                 probe_nodes: int = 16) -> None:
        if policy not in ("first", "scored"):
            raise ValueError(f"placement must be 'first' or 'scored', not {policy!r}")
        if probe_nodes < 1:
            raise ValueError("probe_nodes must be >= 1")
        self.registry = registry
        self.policy, self.weights = policy, weights or Weights()
        self.probe_sample, self.probe_nodes = probe_sample, probe_nodes

    def place(self, nodes: Iterable[EdgeClient], req: SetupRequest,
              exclude: Iterable[str] = (), only: str | None = None
              ) -> tuple[list[EdgeClient], dict[str, str], dict]:
        """Of `nodes`, the ones to ask, in order, the ones passed over (down) and, for the
        record, the figures the order came from; never the nodes in `exclude`, only
        `only` if given."""
        t0 = time.perf_counter()
        refused: dict[str, str] = {}
        skip = set(exclude)
        edges = [e for e in nodes if e.name not in skip and only in (None, e.name)]
        if only is not None and not edges:
            raise ValueError(f"no edge node named {only!r} besides the excluded ones")
        offers: dict[str, NodeOffer | None] = {}
        summaries: dict[str, Summary] = {}
        if self.registry is not None:  # who is up, and the figures to rank them by
            summaries = self.registry.summaries()
            edges, candidates = [], edges
            for e in candidates:
                if e.name in summaries:
                    edges.append(e)
                else:
                    refused[e.name] = "down (no heartbeat)"
        if self.policy == "first" or len(edges) < 2:
            return edges, refused, {"policy": self.policy, "order": [e.name for e in edges],
                                    "ms": {"total": _ms(t0)}}
        by_name = {e.name: e for e in edges}
        rest: list[str] = []
        if len(edges) > self.probe_nodes and summaries:  # shortlist by the summaries
            ranked = order([summary_candidate(e.name, summaries[e.name], req) for e in edges],
                           "scored", self.weights)
            edges, rest = [by_name[n] for n in ranked[:self.probe_nodes]], ranked[self.probe_nodes:]
        if self.registry is not None:  # the offers of the nodes to probe
            offers = {n: st.offer if st else None
                      for n, st in self.registry.states(e.name for e in edges).items()}
        sample = [str(u.address) for u in req.users[: self.probe_sample]]
        t1 = time.perf_counter()
        with ThreadPoolExecutor(min(16, len(edges))) as pool:
            cands = list(pool.map(
                lambda e: self.candidate(e, req, sample, offers.get(e.name)), edges))
        probes = _ms(t1)
        names = order(cands, "scored", self.weights) + rest
        return [by_name[n] for n in names], refused, {
            "policy": "scored", "order": names[:self.probe_nodes],
            # the decision's time, and the part of it the nodes' probes took
            "ms": {"total": _ms(t0), "probes": probes},
            "nodes": {c.name: {"latency_ms": c.latency_ms, "free_units": c.free_units,
                               "load": c.load, "admits": c.admits,
                               "cost": round(cost(c, self.weights), 3)}
                      for c in cands}}

    def candidate(self, edge: EdgeClient, req: SetupRequest, sample: list[str],
                  offer: NodeOffer | None = None) -> Candidate:
        """One node's figures: its offer (the registry's, else asked now) and its probe of
        a sample of the users; what it cannot answer counts as unknown."""
        try:
            offer = offer or edge.offer()
        except EdgeError:
            return Candidate(edge.name, admits=False)
        try:
            latency = edge.probe(sample).median_ms if sample else None
        except EdgeError as exc:
            log.info("edge %s: probe failed: %s", edge.name, exc)
            latency = None
        return offer_candidate(edge.name, offer, req, latency)


def _ms(since: float) -> float:
    return round((time.perf_counter() - since) * 1000, 3)


def offer_candidate(name: str, offer: NodeOffer | None, req: SetupRequest,
                    latency_ms: float | None = None) -> Candidate:
    """A node's figures from its offer (None: unknown, it goes last) and a latency."""
    if offer is None:
        return Candidate(name, latency_ms=latency_ms, admits=False)
    return summary_candidate(name, Summary.of(offer), req, latency_ms)


def summary_candidate(name: str, s: Summary, req: SetupRequest,
                      latency_ms: float | None = None) -> Candidate:
    room = s.free_units >= 1.0
    preempt = not room and s.preempt
    return Candidate(name, latency_ms=latency_ms, free_units=s.free_units, load=s.load,
                     admits=req.priority >= s.min_priority and (room or preempt),
                     needs_preemption=preempt)
