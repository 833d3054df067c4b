"""The cloud manager's policy: where each group of users is served, decided by itself.

Every interval the policy loop (`policy_loop.py`) takes a `Snapshot` (the app's groups of
users with what a request is expected to cost them on the cloud and on each node
(`request_ms`), the nodes as the registry sees them, the deployments the policy made, the
app's budget), `plan()` decides, purely, and the loop carries the decisions out through
`CloudManager.offload`, `handover` and `withdraw`. As in the node's auto-scaler
(`enorm/autoscaler.py`), `plan` has no clock and no I/O: the time comes in the snapshot
and the hysteresis state comes in and goes out (`State`), so that every rule is a row of
a table (tests/unit/test_policy.py).

The rules, per round (the figures of each decision say which numbers made it):
  W  withdraw a deployed group when
     - its users changed (one opted out, left or joined: `group_changed`, `opt_out`), the
       group opted out or is gone (`opt_out`, `no_users`);
     - its users have been idle for `idle_after_s` (`idle`);
     - its node has been down (no heartbeat) for `down_bound_s` and no other node pays
       (`node_down`; where one does, H below moves the group there instead);
     - the edge's gain over the cloud (its node's, or another's that may take it: the
       best of them) has stayed under `withdraw_gain_ms` for `withdraw_dwell_s`
       (`gain_gone`; under the offload threshold: a band, so that a group at the edge of
       paying is not offloaded and withdrawn in turn; a group between two nodes that
       both pay little is handed over by H, not sent home and out again; a longer wait
       than a handover's, since going home costs a merge and coming back a new server);
     - the budget is over (servers or units; it was lowered, or servers grew): the
       lowest-priority groups first (`budget_spent`).
  H  hand a deployed group over to another node when that node has beaten its current
     one by `handover_gain_ms` for `dwell_s` on end (`better_node`); the clock restarts
     when the best node changes or the lead drops, so a group walking along a border is
     not moved back and forth (at most one handover per crossing). A group whose node
     has been down for `down_bound_s` goes straight to the best other node that beats
     the cloud by `offload_gain_ms` (`node_down`: one move, its server made from the
     cloud's copy of the data; the dead node's is merged when it is back).
  O  offload a group on the cloud to the node with the lowest expected latency when it
     beats the cloud by `offload_gain_ms` (`edge_pays`) -- or, for a group whose node
     ended its server for want of resources, to another node (`preempted`) -- highest
     priority first, then largest gain; within the budget, or by withdrawing
     strictly lower-priority groups (`budget_for_priority`).
Only nodes that are up and whose last offer admits a server take groups. A latency the
snapshot does not know (None) decides nothing: the group stays where it is. A group
with a decision still under way (`Snapshot.busy`: the loop carries moves out in the
background) gets no other: its server counts for the budget, its clocks are kept.
`next_due(state)` is when the next clock comes due: the loop plans again then, so a move
starts when its hysteresis is met, not at the round after.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Kind = Literal["offload", "handover", "withdraw"]


class Reason(StrEnum):
    """Why the policy decided (one vocabulary: logs, events, tests)."""

    EDGE_PAYS = "edge_pays"
    PREEMPTED = "preempted"
    BETTER_NODE = "better_node"
    GAIN_GONE = "gain_gone"
    NODE_DOWN = "node_down"
    IDLE = "idle"
    BUDGET_SPENT = "budget_spent"
    BUDGET_FOR_PRIORITY = "budget_for_priority"
    OPT_OUT = "opt_out"
    NO_USERS = "no_users"
    GROUP_CHANGED = "group_changed"
    # The loop's, not the plan's: a server withdrawn while its node was down (its users
    # sent home), merged once the node is back.
    NODE_BACK = "node_back"


class Settings(BaseModel):
    """The `[policy]` section of the cloud config (and `CloudManager.start_policy`'s)."""

    model_config = ConfigDict(extra="forbid")

    # `enorm-cloud policy` runs only with it; in the library, `start_policy()` is the switch.
    enabled: bool = False
    interval_s: float = Field(default=2.0, gt=0)
    offload_gain_ms: float = Field(default=10.0, ge=0)
    withdraw_gain_ms: float = Field(default=5.0, ge=0)
    handover_gain_ms: float = Field(default=5.0, ge=0)
    dwell_s: float = Field(default=4.0, ge=0)
    # The gain-gone wait: a wrong withdrawal costs a merge and, when the edge pays again
    # a few seconds on (a group at the midpoint between two nodes), a new server.
    withdraw_dwell_s: float = Field(default=10.0, ge=0)
    down_bound_s: float = Field(default=30.0, ge=0)
    idle_after_s: float = Field(default=600.0, gt=0)
    max_servers: int | None = Field(default=None, ge=0)
    max_units: float | None = Field(default=None, ge=0)
    # Expected latency: from locations where the app gives the group's and the config the
    # node's (base_ms + ms_per_km * great-circle km), else from the nodes' probes.
    base_ms: float = Field(default=2.0, ge=0)
    ms_per_km: float = Field(default=0.02, ge=0)
    locations: dict[str, tuple[float, float]] = Field(default_factory=dict)
    # The figures compared are what one of the app's requests costs its users there
    # (`request_ms`): `request_rtts` round trips of the RTT (a probe's, or the model's)
    # plus the time the request spends in the server, `edge_service_ms` on an edge
    # server, `cloud_service_ms` on the cloud. The defaults (1, 0, 0) compare RTTs.
    request_rtts: float = Field(default=1.0, ge=1)
    edge_service_ms: float = Field(default=0.0, ge=0)
    cloud_service_ms: float = Field(default=0.0, ge=0)
    # The cloud: a request's cost there as the app's users see it (measured), or a
    # location (then by the same model, with `cloud_service_ms`).
    cloud_ms: float | None = Field(default=None, ge=0)
    cloud_location: tuple[float, float] | None = None
    # `enorm-cloud policy`: module:function(cloud_redis, **population_options) -> the
    # app's hook (`policy_loop.Population`: a callable giving the groups now).
    population: str | None = Field(default=None, pattern=r"^[\w.]+:\w+$")
    population_options: dict[str, Any] = Field(default_factory=dict)
    probe_sample: int = Field(default=64, ge=1, le=256)
    # The server a move would need started while its clock runs (a standby, within the
    # budget; ended when not wanted for `dwell_s`): a handover's new one while the dwell
    # runs, a down node's refuge while the bound runs; the move is then the switch
    # alone. Off: the server is started once the move is decided.
    prepare_moves: bool = True

    @model_validator(mode="after")
    def _bands(self) -> Settings:
        if self.withdraw_gain_ms > self.offload_gain_ms:
            raise ValueError("withdraw_gain_ms must not exceed offload_gain_ms (the band "
                             "between them keeps a group from flapping)")
        for name, (lat, lng) in [*self.locations.items(),
                                 *([("cloud_location", self.cloud_location)]
                                   if self.cloud_location else [])]:
            if not (-90 <= lat <= 90 and -180 <= lng <= 180):
                raise ValueError(f"locations.{name}: ({lat}, {lng}) is no latitude, "
                                 "longitude")
        return self


# --------------------------------------------------------------------------- snapshot


@dataclass(frozen=True)
class GroupView:
    """One group as the app gave it, with its expected latencies."""

    name: str
    users: frozenset[str]
    priority: int = 5
    opt_out: bool = False
    cloud_ms: float | None = None
    node_ms: Mapping[str, float | None] = field(default_factory=dict)
    idle_for_s: float | None = None
    # The node that ended this group's server for want of resources (re-place elsewhere).
    preempted_from: str | None = None


@dataclass(frozen=True)
class NodeView:
    name: str
    up: bool
    admits: bool = True


@dataclass(frozen=True)
class DeploymentView:
    """A live server the policy placed, serving one group."""

    group: str
    server_id: str
    node: str
    users: frozenset[str]
    units: float = 1.0


@dataclass(frozen=True)
class Snapshot:
    now: float
    groups: tuple[GroupView, ...]
    nodes: tuple[NodeView, ...]
    deployments: tuple[DeploymentView, ...] = ()
    opted_out: frozenset[str] = frozenset()  # users who opted out, whatever their group
    # groups with a decision under way: none other for them (their deployment, if they
    # have one, is the server they will have: its node, server_id "" while it is made)
    busy: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        for what, names in (("group", [g.name for g in self.groups]),
                            ("node", [n.name for n in self.nodes]),
                            ("deployment group", [d.group for d in self.deployments])):
            if len(set(names)) != len(names):
                raise ValueError(f"{what} names in a snapshot must be unique")


@dataclass(frozen=True)
class State:
    """The hysteresis, carried from one round to the next (the loop keeps it).

    better: group -> (the node beating its current one, since when);
    gone: group -> since when its node's gain is under the withdraw threshold;
    down: node -> since when it is down."""

    better: Mapping[str, tuple[str, float]] = field(default_factory=dict)
    gone: Mapping[str, float] = field(default_factory=dict)
    down: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    kind: Kind
    group: str
    reason: Reason
    node: str | None = None  # offload: the node; handover and withdraw: the current one
    server_id: str | None = None  # handover and withdraw: the server
    to: str | None = None  # handover: the new node
    users: frozenset[str] = frozenset()
    figures: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        where = {"offload": f"-> {self.node}", "withdraw": f"{self.server_id} on {self.node}",
                 "handover": f"{self.server_id} {self.node} -> {self.to}"}[self.kind]
        nums = " ".join(f"{k}={v}" for k, v in self.figures.items())
        return f"{self.kind} {self.group} {where}: {self.reason} ({nums})"


# --------------------------------------------------------------------------- plan


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def best_node(g: GroupView, nodes: Mapping[str, NodeView],
              exclude: frozenset[str] = frozenset()) -> tuple[str, float] | None:
    """The eligible node (up, admits, latency known) with the lowest expected latency;
    ties by name."""
    known = [(ms, n) for n, ms in g.node_ms.items()
             if ms is not None and n in nodes and nodes[n].up and nodes[n].admits
             and n not in exclude]
    if not known:
        return None
    ms, n = min(known)
    return n, ms


def refuge(g: GroupView, down: str, nodes: Mapping[str, NodeView],
           s: Settings) -> tuple[str, float] | None:
    """Where a group whose node is down goes in one move: the best other node, if it
    beats the cloud by `offload_gain_ms`."""
    best = best_node(g, nodes, frozenset({down}))
    if best is None or g.cloud_ms is None or g.cloud_ms - best[1] < s.offload_gain_ms:
        return None
    return best


def plan(snap: Snapshot, state: State, settings: Settings) -> tuple[list[Decision], State]:
    """One round: the decisions in the order to carry them out (withdrawals first, so
    that their room serves the offloads), and the state for the next round."""
    s, now = settings, snap.now
    nodes = {n.name: n for n in snap.nodes}
    groups = {g.name: g for g in snap.groups}
    down = {n: state.down.get(n, now) for n, v in nodes.items() if not v.up}
    better: dict[str, tuple[str, float]] = {}
    gone: dict[str, float] = {}
    out: list[Decision] = []
    live: dict[str, DeploymentView] = {}

    hold: set[str] = set()  # withdrawn for good this round: not offloaded again at once

    def withdraw(d: DeploymentView, reason: Reason, **figures: Any) -> None:
        if reason in (Reason.GAIN_GONE, Reason.IDLE, Reason.BUDGET_SPENT,
                      Reason.BUDGET_FOR_PRIORITY):
            hold.add(d.group)
        out.append(Decision("withdraw", d.group, reason, d.node, d.server_id,
                            users=d.users, figures=figures))

    # W: the deployments that no longer pay, or may not stay.
    for d in snap.deployments:
        if d.group in snap.busy:
            live[d.group] = d
            continue
        g = groups.get(d.group)
        users = None if g is None else g.users - snap.opted_out
        if g is None or not users:
            withdraw(d, Reason.NO_USERS if g is None or not g.users else Reason.OPT_OUT,
                     users=0)
        elif g.opt_out:
            withdraw(d, Reason.OPT_OUT, users=len(d.users))
        elif users != d.users:
            why = Reason.OPT_OUT if d.users & snap.opted_out else Reason.GROUP_CHANGED
            withdraw(d, why, users=len(d.users), now_users=len(users))
        elif g.idle_for_s is not None and g.idle_for_s >= s.idle_after_s:
            withdraw(d, Reason.IDLE, idle_for_s=_r(g.idle_for_s), idle_after_s=s.idle_after_s)
        elif d.node in down and now - down[d.node] >= s.down_bound_s:
            figures = {"down_for_s": _r(now - down[d.node]), "down_bound_s": s.down_bound_s}
            best = refuge(g, d.node, nodes, s)
            if best is None:
                withdraw(d, Reason.NODE_DOWN, **figures)
                continue
            node, ms = best  # one move: straight there, not home first
            out.append(Decision("handover", g.name, Reason.NODE_DOWN, d.node, d.server_id,
                                to=node, users=d.users, figures={
                                    **figures, "cloud_ms": _r(g.cloud_ms), "to_ms": _r(ms),
                                    "gain_ms": _r(g.cloud_ms - ms),
                                    "threshold_ms": s.offload_gain_ms}))
            live[d.group] = DeploymentView(d.group, "", node, d.users, d.units)
        else:
            # The edge's gain: its own node's, or another's that could take the group.
            # A group crossing from one node's area to the next is handed over, not
            # sent home and out again, while either pays.
            cur = g.node_ms.get(d.node)
            other = best_node(g, nodes, frozenset({d.node}))
            edge = cur if other is None or cur is None else min(cur, other[1])
            if edge is not None and g.cloud_ms is not None \
                    and g.cloud_ms - edge < s.withdraw_gain_ms:
                since = state.gone.get(g.name, now)
                gone[g.name] = since
                if now - since >= s.withdraw_dwell_s:
                    withdraw(d, Reason.GAIN_GONE, cloud_ms=_r(g.cloud_ms), node_ms=_r(cur),
                             best_ms=_r(edge), gain_ms=_r(g.cloud_ms - edge),
                             threshold_ms=s.withdraw_gain_ms, for_s=_r(now - since))
                    gone.pop(g.name)
                    continue
            live[d.group] = d

    # W: the budget, lowest priority (then smallest gain) first.
    def gain(d: DeploymentView) -> float:
        g = groups[d.group]
        ms = g.node_ms.get(d.node)
        return -math.inf if ms is None or g.cloud_ms is None else g.cloud_ms - ms

    def used() -> tuple[int, float]:
        return len(live), sum(d.units for d in live.values())

    def over(extra: int = 0, extra_units: float = 0.0) -> bool:
        n, u = used()
        return ((s.max_servers is not None and n + extra > s.max_servers)
                or (s.max_units is not None and u + extra_units > s.max_units))

    def movable(d: DeploymentView) -> bool:
        return d.group not in snap.busy and d.group in groups and bool(d.server_id)

    for d in sorted(filter(movable, live.values()),
                    key=lambda d: (groups[d.group].priority, gain(d), d.group)):
        if not over():
            break
        del live[d.group]
        n, u = used()
        withdraw(d, Reason.BUDGET_SPENT, priority=groups[d.group].priority,
                 servers=n + 1, units=_r(u + d.units), max_servers=s.max_servers,
                 max_units=s.max_units)

    # O: the groups on the cloud, highest priority then largest gain first.
    wanted = []
    for g in snap.groups:
        users = g.users - snap.opted_out
        if g.name in live or g.name in hold or g.name in snap.busy or g.opt_out or not users \
                or g.cloud_ms is None:
            continue
        if g.idle_for_s is not None and g.idle_for_s >= s.idle_after_s:
            continue
        exclude = frozenset({g.preempted_from}) if g.preempted_from else frozenset()
        best = best_node(g, nodes, exclude)
        if best is None or g.cloud_ms - best[1] < s.offload_gain_ms:
            continue
        wanted.append((g, users, best))
    wanted.sort(key=lambda w: (-w[0].priority, -(w[0].cloud_ms - w[2][1]), w[0].name))
    for g, users, (node, ms) in wanted:
        figures: dict[str, Any] = {"cloud_ms": _r(g.cloud_ms), "node_ms": _r(ms),
                                   "gain_ms": _r(g.cloud_ms - ms),
                                   "threshold_ms": s.offload_gain_ms, "priority": g.priority}
        if over(1, 1.0):
            lower = sorted((d for d in live.values()
                            if movable(d) and groups[d.group].priority < g.priority),
                           key=lambda d: (groups[d.group].priority, gain(d), d.group))
            freed: list[DeploymentView] = []
            for d in lower:
                if not over(1 - len(freed), 1.0 - sum(x.units for x in freed)):
                    break
                freed.append(d)
            if over(1 - len(freed), 1.0 - sum(x.units for x in freed)):
                continue  # no room, even without every lower-priority group
            for d in freed:
                del live[d.group]
                withdraw(d, Reason.BUDGET_FOR_PRIORITY, priority=groups[d.group].priority,
                         for_group=g.name, for_priority=g.priority)
        if g.preempted_from:
            figures["preempted_from"] = g.preempted_from
        out.append(Decision("offload", g.name,
                            Reason.PREEMPTED if g.preempted_from else Reason.EDGE_PAYS,
                            node, users=users, figures=figures))
        live[g.name] = DeploymentView(g.name, "", node, users)

    # H: the live deployments a better node has beaten for the dwell time.
    # (not the moves just planned, nor those under way)
    for d in [d for d in live.values() if d.server_id and d.group not in snap.busy]:
        g = groups[d.group]
        cur = g.node_ms.get(d.node)
        if d.node in down:  # its node cannot hand over now
            continue
        best = best_node(g, nodes, frozenset({d.node}))
        if cur is None or best is None or cur - best[1] < s.handover_gain_ms:
            continue
        node, ms = best
        prev = state.better.get(g.name)
        since = prev[1] if prev is not None and prev[0] == node else now
        if now - since < s.dwell_s:
            better[g.name] = (node, since)
            continue
        out.append(Decision("handover", g.name, Reason.BETTER_NODE, d.node, d.server_id,
                            to=node, users=d.users,
                            figures={"node_ms": _r(cur), "to_ms": _r(ms),
                                     "gain_ms": _r(cur - ms),
                                     "threshold_ms": s.handover_gain_ms,
                                     "for_s": _r(now - since)}))

    for name in snap.busy:  # their clocks wait for them
        if name in state.better:
            better[name] = state.better[name]
        if name in state.gone:
            gone[name] = state.gone[name]
    # Withdrawals first (their room and their budget serve the rest), in decided order.
    out.sort(key=lambda x: x.kind != "withdraw")
    return out, replace(state, better=better, gone=gone, down=down)


def upcoming(snap: Snapshot, state: State, settings: Settings) -> dict[str, tuple[Reason, str]]:
    """The moves whose clock runs after a round (`state`: the one `plan` gave back):
    group -> (why, the node it would go to): a better node leading for less than the
    dwell so far, or the refuge of a group whose node has been down for less than the
    bound. The loop prepares them, so that a move that comes due is the switch alone."""
    s, now = settings, snap.now
    nodes = {n.name: n for n in snap.nodes}
    groups = {g.name: g for g in snap.groups}
    out: dict[str, tuple[Reason, str]] = {}
    for d in snap.deployments:
        g = groups.get(d.group)
        if g is None or d.group in snap.busy or not d.server_id:
            continue
        if d.group in state.better:
            out[d.group] = (Reason.BETTER_NODE, state.better[d.group][0])
        elif d.node in state.down and now - state.down[d.node] < s.down_bound_s \
                and (best := refuge(g, d.node, nodes, s)) is not None:
            out[d.group] = (Reason.NODE_DOWN, best[0])
    return out


def next_due(state: State, settings: Settings, now: float) -> float | None:
    """The earliest time after `now` a clock of `state` comes due (a better node's or a
    gone gain's dwell, a node's down bound), None when none will: the loop plans again
    then rather than at its next round."""
    s = settings
    due = [since + s.dwell_s for _, since in state.better.values()]
    due += [since + s.withdraw_dwell_s for since in state.gone.values()]
    due += [since + s.down_bound_s for since in state.down.values()]
    return min((t for t in due if t > now), default=None)


# --------------------------------------------------------------------------- latency


def distance_km(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Great-circle distance (haversine, mean Earth radius)."""
    lat1, lng1, lat2, lng2 = map(math.radians, (*a, *b))
    h = (math.sin((lat2 - lat1) / 2) ** 2
         + math.cos(lat1) * math.cos(lat2) * math.sin((lng2 - lng1) / 2) ** 2)
    return 2 * 6371.0088 * math.asin(min(1.0, math.sqrt(h)))


def expected_ms(where: tuple[float, float], to: tuple[float, float], s: Settings) -> float:
    """The RTT a location model expects: a fixed part (access link, server) plus the
    distance (fibre: ~0.01 ms of round trip per km, doubled for the route's detours)."""
    return s.base_ms + s.ms_per_km * distance_km(where, to)


def request_ms(rtt_ms: float, s: Settings, cloud: bool = False) -> float:
    """What one request costs the users at a place `rtt_ms` away: `request_rtts` round
    trips and the server's time there. An RTT alone is not a request's cost: a place with
    a slower server, or an app whose request takes two round trips, would be ranked
    wrongly against the cloud's figure, which the app measures on served requests."""
    return s.request_rtts * rtt_ms + (s.cloud_service_ms if cloud else s.edge_service_ms)


def centroid(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """Where a group is: the mean of its users' locations (groups span a few km)."""
    if not points:
        return None
    return (sum(p[0] for p in points) / len(points), sum(p[1] for p in points) / len(points))


def groups_by_nearest(rtt: Mapping[str, Mapping[str, float | None]]) -> dict[str, list[str]]:
    """Groups for an app that gives none: each user with the node that answers it fastest
    (`rtt`: node -> user -> ms); users no node reached are left out. Group names are
    `near-<node>`."""
    out: dict[str, list[str]] = {}
    users = sorted({u for per in rtt.values() for u in per})
    for u in users:
        known = [(ms, n) for n, per in rtt.items() if (ms := per.get(u)) is not None]
        if known:
            out.setdefault(f"near-{min(known)[1]}", []).append(u)
    return out
