"""The Auto-scaler: Procedures 5 and 6 of the ENORM paper, as policy apart from mechanism.

Every `autoscale_interval_s` (the paper: 5 minutes) the control loop takes a `Snapshot` of
the node, `plan()` decides, purely, what to do, and `apply()` asks the Edge Manager to do
it. Keeping `plan` pure (no clock, no I/O) is what lets every branch be tested from a
table, as kubelet keeps its eviction policy apart from the runtime calls. The fast mode
(`policy = "fast"`, beyond the paper) adds `slo_plan`, one latency step per server every
few seconds, and leaves the round its resource and need checks.

Our reading of the paper, step by step (the docstrings below cite these steps as P5.n and
P6.n):

    Procedure 5 -- auto-scaling on the edge node, once per interval
      P5.1  sort the edge servers by priority, highest first
      P5.2  for each edge server s, in that order:
      P5.3    resource check: if the node's free resources (after its basic service and
              the servers ranked above s) are below the minimum a server needs,
      P5.4      terminate s and every server ranked below it (data back to the cloud); stop
      P5.5    need check: if s covers no users, has been idle for the configured time, or
              the edge cannot improve its latency,
      P5.6      terminate s (unless the cloud set its override flag); next server
      P5.7    get s's application latency (network + computing)
      P5.8    if it is above s's latency objective: Procedure 6 (scale up)
      P5.9    else if it is below: scale s down by one unit, never below one unit

    Procedure 6 -- allocating one more unit to s
      P6.1  if the node has a free unit: allocate it to s
      P6.2  else terminate the lowest-priority server (below s) and check again,
      P6.3    until the unit fits -> allocate it, or no lower server remains -> leave s as is

Choices where the paper is silent (documented, tested):
- Ties in priority: the older server (smaller `created_at`) ranks higher, then the id;
  a new tenant cannot push out an established one of the same priority.
- "Lower priority" for P6.2 means strictly lower priority: equal-priority tenants never
  evict each other to grow. The resource check (P5.4) terminates everything *ranked* below.
- A server whose latency is unknown (no users probed, no requests) is not scaled.
- The resource check counts the servers ranked below s as releasable: it fails only when
  s could not keep one unit even if every lower server went away -- which is also why
  the paper may terminate all of them at once. With free >= 0 it never fires; it fires
  when the basic service has grown into the servers' allocations (free < 0).
- Terminating a server whose termination mode is "multiple" terminates its siblings
  (same owner and app) with it.

Options beyond the paper (`Options`, all off by default): a hysteresis band for scaling
down, separate CPU/memory steps, and skipping futile evictions.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from enorm.protocol import Resources, ScaleReason, TerminationMode, TerminationReason
from enorm.resources import DEFAULT_UNIT, Amount

log = logging.getLogger(__name__)



# --------------------------------------------------------------------------- snapshot


@dataclass(frozen=True)
class ServerSnapshot:
    """What the auto-scaler knows about one edge server at the start of a round."""

    id: str
    priority: int
    limits: Resources
    users: int
    latency_objective_ms: float
    # Application latency = network + computing; None when unknown (nothing measured).
    latency_ms: float | None = None
    # Seconds since the last request (or since launch when none came yet); None: unknown.
    idle_for_s: float | None = None
    override: bool = False
    termination: TerminationMode = "single"
    owner: str = ""
    app: str = ""
    created_at: float = 0.0
    # False when more resources on this edge cannot help, e.g. the network latency alone
    # is already above the objective.
    improvable: bool = True
    # Parts of the latency, for the record (numbers of the actions); not used to decide.
    network_ms: float | None = None
    computing_ms: float | None = None
    # With dynamic priorities (enorm.priorities) `priority` is the effective one and this
    # the one the cloud manager declared; None: the mode is off.
    declared_priority: int | None = None
    # Cores the container used since the previous look (cgroup); None: unknown. Only the
    # fast loop reads it (a step down must leave room for what the server uses).
    cores_used: float | None = None


@dataclass(frozen=True)
class NodeSnapshot:
    """The node: free = capacity - basic service - sum of all servers' limits.

    `free` may be negative in a dimension when the basic service has grown into the
    allocations; `minimum` is what a server needs to exist at all (the paper: one unit).
    """

    free: Amount
    unit: Amount = DEFAULT_UNIT
    minimum: Amount | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "free", Amount.of(self.free))
        object.__setattr__(self, "unit", Amount.of(self.unit))
        minimum = self.unit if self.minimum is None else Amount.of(self.minimum)
        object.__setattr__(self, "minimum", minimum)


@dataclass(frozen=True)
class Snapshot:
    node: NodeSnapshot
    servers: tuple[ServerSnapshot, ...]
    taken_at: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "servers", tuple(self.servers))
        ids = [s.id for s in self.servers]
        if len(set(ids)) != len(ids):
            raise ValueError("server ids in a snapshot must be unique")


@dataclass(frozen=True)
class Options:
    """Knobs of the plan. Defaults are the paper's algorithm."""

    idle_after_s: float = 600.0
    # Scale down only when latency < objective * (1 - band); 0 = the paper (any below).
    hysteresis: float = 0.0
    # Step sizes; None = one unit (the paper).
    cpu_step: float | None = None
    memory_step_mb: float | None = None
    # Do not evict lower servers for a scale up when evicting all of them would still not
    # free the step (the paper evicts one by one and then gives up).
    skip_futile_evictions: bool = False
    # Dynamic priorities (enorm.priorities): the round ranks by a priority that follows
    # each server's workload; a server with at least `priority_users_step` users is
    # "big". Off: the declared priorities (the paper).
    dynamic_priorities: bool = False
    priority_users_step: int = 1000
    # P5.7-P5.9 in the round. The fast mode (`policy = "fast"`) leaves them to the
    # per-server latency loop (`slo_plan`), and the round keeps the resource and need checks.
    latency_steps: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.hysteresis < 1.0:
            raise ValueError("hysteresis must be within [0, 1)")
        if self.cpu_step is not None and self.cpu_step < 0:
            raise ValueError("cpu_step must be >= 0")
        if self.memory_step_mb is not None and self.memory_step_mb < 0:
            raise ValueError("memory_step_mb must be >= 0")
        if self.priority_users_step < 1:
            raise ValueError("priority_users_step must be >= 1")

    @classmethod
    def from_config(cls, config: Any, **overrides: Any) -> Options:
        """Options from a `NodeConfig` (or any object with some of its fields: the knobs
        beyond the paper that it lacks keep their defaults)."""
        d = cls()
        return cls(**{
            "idle_after_s": float(getattr(config, "idle_after_s", d.idle_after_s)),
            "hysteresis": float(getattr(config, "hysteresis", d.hysteresis)),
            "cpu_step": getattr(config, "cpu_step", d.cpu_step),
            "memory_step_mb": getattr(config, "memory_step_mb", d.memory_step_mb),
            "skip_futile_evictions": bool(
                getattr(config, "skip_futile_evictions", d.skip_futile_evictions)),
            "dynamic_priorities": bool(
                getattr(config, "dynamic_priorities", d.dynamic_priorities)),
            "priority_users_step": int(
                getattr(config, "priority_users_step", d.priority_users_step)),
            "latency_steps": getattr(config, "policy", "paper") != "fast",
            **overrides,
        })

    def step(self, unit: Amount) -> Amount:
        return Amount(
            unit.cores if self.cpu_step is None else self.cpu_step,
            unit.memory_mb if self.memory_step_mb is None else self.memory_step_mb,
        )


# --------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class ScaleUp:
    server_id: str
    new_limits: Resources
    reason: ScaleReason
    numbers: dict[str, Any] = field(default_factory=dict)
    # Servers terminated (evicted) in this plan to make room; if any of those
    # terminations fails, apply() skips this scale up.
    requires: tuple[str, ...] = ()


@dataclass(frozen=True)
class ScaleDown:
    server_id: str
    new_limits: Resources
    reason: ScaleReason
    numbers: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Terminate:
    server_id: str
    reason: TerminationReason
    numbers: dict[str, Any] = field(default_factory=dict)


Action = ScaleUp | ScaleDown | Terminate

def rank(servers: Iterable[ServerSnapshot]) -> list[ServerSnapshot]:
    """P5.1: highest priority first; ties: older first, then by id (deterministic)."""
    return sorted(servers, key=lambda s: (-s.priority, s.created_at, s.id))


# --------------------------------------------------------------------------- plan


class _Walk:
    """The mutable state of one plan: free resources, live servers, actions so far."""

    def __init__(self, snapshot: Snapshot, options: Options) -> None:
        self.options = options
        self.node = snapshot.node
        self.order = rank(snapshot.servers)
        self.position = {s.id: i for i, s in enumerate(self.order)}
        self.limits = {s.id: Amount.of(s.limits) for s in self.order}
        self.free = snapshot.node.free
        self.alive = {s.id for s in self.order}
        self.actions: list[Action] = []

    def numbers(self, s: ServerSnapshot, **extra: Any) -> dict[str, Any]:
        n: dict[str, Any] = {
            "priority": s.priority,
            **({} if s.declared_priority is None else {"declared_priority": s.declared_priority}),
            "users": s.users,
            "latency_ms": s.latency_ms,
            "network_ms": s.network_ms,
            "computing_ms": s.computing_ms,
            "latency_objective_ms": s.latency_objective_ms,
            "idle_for_s": s.idle_for_s,
            "cores": self.limits[s.id].cores,
            "memory_mb": self.limits[s.id].memory_mb,
            "free_cores": round(self.free.cores, 6),
            "free_memory_mb": round(self.free.memory_mb, 6),
        }
        n.update(extra)
        return n

    def terminate(self, s: ServerSnapshot, reason: TerminationReason,
                  **extra: Any) -> list[str]:
        """Terminate s (and, in "multiple" mode, its siblings); release their limits."""
        if s.id not in self.alive:
            return []
        done = [s.id]
        self.alive.discard(s.id)
        self.free = self.free + self.limits[s.id]
        self.actions.append(Terminate(s.id, reason, self.numbers(s, **extra)))
        if s.termination == "multiple":
            for t in self.order:
                if t.id in self.alive and t.owner == s.owner and t.app == s.app:
                    done += self.terminate(t, TerminationReason.SIBLING_TERMINATED,
                                           sibling_of=s.id, sibling_reason=reason)
        return done

    def below(self, s: ServerSnapshot) -> list[ServerSnapshot]:
        i = self.position[s.id]  # not order.index(s): that compares dataclasses, O(n) each
        return [t for t in self.order[i + 1 :] if t.id in self.alive]


def plan(snapshot: Snapshot, options: Options | None = None) -> list[Action]:
    """Procedure 5 over a snapshot: the actions of one auto-scaling round, in order.

    Pure: the same snapshot and options always give the same actions. Free resources are
    updated as the plan proceeds (scale ups consume, terminations and scale downs release),
    so later decisions see the effect of earlier ones, as on the real node.
    """
    options = options or Options()
    w = _Walk(snapshot, options)
    minimum = snapshot.node.minimum
    assert minimum is not None
    step = options.step(snapshot.node.unit)

    for s in w.order:  # P5.2
        if s.id not in w.alive:  # terminated earlier in this round (evicted, sibling)
            continue

        # P5.3-P5.4: resource check.
        releasable = w.free + w.limits[s.id]
        for t in w.below(s):
            releasable = releasable + w.limits[t.id]
        if not releasable.covers(minimum):
            extra = {
                "available_cores": releasable.cores,
                "available_memory_mb": releasable.memory_mb,
            }
            for t in [s, *w.below(s)]:
                w.terminate(t, TerminationReason.INSUFFICIENT_RESOURCES,
                            ranked_below=None if t is s else s.id, **extra)
            break

        # P5.5-P5.6: need check, skipped when the cloud set the override flag.
        need = _need_failure(s, options)
        if need is not None and not s.override:
            w.terminate(s, need)
            continue

        # P5.7-P5.9: latency against the objective.
        if s.latency_ms is None or not options.latency_steps:
            continue
        if s.latency_ms > s.latency_objective_ms:
            _scale_up(w, s, step)  # Procedure 6
        elif s.latency_ms < s.latency_objective_ms * (1.0 - options.hysteresis):
            _scale_down(w, s, step, minimum)
    return w.actions


def _need_failure(s: ServerSnapshot, options: Options) -> TerminationReason | None:
    """P5.5: why the server is not needed on this edge, or None if it is."""
    if s.users <= 0:
        return TerminationReason.NO_USERS
    if s.idle_for_s is not None and s.idle_for_s >= options.idle_after_s:
        return TerminationReason.IDLE
    if not s.improvable:
        return TerminationReason.LATENCY_NOT_IMPROVABLE
    return None


def _scale_up(w: _Walk, s: ServerSnapshot, step: Amount) -> None:
    """Procedure 6: one more step for s, evicting strictly lower-priority servers if needed."""
    evicted: list[str] = []
    if not w.free.covers(step):  # P6.2
        lower = [t for t in w.below(s) if t.priority < s.priority]
        if w.options.skip_futile_evictions and not _all_would_fit(w, lower, step):
            lower = []
        for t in reversed(lower):  # lowest priority first
            if w.free.covers(step):
                break
            if t.id in w.alive:
                evicted += w.terminate(t, TerminationReason.EVICTED_FOR_HIGHER_PRIORITY,
                                       for_server=s.id)
    if s.id not in w.alive:  # an evicted "multiple" server took s along as its sibling
        return
    if not w.free.covers(step):  # P6.3: nothing (more) to evict: leave s as is
        return
    numbers = w.numbers(s)  # free as found, after any evictions
    w.free = w.free - step  # P6.1 / P6.3
    new = w.limits[s.id] + step
    w.limits[s.id] = new
    w.actions.append(
        ScaleUp(s.id, new.resources(), ScaleReason.LATENCY_ABOVE_OBJECTIVE, numbers,
                requires=tuple(evicted))
    )


def _all_would_fit(w: _Walk, lower: Sequence[ServerSnapshot], step: Amount) -> bool:
    total = w.free
    for t in lower:
        total = total + w.limits[t.id]
    return total.covers(step)


def _scale_down(w: _Walk, s: ServerSnapshot, step: Amount, minimum: Amount) -> None:
    """P5.9: one step less, never below the minimum (one unit) in either dimension."""
    cur = w.limits[s.id]
    new = Amount(
        max(minimum.cores, cur.cores - step.cores) if cur.cores > minimum.cores else cur.cores,
        max(minimum.memory_mb, cur.memory_mb - step.memory_mb)
        if cur.memory_mb > minimum.memory_mb
        else cur.memory_mb,
    )
    released = cur - new
    if released.at_least_zero().is_zero():
        return
    numbers = w.numbers(s)
    w.free = w.free + released
    w.limits[s.id] = new
    w.actions.append(ScaleDown(s.id, new.resources(), ScaleReason.LATENCY_BELOW_OBJECTIVE,
                               numbers))


# --------------------------------------------------------------------------- fast mode


@dataclass(frozen=True)
class SloOptions:
    """The latency loop of the fast mode (beyond the paper; DYVERSE-like timescale).

    Every `interval_s` each server with a known latency that the edge can improve is
    compared with its objective: above it, one step up if the node has the room (no
    evictions here: those stay with the round's Procedure 6); below
    `objective * (1 - hysteresis)`, one step down, never below the minimum. After any
    change a server is left alone for `cooldown_s` (the new limits must show in the
    latency before the next step), and a step down waits `down_after_s` since the last
    change, so that a burst does not make it go up and down. A step down also needs the
    server's CPU use to fit in the smaller limit with the same band to spare (when the
    use is known): a latency far under the objective at two units says nothing about one.
    """

    interval_s: float = 5.0
    hysteresis: float = 0.3
    cooldown_s: float = 10.0
    down_after_s: float = 60.0

    def __post_init__(self) -> None:
        if not self.interval_s > 0:
            raise ValueError("interval_s must be > 0")
        if not 0.0 <= self.hysteresis < 1.0:
            raise ValueError("hysteresis must be within [0, 1)")
        if self.cooldown_s < 0 or self.down_after_s < 0:
            raise ValueError("cooldown_s and down_after_s must be >= 0")


def slo_plan(snapshot: Snapshot, last_change: Mapping[str, float], now: float,
             options: SloOptions, base: Options | None = None) -> list[Action]:
    """One tick of the latency loop: at most one step per server, pure.

    `last_change` holds when each server's limits last changed (a launch counts); the
    servers are visited in the round's rank, so a scarce free step goes to the highest
    priority first.
    """
    base = base or Options()
    step = base.step(snapshot.node.unit)
    minimum = snapshot.node.minimum
    assert minimum is not None
    free = snapshot.node.free
    actions: list[Action] = []
    for s in rank(snapshot.servers):
        if s.latency_ms is None or not s.improvable:
            continue
        quiet = now - last_change.get(s.id, s.created_at)
        if quiet < options.cooldown_s:
            continue
        cur = Amount.of(s.limits)
        numbers = {"latency_ms": s.latency_ms, "latency_objective_ms": s.latency_objective_ms,
                   "network_ms": s.network_ms, "computing_ms": s.computing_ms,
                   "cores": cur.cores, "memory_mb": cur.memory_mb,
                   "free_cores": free.cores, "free_memory_mb": free.memory_mb,
                   "since_change_s": round(quiet, 3)}
        if s.latency_ms > s.latency_objective_ms:
            if free.covers(step):
                free = free - step
                actions.append(ScaleUp(s.id, (cur + step).resources(),
                                       ScaleReason.LATENCY_ABOVE_OBJECTIVE_FAST, numbers))
        elif (s.latency_ms < s.latency_objective_ms * (1.0 - options.hysteresis)
              and quiet >= options.down_after_s):
            new = Amount(max(minimum.cores, cur.cores - step.cores),
                         max(minimum.memory_mb, cur.memory_mb - step.memory_mb))
            crowded = (s.cores_used is not None
                       and s.cores_used > new.cores * (1.0 - options.hysteresis))
            numbers["cores_used"] = s.cores_used
            if not crowded and not (cur - new).at_least_zero().is_zero():
                free = free + (cur - new)
                actions.append(ScaleDown(s.id, new.resources(),
                                         ScaleReason.LATENCY_BELOW_OBJECTIVE_FAST, numbers))
    return actions


# --------------------------------------------------------------------------- apply


class ScalingManager(Protocol):
    """What the auto-scaler needs from the Edge Manager (and nothing more)."""

    def scale(self, server_id: str, limits: Resources, reason: ScaleReason,
              numbers: dict) -> None: ...

    def terminate(self, server_id: str, reason: TerminationReason, numbers: dict) -> None: ...


@dataclass(frozen=True)
class ActionResult:
    action: Action
    ok: bool
    error: str | None = None
    skipped: bool = False


def apply(actions: Sequence[Action], manager: ScalingManager) -> list[ActionResult]:
    """Carry out a plan through the manager, in order; a failing action is recorded and
    the rest continue. A scale up whose evictions failed is skipped (its room is not there).
    """
    results: list[ActionResult] = []
    failed: set[str] = set()
    for a in actions:
        if isinstance(a, ScaleUp) and failed.intersection(a.requires):
            missing = sorted(failed.intersection(a.requires))
            results.append(
                ActionResult(a, False, f"skipped: eviction of {', '.join(missing)} failed", True)
            )
            continue
        try:
            if isinstance(a, Terminate):
                manager.terminate(a.server_id, a.reason, dict(a.numbers))
            else:
                manager.scale(a.server_id, a.new_limits, a.reason, dict(a.numbers))
        except Exception as exc:  # any failure of one action is recorded
            log.warning("autoscaler: %s %s failed: %s", type(a).__name__, a.server_id, exc)
            if isinstance(a, Terminate):
                failed.add(a.server_id)
            results.append(ActionResult(a, False, f"{type(exc).__name__}: {exc}"))
        else:
            results.append(ActionResult(a, True))
    return results
