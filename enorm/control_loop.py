"""The node's control loop: everything that runs by the clock, on one scheduler.

Jobs (APScheduler, each `max_instances=1` and `coalesce`, so a slow run is never
overlapped by the next and missed runs collapse into one):

- the auto-scaling round, Procedure 5, every `autoscale_interval_s` (the paper: 5 min);
- with `policy = "fast"`, the latency loop every `slo_interval_s` (`autoscaler.slo_plan`);
- with `pressure_interval_s > 0`, the basic service's memory headroom (`pressure`);
- the retry of merges whose sink was unreachable, every `migration_retry_s`.

Each round or tick gathers one `Snapshot` (the `Observer`: store, container usage, the
Monitor's measurements), hands it to a pure plan and applies the actions through the Edge
Manager. The round and the latency loop share the Monitor (its request-log offsets and
last-request times), so they take turns under one lock.
"""

from __future__ import annotations

import logging
import math
import os
import select
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import psutil
from apscheduler.schedulers.background import BackgroundScheduler

from enorm import autoscaler, monitor, priorities
from enorm.autoscaler import (
    Action,
    ActionResult,
    NodeSnapshot,
    Options,
    ScaleDown,
    ScaleUp,
    ScalingManager,
    ServerSnapshot,
    SloOptions,
    Snapshot,
    Terminate,
)
from enorm.firewall import FirewallError
from enorm.pressure import evictions, psi_some_avg10, psi_trigger
from enorm.protocol import Resources, ServerInfo, TerminationReason
from enorm.requestlog import REQUEST_LOG
from enorm.resources import Amount

if TYPE_CHECKING:
    from enorm.manager import EdgeManager
    from enorm.node import Node

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- observing


def server_snapshot(rec: ServerInfo, r: monitor.ServerReport,
                    used: Amount | None = None) -> ServerSnapshot:
    """What the plan sees of one server: its record and this round's measurements."""
    return ServerSnapshot(
        id=rec.id, priority=rec.priority, limits=rec.limits, users=rec.users,
        latency_objective_ms=rec.latency_objective_ms, latency_ms=r.latency_ms,
        idle_for_s=r.idle_for_s, override=rec.override, termination=rec.termination,
        owner=rec.owner, app=rec.app, created_at=rec.created_at, improvable=r.improvable,
        network_ms=r.network_ms, computing_ms=r.computing.mean_ms,
        cores_used=None if used is None else round(used.cores, 4),
    )


class Observer:
    """Takes snapshots of one node, round after round (keeps the previous samples)."""

    def __init__(self, mgr: EdgeManager) -> None:
        self.mgr = mgr
        self.node = mgr.node
        cfg = self.node.config
        self.monitor = monitor.Monitor.from_config(cfg, statistic=cfg.statistic)
        self.host = monitor.HostSampler()
        self.host.sample()  # the first interval starts now
        self.prev: dict[str, monitor.CgroupSample] = {}

    def _usage(self, names: list[str]) -> dict[str, Amount]:
        samples = {}
        now = time.monotonic()
        for name in names:
            try:
                u = self.node.containers.usage(name)
            except Exception:  # a container that vanished meanwhile uses nothing
                continue
            samples[name] = monitor.CgroupSample(now, u.cpu_ns, u.memory_bytes)
        used = monitor.cgroup_usage(samples, self.prev)
        self.prev = samples
        return used

    def _packets(self) -> dict[str, int] | None:
        """Every server's packet count, one read of the accounting chain (None: not
        read this time; the request logs still count)."""
        try:
            return self.node.firewall.counters()
        except FirewallError as exc:
            log.warning("activity: the packet counters could not be read: %s", exc)
            return None

    def snapshot(self) -> Snapshot:
        node = self.node
        self.mgr.enforce_limits()  # the plan starts from the limits the store holds
        servers = node.store.servers()
        running = [s for s in servers if s.state == "running"]
        known = set(self.prev)  # containers with a previous sample: their CPU use is known
        # Every container there is, not only the running ones: one launching or being
        # terminated holds memory its limits already count as allocated, and left in the
        # board's own figure it would be counted twice (as basic_memory_mb does).
        used = self._usage([s.container for s in servers])
        if node.config.basic_service == "measured":
            cores, mem = self.host.sample()
            node.allocator.basic = monitor.basic_service(cores, mem, used.values())
        addresses = node.store.user_addresses([s.id for s in running])
        packets = self._packets() if running else {}
        now = time.time()
        reports = self.monitor.measure([
            monitor.ServerInput(
                server_id=s.id, created_at=s.created_at,
                latency_objective_ms=s.latency_objective_ms, user_addresses=addresses[s.id],
                log_path=node.containers.delta_dir(s.container) / REQUEST_LOG,
                log_root=node.containers.delta_dir(s.container),
                packets=None if packets is None else packets.get(s.id, 0),
            )
            for s in running
        ], now)
        return Snapshot(NodeSnapshot(node.free(servers), Amount.of(node.unit)),
                        tuple(server_snapshot(s, reports[s.id], used.get(s.container)
                                              if s.container in known else None)
                              for s in running), now)


# --------------------------------------------------------------------------- rounds


@dataclass(frozen=True)
class Round:
    """One auto-scaling round (or latency tick): what was seen, decided and done."""

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
    decide: Callable[[Snapshot], list[Action]] | None = None,
) -> Round:
    """snapshot -> plan -> apply. A failing snapshot makes an empty round. `decide`
    replaces Procedure 5 (the latency loop's tick)."""
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
    actions = decide(snap) if decide is not None else autoscaler.plan(snap, options)
    results = autoscaler.apply(actions, manager)
    return Round(t0, time.perf_counter() - p0, snap, tuple(actions), tuple(results))


def round_report(r: Round) -> dict[str, Any]:
    """A round as JSON: what was seen, planned and done (for the API and the CLI)."""

    def action(a: Action) -> dict:
        d = asdict(a)
        d["action"] = type(a).__name__
        for k, v in d.items():
            if isinstance(v, Resources):
                d[k] = v.model_dump()
        return d

    return {
        "started_at": r.started_at,
        "duration_s": r.duration_s,
        "error": r.error,
        "servers": [] if r.snapshot is None else [
            {"id": s.id, "priority": s.priority, "declared_priority": s.declared_priority,
             "latency_ms": s.latency_ms,
             "network_ms": s.network_ms, "computing_ms": s.computing_ms,
             "objective_ms": s.latency_objective_ms, "users": s.users,
             "idle_for_s": s.idle_for_s, "improvable": s.improvable,
             "limits": s.limits.model_dump()}
            for s in r.snapshot.servers
        ],
        "free": None if r.snapshot is None else asdict(r.snapshot.node.free),
        "plan": [action(a) for a in r.actions],
        "results": [{"server_id": x.action.server_id, "ok": x.ok, "skipped": x.skipped,
                     "error": x.error} for x in r.results],
    }


# --------------------------------------------------------------------------- pressure


def basic_memory_mb(node: Node) -> int:
    """The machine's memory use outside the node's containers (MB). Every container
    there is counts, not only the running ones: one launching or being terminated holds
    memory that its limits already count as allocated (counted twice, the watcher would
    end a tenant for memory the node holds back already)."""
    vm = psutil.virtual_memory()
    used = (vm.total - vm.available) >> 20
    inside = 0
    for s in node.store.servers():
        try:
            inside += node.containers.usage(s.container).memory_bytes >> 20
        except Exception:  # noqa: BLE001 (not made yet, or gone: it uses nothing)
            continue
    return max(0, used - inside)


def protect_basic_service(mgr: EdgeManager) -> list[str]:
    """One look at the basic service's memory: update the allocator's figure and, when
    less than the headroom is left for it (the node's free figure, which holds the
    headroom back, is < 0), terminate the lowest-priority tenants (data merged back)
    until the shortfall is covered. Returns the servers terminated."""
    node = mgr.node
    alloc = node.allocator
    basic = basic_memory_mb(node)
    alloc.basic = Resources(cores=alloc.basic.cores, memory_mb=basic)
    free = int(node.free().memory_mb)  # signed: a shortfall shows as < 0
    if free >= 0:
        return []
    victims = evictions(node.store.servers(), -free)
    headroom = alloc.headroom.memory_mb
    numbers = {"basic_service_mb": basic, "left_mb": free + headroom,
               "headroom_mb": headroom, "psi_some_avg10": psi_some_avg10()}
    done = []
    for sid in victims:
        try:
            mgr.terminate(sid, reason=TerminationReason.BASIC_SERVICE_PRESSURE, numbers=numbers)
            done.append(sid)
        except Exception as exc:  # noqa: BLE001 (gone already, or merge pending)
            log.warning("pressure eviction of %s: %s", sid, exc)
    return done


# --------------------------------------------------------------------------- the loop


class ControlLoop:
    """The scheduler and its jobs. `run_once()` (used by `enorm autoscale --once`) runs a
    round now, in the caller's thread; `slo_tick()` one tick of the latency loop; both
    serialised with the scheduled ones by a lock."""

    JOB_ID = "enorm-autoscale"
    SLO_JOB_ID = "enorm-slo"

    def __init__(
        self,
        take_snapshot: Callable[[], Snapshot],
        manager: ScalingManager,
        options: Options | None = None,
        interval_s: float = 300.0,
        on_round: Callable[[Round], None] | None = None,
        slo: SloOptions | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not interval_s > 0:
            raise ValueError("interval_s must be > 0")
        self.take_snapshot = take_snapshot
        self.manager = manager
        self.options = options or Options()
        self.interval_s = float(interval_s)
        self.on_round = on_round
        self.slo = slo
        self.clock = clock
        self.last: Round | None = None
        self.last_tick: Round | None = None
        # When each server's limits last changed through this loop (the latency loop's
        # cool-down; a server never changed counts from its launch).
        self.last_change: dict[str, float] = {}
        self._lock = threading.Lock()
        self._jobs: list[tuple[str, float, Callable[[], Any], float]] = []
        self._scheduler: BackgroundScheduler | None = None
        self._wakers: list[tuple[str, int, Callable[[], Any]]] = []
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self.observer: Observer | None = None  # set by `node_loop`
        if slo is not None:
            self.every(self.SLO_JOB_ID, slo.interval_s, self.slo_tick)

    @classmethod
    def from_config(cls, config: Any, take_snapshot: Callable[[], Snapshot],
                    manager: ScalingManager, **kw: Any) -> ControlLoop:
        kw.setdefault("options", Options.from_config(config))
        if getattr(config, "policy", "paper") == "fast":
            kw.setdefault("slo", SloOptions(
                interval_s=config.slo_interval_s, hysteresis=config.slo_hysteresis,
                cooldown_s=config.slo_cooldown_s, down_after_s=config.slo_down_after_s))
        return cls(take_snapshot, manager, interval_s=config.autoscale_interval_s, **kw)

    def every(self, job_id: str, seconds: float, fn: Callable[[], Any],
              first_in_s: float | None = None) -> None:
        """Another job on the same scheduler (before `start`)."""
        self._jobs.append((job_id, float(seconds), fn,
                           float(seconds) if first_in_s is None else first_in_s))

    def wake_on(self, job_id: str, fd: int, fn: Callable[[], Any]) -> None:
        """Also run `fn` whenever `fd` polls POLLPRI (a PSI trigger), between the runs
        of the job of the same name; the loop owns `fd` and closes it at shutdown."""
        self._wakers.append((job_id, fd, fn))

    def _watch(self, job_id: str, fd: int, fn: Callable[[], Any]) -> None:
        p = select.poll()
        p.register(fd, select.POLLPRI)
        run = self._guarded(job_id, fn)
        while not self._stopping.is_set():
            for _, ev in p.poll(200):
                if ev & (select.POLLERR | select.POLLNVAL):
                    return
                run()

    def _record(self, r: Round) -> None:
        now = self.clock()
        for x in r.results:
            if not x.ok:
                continue
            if isinstance(x.action, ScaleUp | ScaleDown):
                self.last_change[x.action.server_id] = now
            elif isinstance(x.action, Terminate):
                self.last_change.pop(x.action.server_id, None)

    def run_once(self) -> Round:
        with self._lock:
            r = run_round(self.take_snapshot, self.manager, self.options)
            self._record(r)
            self.last = r
        if self.on_round is not None:
            try:
                self.on_round(r)
            except Exception:
                log.exception("autoscaler: on_round callback failed")
        return r

    def slo_tick(self) -> Round:
        """One tick of the latency loop (fast mode)."""
        slo = self.slo or SloOptions()
        with self._lock:
            r = run_round(self.take_snapshot, self.manager, self.options,
                          decide=lambda snap: autoscaler.slo_plan(
                              snap, self.last_change, self.clock(), slo, self.options))
            self._record(r)
            self.last_tick = r
        return r

    def _guarded(self, job_id: str, fn: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except Exception:  # a job must outlive a bad run
                log.exception("%s failed", job_id)
        return run

    def start(self, first_run_in_s: float | None = None) -> None:
        """Start the jobs; the first round comes after one interval."""
        if self._scheduler is not None:
            return
        sched = BackgroundScheduler(daemon=True)
        now = datetime.now().astimezone()
        delay = self.interval_s if first_run_in_s is None else first_run_in_s
        for job_id, seconds, fn, first in [(self.JOB_ID, self.interval_s, self.run_once, delay),
                                           *self._jobs]:
            sched.add_job(self._guarded(job_id, fn), "interval", seconds=seconds, id=job_id,
                          max_instances=1, coalesce=True,
                          misfire_grace_time=max(1, math.ceil(seconds)),
                          next_run_time=now + timedelta(seconds=first))
        sched.start()
        self._scheduler = sched
        self._stopping.clear()
        for job_id, fd, fn in self._wakers:
            t = threading.Thread(target=self._watch, args=(job_id, fd, fn), daemon=True,
                                 name=f"{job_id}-trigger")
            t.start()
            self._threads.append(t)

    def job(self, job_id: str) -> Any:
        return None if self._scheduler is None else self._scheduler.get_job(job_id)

    @property
    def running(self) -> bool:
        return self._scheduler is not None and self._scheduler.running

    def shutdown(self, wait: bool = True) -> None:
        self._stopping.set()
        for t in self._threads:
            t.join(timeout=5)
        self._threads.clear()
        for _, fd, _ in self._wakers:
            os.close(fd)
        self._wakers.clear()
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=wait)
            self._scheduler = None


def node_loop(mgr: EdgeManager, on_round: Callable[[dict[str, Any]], None] | None = None
              ) -> ControlLoop:
    """The control loop of a live node, from its config; `on_round` gets each round's
    report (metrics, the dashboard's timeline)."""
    cfg = mgr.node.config
    observer = Observer(mgr)
    hook = None if on_round is None else (lambda r: on_round(round_report(r)))
    loop = ControlLoop.from_config(cfg, observer.snapshot, mgr, on_round=hook)
    loop.observer = observer
    if cfg.pressure_interval_s > 0:
        lock = threading.Lock()  # one look at a time: polled or woken by the kernel

        def look() -> None:
            with lock:
                protect_basic_service(mgr)

        loop.every("enorm-pressure", cfg.pressure_interval_s, look)
        fd = psi_trigger()
        if fd is not None:
            loop.wake_on("enorm-pressure", fd, look)
    loop.every("enorm-migration-retry", cfg.migration_retry_s, mgr.ends.retry_pending)
    return loop
