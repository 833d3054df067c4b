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

Of a large fleet only a shortlist is probed. All but the latency term of the cost is
known before a request comes (`base_cost` of a node's `Summary`), so the registry keeps
its nodes sorted by it as the heartbeats come (`Registry.ranked`) and a decision reads the
best few of each of its pieces, O(shortlist), not the fleet: the shortlist is the `probe_nodes`
nodes up with the lowest `base_cost` that admit the request (exactly those a ranking of
the whole fleet by its summaries would pick). What it cannot see is the latency: a node
near the users but busier than the shortlist is not probed unless the caller names it
(`near`: the nodes it knows to be near the users, e.g. from their locations, are probed
besides the shortlist). A fleet where few nodes admit at all is read only so far (three
rounds of pages); if none of what was read admits, the whole fleet is read. The first
round comes from memory: each process keeps the head of the rank (`RankHead`), read
again every `head_s` (0.5 s), so that a decision waits for no master (the summaries it
holds move only at each node's heartbeat, once a period).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from .edge_client import EdgeClient, EdgeError

if TYPE_CHECKING:
    from enorm.protocol import NodeOffer, SetupRequest

    from .registry import RankHead, Registry

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


@dataclass(frozen=True)
class Summary:
    """What placement ranks a node by before a request comes, from its last offer: units
    it could still give, load per core, the lowest priority it admits, whether it
    pre-empts (the registry keeps one per node up)."""

    free_units: float
    load: float
    min_priority: int
    preempt: bool

    @classmethod
    def of(cls, offer: NodeOffer) -> Summary:
        u = offer.unit
        units = min(offer.free.cores / u.cores if u.cores else 0.0,
                    offer.free.memory_mb / u.memory_mb if u.memory_mb else 0.0)
        # rounded as `encode` writes it: the registry's rank and its readers agree
        return cls(round(units, 3), round(offer.load, 3), offer.min_priority,
                   offer.admission == "preempt")

    def encode(self) -> str:
        return f"{self.free_units:.3f} {self.load:.3f} {self.min_priority} {int(self.preempt)}"

    @classmethod
    def decode(cls, raw: bytes | str) -> Summary:
        f, load, prio, pre = (raw.decode() if isinstance(raw, bytes) else raw).split()
        return cls(float(f), float(load), int(prio), pre == "1")


# What `base_cost` adds for a node that admits no server at all (no free unit and no
# pre-emption): after every node that might, whatever their figures.
UNFIT = 1e6


def cost(c: Candidate, w: Weights) -> float:
    lat = w.unknown_latency_ms if c.latency_ms is None else c.latency_ms
    return w.latency * lat + _static(c, w)


def _static(c: Candidate, w: Weights) -> float:
    return (w.load * 100.0 * max(0.0, c.load)
            + w.free * 100.0 / (1.0 + max(0.0, c.free_units))
            + (w.priority * 100.0 if c.needs_preemption else 0.0))


def base_cost(s: Summary, w: Weights) -> float:
    """The part of a node's `cost` that no request changes (all but the latency), what
    the registry sorts its nodes by; `UNFIT` more if it admits no server at all."""
    c = summary_candidate("", s, s.min_priority)
    return _static(c, w) + (0.0 if c.admits else UNFIT)


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
    over; with `scored` each node's figures (the registry's summary, else its offer
    asked now) and its own probe of a sample of the users, side by side. Of a fleet
    larger than `probe_nodes`, only the shortlist (module docstring) and the nodes named
    `near` are probed; the rest of the shortlist's reading follows them in the order of
    their summaries."""

    def __init__(self, registry: Registry | None = None, policy: Policy = "first",
                 weights: Weights | None = None, probe_sample: int = 64,
                 probe_nodes: int = 16, head_s: float = 0.5) -> None:
        if policy not in ("first", "scored"):
            raise ValueError(f"placement must be 'first' or 'scored', not {policy!r}")
        if probe_nodes < 1:
            raise ValueError("probe_nodes must be >= 1")
        self.registry = registry
        self.policy, self.weights = policy, weights or Weights()
        self.probe_sample, self.probe_nodes = probe_sample, probe_nodes
        self._names: tuple[Sequence[EdgeClient], int, dict[str, EdgeClient]] | None = None
        # The rank's head kept in memory, read again every `head_s` (0: none), from the
        # first decision that reads the rank until `close` (`registry.RankHead`).
        self.head_s = head_s
        self._head: RankHead | None = None
        self._head_lock = threading.Lock()

    def place(self, nodes: Iterable[EdgeClient], req: SetupRequest,
              exclude: Iterable[str] = (), only: str | None = None,
              near: Iterable[str] = ()) -> tuple[list[EdgeClient], dict[str, str], dict]:
        """Of `nodes`, the ones to ask, in order, the ones passed over (down) and, for the
        record, the figures the order came from; never the nodes in `exclude`, only
        `only` if given; the nodes `near` (names) probed whether shortlisted or not. Of
        a large fleet the nodes down are not named one by one (that would read it all)."""
        t0 = time.perf_counter()
        refused: dict[str, str] = {}
        skip = set(exclude)
        nodes = nodes if isinstance(nodes, Sequence) else list(nodes)
        summaries: dict[str, Summary] = {}
        ranked: list[str] = []
        if (self.registry is not None and self.policy == "scored" and only is None
                and len(nodes) - len(skip) > self.probe_nodes
                and self.registry.weights == self.weights):
            # the best few by the registry's rank (sorted by this cost: with other
            # weights the whole fleet is read below), nothing of the fleet walked
            named = self._named(nodes)
            summaries = self._ranked(named, skip, req, near)
            ranked = order([summary_candidate(n, s, req.priority)
                            for n, s in summaries.items()], "scored", self.weights)
            edges = [named[n] for n in ranked]
        if not ranked:
            edges = [e for e in nodes if e.name not in skip and only in (None, e.name)]
            if only is not None and not edges:
                raise ValueError(f"no edge node named {only!r} besides the excluded ones")
        if not ranked and self.registry is not None:  # who is up, and their figures
            summaries = self.registry.summaries()
            edges, candidates = [], edges
            for e in candidates:
                if e.name in summaries:
                    edges.append(e)
                else:
                    refused[e.name] = "down (no heartbeat)"
            if self.policy == "scored" and len(edges) > self.probe_nodes:
                ranked = order([summary_candidate(e.name, summaries[e.name], req.priority)
                                for e in edges], "scored", self.weights)
        if self.policy == "first" or len(edges) < 2:
            return edges, refused, {"policy": self.policy, "order": [e.name for e in edges],
                                    "ms": {"total": _ms(t0)}}
        by_name = {e.name: e for e in edges}
        rest: list[str] = []
        if ranked:  # the shortlist, and the nodes near the users, are probed
            close = set(near)
            rest = [n for n in ranked[self.probe_nodes:] if n not in close]
            edges = [by_name[n] for n in ranked[:self.probe_nodes]
                     + [n for n in ranked[self.probe_nodes:] if n in close]]
        sample = [str(u.address) for u in req.users[: self.probe_sample]]
        t1 = time.perf_counter()
        with ThreadPoolExecutor(min(16, len(edges))) as pool:
            cands = list(pool.map(
                lambda e: self.candidate(e, req, sample, summaries.get(e.name)), edges))
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

    def _named(self, nodes: Sequence[EdgeClient]) -> dict[str, EdgeClient]:
        """`nodes` by name, kept while the same list is passed (a manager's edges), so
        that a decision among a large fleet does not walk it."""
        named = self._names
        if named is None or named[0] is not nodes or named[1] != len(nodes):
            named = self._names = (nodes, len(nodes), {e.name: e for e in nodes})
        return named[2]

    def _ranked(self, named: dict[str, EdgeClient], skip: set[str], req: SetupRequest,
                near: Iterable[str]) -> dict[str, Summary]:
        """The summaries the registry's rank gives (at least the `2 probe_nodes` best of
        the nodes `named`, not in `skip`, that admit the request, if there are as many),
        and those of the nodes `near` that are up; empty if none of them admits (a fleet
        nearly full, or a rank not written yet): then the caller reads the whole fleet."""
        assert self.registry is not None

        def mine(n: str) -> bool:
            return n in named and n not in skip

        out = {n: s for n, s in self.registry.ranked(
            2 * self.probe_nodes,
            lambda n, s: mine(n) and summary_candidate(n, s, req.priority).admits,
            head=self.head()) if mine(n)}
        extra = [n for n in near if mine(n) and n not in out]
        for n, st in (self.registry.up_among(extra) if extra else {}).items():
            if st is not None and st.offer is not None:
                out[n] = Summary.of(st.offer)
        if not any(summary_candidate(n, s, req.priority).admits for n, s in out.items()):
            return {}
        return out

    def head(self) -> RankHead | None:
        """The rank's head, started at the first call (None: `head_s` 0)."""
        if self.head_s <= 0 or self.registry is None:
            return None
        with self._head_lock:
            if self._head is None:
                from .registry import RankHead

                self._head = RankHead(self.registry,
                                      self.registry.first_page(2 * self.probe_nodes),
                                      self.head_s)
                self._head.start()
            return self._head

    def close(self) -> None:
        with self._head_lock:
            if self._head is not None:
                self._head.stop()
                self._head = None

    def candidate(self, edge: EdgeClient, req: SetupRequest, sample: list[str],
                  summary: Summary | None = None) -> Candidate:
        """One node's figures: its summary (the registry's, else its offer asked now) and
        its probe of a sample of the users; what it cannot answer counts as unknown."""
        try:
            summary = summary or Summary.of(edge.offer())
        except EdgeError:
            return Candidate(edge.name, admits=False)
        try:
            latency = edge.probe(sample).median_ms if sample else None
        except EdgeError as exc:
            log.info("edge %s: probe failed: %s", edge.name, exc)
            latency = None
        return summary_candidate(edge.name, summary, req.priority, latency)


def _ms(since: float) -> float:
    return round((time.perf_counter() - since) * 1000, 3)


def summary_candidate(name: str, s: Summary, priority: int,
                      latency_ms: float | None = None) -> Candidate:
    """A node's figures for a request of `priority`: its summary and a latency."""
    room = s.free_units >= 1.0
    preempt = not room and s.preempt
    return Candidate(name, latency_ms=latency_ms, free_units=s.free_units, load=s.load,
                     admits=priority >= s.min_priority and (room or preempt),
                     needs_preemption=preempt)
