"""One auto-scaling round on a live node: what the Edge Manager hands the Monitor.

The Monitor and the auto-scaler's plan know nothing of LXC or the store; this module
gathers their inputs (running servers, their users, request logs, cgroup usage, the
machine's use) and updates the Resource Allocator's view of the basic service.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from enorm import autoscaler, monitor
from enorm.manager import EdgeManager
from enorm.protocol import Resources

REQUEST_LOG = "var/log/enorm-app/requests.log"


class NodeRound:
    """Builds snapshots of one node, round after round (keeps the previous samples)."""

    def __init__(self, mgr: EdgeManager) -> None:
        self.mgr = mgr
        self.monitor = monitor.Monitor.from_config(mgr.cfg, statistic=mgr.cfg.statistic)
        self.host = monitor.HostSampler()
        self.host.sample()  # the first interval starts now
        self.prev: dict[str, monitor.CgroupSample] = {}

    def _usage(self, names: list[str]) -> dict[str, autoscaler.Amount]:
        samples = {}
        now = time.monotonic()
        for name in names:
            try:
                u = self.mgr.containers.usage(name)
            except Exception:  # a container that vanished meanwhile uses nothing
                continue
            samples[name] = monitor.CgroupSample(now, u.cpu_ns, u.memory_bytes)
        used = monitor.cgroup_usage(samples, self.prev)
        self.prev = samples
        return used

    def snapshot(self) -> autoscaler.Snapshot:
        mgr = self.mgr
        mgr.enforce_limits()  # the round plans from the limits the store holds
        servers = mgr.store.servers()
        running = [s for s in servers if s.state == "running"]
        used = self._usage([s.container for s in running])
        if mgr.cfg.basic_service == "measured":
            cores, mem = self.host.sample()
            mgr.allocator.basic = monitor.basic_service(cores, mem, used.values())
        addresses = mgr.store.user_addresses([s.id for s in running])
        inputs = [
            monitor.ServerInput(
                info=s.info(),
                user_addresses=addresses[s.id],
                log_path=mgr.containers.delta_dir(s.container) / REQUEST_LOG,
                log_root=mgr.containers.delta_dir(s.container),
            )
            for s in running
        ]
        free = monitor.free_after(
            mgr.allocator.capacity, mgr.allocator.basic,
            [s.limits for s in servers if s.state != "migration_pending"],
            mgr.allocator.reserve,
        )
        return self.monitor.snapshot(inputs, free, mgr.unit)


def round_report(r: autoscaler.Round) -> dict[str, Any]:
    """A round as JSON: what was seen, planned and done (for the API and the CLI)."""

    def action(a: autoscaler.Action) -> dict:
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


def scheduler_for(mgr: EdgeManager, on_round: Callable[[dict[str, Any]], None] | None = None
                  ) -> autoscaler.Scheduler:
    """The node's auto-scaler: a round every `autoscale_interval_s`; `on_round` gets each
    round's report (metrics, the dashboard's timeline)."""
    node_round = NodeRound(mgr)
    hook = None if on_round is None else (lambda r: on_round(round_report(r)))
    return autoscaler.Scheduler.from_config(mgr.cfg, node_round.snapshot, mgr, on_round=hook)
