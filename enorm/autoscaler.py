"""The Auto-scaler: Procedures 5 and 6 of the ENORM paper, as policy apart from mechanism.

Every `autoscale_interval_s` (the paper: 5 minutes) the Monitor takes a `Snapshot` of the
node, `plan()` decides, purely, what to do, and `apply()` asks the Edge Manager to do it.
Keeping `plan` pure (no clock, no I/O) is what lets every branch be tested from a table,
as kubelet keeps its eviction policy apart from the runtime calls.

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
import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from enorm import priorities
from enorm.protocol import Resources

log = logging.getLogger(__name__)

TerminationMode = Literal["single", "multiple"]
_EPS = 1e-9


# --------------------------------------------------------------------------- amounts


@dataclass(frozen=True)
class Amount:
    """Cores and memory that, unlike `Resources`, may be negative (an over-committed node)."""

    cores: float
    memory_mb: float

    @classmethod
    def of(cls, r: Resources | Amount) -> Amount:
        return r if isinstance(r, Amount) else cls(float(r.cores), float(r.memory_mb))

    def __add__(self, o: Amount) -> Amount:
        return Amount(self.cores + o.cores, self.memory_mb + o.memory_mb)

    def __sub__(self, o: Amount) -> Amount:
        return Amount(self.cores - o.cores, self.memory_mb - o.memory_mb)

    def covers(self, o: Amount) -> bool:
        """True when `o` fits into self in both dimensions."""
        return self.cores + _EPS >= o.cores and self.memory_mb + _EPS >= o.memory_mb

    def resources(self) -> Resources:
        """As a protocol `Resources` (cores rounded to 1/1000, memory to whole MB)."""
        return Resources(
            cores=max(0.0, round(self.cores, 3)), memory_mb=max(0, int(round(self.memory_mb)))
        )


ZERO = Amount(0.0, 0.0)
DEFAULT_UNIT = Amount(1.0, 200.0)  # the paper: 1 core, 200 MB


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
    reason: str
    numbers: dict[str, Any] = field(default_factory=dict)
    # Servers terminated (evicted) in this plan to make room; if any of those
    # terminations fails, apply() skips this scale up.
    requires: tuple[str, ...] = ()


@dataclass(frozen=True)
class ScaleDown:
    server_id: str
    new_limits: Resources
    reason: str
    numbers: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Terminate:
    server_id: str
    reason: str
    numbers: dict[str, Any] = field(default_factory=dict)


Action = ScaleUp | ScaleDown | Terminate

# Reasons, one place.
R_RESOURCES = "insufficient_resources"
R_NO_USERS = "no_users"
R_IDLE = "idle"
R_NOT_IMPROVABLE = "latency_not_improvable"
R_EVICTED = "evicted_for_higher_priority"
R_SIBLING = "sibling_terminated"
R_LATENCY_HIGH = "latency_above_objective"
R_LATENCY_LOW = "latency_below_objective"


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

    def terminate(self, s: ServerSnapshot, reason: str, **extra: Any) -> list[str]:
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
                    done += self.terminate(t, R_SIBLING, sibling_of=s.id, sibling_reason=reason)
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
                w.terminate(t, R_RESOURCES, ranked_below=None if t is s else s.id, **extra)
            break

        # P5.5-P5.6: need check, skipped when the cloud set the override flag.
        need = _need_failure(s, options)
        if need is not None and not s.override:
            w.terminate(s, need)
            continue

        # P5.7-P5.9: latency against the objective.
        if s.latency_ms is None:
            continue
        if s.latency_ms > s.latency_objective_ms:
            _scale_up(w, s, step)  # Procedure 6
        elif s.latency_ms < s.latency_objective_ms * (1.0 - options.hysteresis):
            _scale_down(w, s, step, minimum)
    return w.actions


def _need_failure(s: ServerSnapshot, options: Options) -> str | None:
    """P5.5: why the server is not needed on this edge, or None if it is."""
    if s.users <= 0:
        return R_NO_USERS
    if s.idle_for_s is not None and s.idle_for_s >= options.idle_after_s:
        return R_IDLE
    if not s.improvable:
        return R_NOT_IMPROVABLE
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
                evicted += w.terminate(t, R_EVICTED, for_server=s.id)
    if s.id not in w.alive:  # an evicted "multiple" server took s along as its sibling
        return
    if not w.free.covers(step):  # P6.3: nothing (more) to evict: leave s as is
        return
    numbers = w.numbers(s)  # free as found, after any evictions
    w.free = w.free - step  # P6.1 / P6.3
    new = w.limits[s.id] + step
    w.limits[s.id] = new
    w.actions.append(
        ScaleUp(s.id, new.resources(), R_LATENCY_HIGH, numbers, requires=tuple(evicted))
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
    if released.cores <= _EPS and released.memory_mb <= _EPS:
        return
    numbers = w.numbers(s)
    w.free = w.free + released
    w.limits[s.id] = new
    w.actions.append(ScaleDown(s.id, new.resources(), R_LATENCY_LOW, numbers))


# --------------------------------------------------------------------------- apply


class ScalingManager(Protocol):
    """What the auto-scaler needs from the Edge Manager (and nothing more)."""

    def scale(self, server_id: str, limits: Resources, reason: str, numbers: dict) -> None: ...

    def terminate(self, server_id: str, reason: str, numbers: dict) -> None: ...


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


# --------------------------------------------------------------------------- scheduling


@dataclass(frozen=True)
class Round:
    """One auto-scaling round: what was seen, decided and done."""

    started_at: float
    duration_s: float
    snapshot: Snapshot | None
    actions: tuple[Action, ...]
    results: tuple[ActionResult, ...]
    error: str | None = None


def run_round(
    take_snapshot: Callable[[], Snapshot],
    manager: ScalingManager,
    options: Options | None = None,
    clock: Callable[[], float] = time.time,
) -> Round:
    """monitor snapshot -> plan -> apply. A failing snapshot makes an empty round."""
    t0, p0 = clock(), time.perf_counter()
    try:
        snap = take_snapshot()
    except Exception as exc:  # the next round tries again
        log.exception("autoscaler: snapshot failed")
        return Round(t0, time.perf_counter() - p0, None, (), (), f"{type(exc).__name__}: {exc}")
    options = options or Options()
    if options.dynamic_priorities:
        snap = priorities.apply(snap, priorities.Rule(
            users_step=options.priority_users_step, idle_after_s=options.idle_after_s))
    actions = plan(snap, options)
    results = apply(actions, manager)
    return Round(t0, time.perf_counter() - p0, snap, tuple(actions), tuple(results))


class Scheduler:
    """Runs a round every `interval_s` on APScheduler's BackgroundScheduler.

    `max_instances=1` and `coalesce=True`: a slow round is never overlapped by the next,
    and missed runs collapse into one. `run_once()` (used by `enorm autoscale --once`) runs
    a round now, in the caller's thread, serialised with the scheduled ones by a lock.
    """

    JOB_ID = "enorm-autoscale"

    def __init__(
        self,
        take_snapshot: Callable[[], Snapshot],
        manager: ScalingManager,
        options: Options | None = None,
        interval_s: float = 300.0,
        on_round: Callable[[Round], None] | None = None,
    ) -> None:
        if not interval_s > 0:
            raise ValueError("interval_s must be > 0")
        self.take_snapshot = take_snapshot
        self.manager = manager
        self.options = options or Options()
        self.interval_s = float(interval_s)
        self.on_round = on_round
        self.last: Round | None = None
        self._lock = threading.Lock()
        self._scheduler: Any = None

    @classmethod
    def from_config(
        cls,
        config: Any,
        take_snapshot: Callable[[], Snapshot],
        manager: ScalingManager,
        **kw: Any,
    ) -> Scheduler:
        kw.setdefault("options", Options.from_config(config))
        return cls(take_snapshot, manager, interval_s=config.autoscale_interval_s, **kw)

    def run_once(self) -> Round:
        with self._lock:
            r = run_round(self.take_snapshot, self.manager, self.options)
            self.last = r
        if self.on_round is not None:
            try:
                self.on_round(r)
            except Exception:
                log.exception("autoscaler: on_round callback failed")
        return r

    def start(self, first_run_in_s: float | None = None) -> None:
        """Start the background schedule; the first round comes after one interval."""
        from datetime import datetime, timedelta

        from apscheduler.schedulers.background import BackgroundScheduler

        if self._scheduler is not None:
            return
        delay = self.interval_s if first_run_in_s is None else first_run_in_s
        sched = BackgroundScheduler(daemon=True)
        sched.add_job(
            self.run_once,
            "interval",
            seconds=self.interval_s,
            id=self.JOB_ID,
            max_instances=1,
            coalesce=True,
            misfire_grace_time=max(1, math.ceil(self.interval_s)),
            next_run_time=datetime.now().astimezone() + timedelta(seconds=delay),
        )
        sched.start()
        self._scheduler = sched

    @property
    def running(self) -> bool:
        return self._scheduler is not None and self._scheduler.running

    def shutdown(self, wait: bool = True) -> None:
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=wait)
            self._scheduler = None
