"""What the node exposes at /metrics, in Prometheus conventions.

Two kinds of figure, kept apart on purpose:
- state (capacity, allocations, each server's limits, use and latency) is read at scrape
  time from the store and the kernel by a collector, so it can never drift from reality
  and a terminated server's series simply disappear;
- history (handshakes, terminations, scaling actions, merged keys, round times) is
  counted as it happens, from the node's events and auto-scaling rounds.

Labels are bounded: `server`/`app`/`owner` only on per-server series (as many as the
node can hold), and `reason`/`kind` only from the node's own fixed vocabularies.
Every metric is listed in docs/metrics.md (a test holds the table to the exposition).
prometheus_client's `*_created` series (when each counter was made: the daemon's start)
are off: they say nothing `process_start_time_seconds` would not.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from enorm.protocol import Event, Resources

if TYPE_CHECKING:
    from enorm.node import Node

log = logging.getLogger(__name__)
disable_created_metrics()

MB = 1024 * 1024
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
STATES = ("launching", "running", "terminating", "migration_pending")


def units(limits: Resources, unit: Resources) -> float:
    """How many of the node's units a server holds (the larger of its two dimensions)."""
    by_cores = limits.cores / unit.cores if unit.cores else 0.0
    by_mem = limits.memory_mb / unit.memory_mb if unit.memory_mb else 0.0
    return round(max(by_cores, by_mem), 3)


class _StateCollector(Collector):
    """Node and per-server state, read fresh at every scrape."""

    def __init__(self, metrics: NodeMetrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Metric]:
        node = self.m.node
        try:
            servers = node.store.servers()
        except Exception as exc:  # the store is gone: say so rather than fail the scrape
            log.warning("metrics: store unavailable: %s", exc)
            up = GaugeMetricFamily("enorm_store_up", "1 when the node's store answers")
            up.add_metric([], 0)
            yield up
            return
        up = GaugeMetricFamily("enorm_store_up", "1 when the node's store answers")
        up.add_metric([], 1)
        yield up
        yield from self._node(node, servers)
        yield from self._servers(node, servers)

    def _node(self, node: Node, servers: list) -> Iterator[Metric]:
        alloc = node.allocator
        allocated = node.allocated()
        figures = {
            "capacity": alloc.capacity,
            "reserve": alloc.reserve,
            "basic_service": alloc.basic,
            "allocated": allocated,
            "free": alloc.free(allocated),
        }
        cores = GaugeMetricFamily("enorm_node_cores", "Cores of the node by kind: capacity, "
                                  "reserve, basic_service, allocated, free", labels=["kind"])
        mem = GaugeMetricFamily("enorm_node_memory_bytes", "Memory of the node by kind "
                                "(as enorm_node_cores)", labels=["kind"])
        for kind, r in figures.items():
            cores.add_metric([kind], r.cores)
            mem.add_metric([kind], r.memory_mb * MB)
        yield cores
        yield mem
        unit_c = GaugeMetricFamily("enorm_node_unit_cores", "Cores in one scaling unit")
        unit_c.add_metric([], node.unit.cores)
        unit_m = GaugeMetricFamily("enorm_node_unit_memory_bytes", "Memory in one scaling unit")
        unit_m.add_metric([], node.unit.memory_mb * MB)
        yield unit_c
        yield unit_m
        count = GaugeMetricFamily("enorm_servers", "Edge servers on the node by state",
                                  labels=["state"])
        for state in STATES:
            count.add_metric([state], sum(1 for s in servers if s.state == state))
        yield count
        pending = GaugeMetricFamily("enorm_events_undelivered",
                                    "Events waiting in the outbox for the cloud's callback")
        pending.add_metric([], self.m.outbox_size())
        yield pending
        layers = node.containers.layers
        ready = GaugeMetricFamily("enorm_layer_pool_ready",
                                  "Writable layers made ahead, ready for a handshake")
        ready.add_metric([], layers.ready())
        yield ready
        takes = CounterMetricFamily("enorm_layer_pool_takes", "Handshakes that found a "
                                    "writable layer ready (hit) or made their own (miss)",
                                    labels=["result"])
        takes.add_metric(["hit"], layers.taken)
        takes.add_metric(["miss"], layers.missed)
        yield takes
        held = GaugeMetricFamily("enorm_releases_pending", "Terminated servers whose "
                                 "forwards, container and guard are still being removed")
        held.add_metric([], len(node.releases.held()))
        yield held
        retried = CounterMetricFamily("enorm_release_retries", "Releases tried again after "
                                      "a failure (its address and ports held meanwhile)")
        retried.add_metric([], node.releases.retries)
        yield retried

    def _servers(self, node: Node, servers: list) -> Iterator[Metric]:
        lbl = ["server", "app", "owner"]

        def fam(name: str, doc: str, extra: list[str] | None = None) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=lbl + (extra or []))

        prio = fam("enorm_server_priority", "The server's priority (higher is more important)")
        n_units = fam("enorm_server_units", "Scaling units the server holds")
        cpu_lim = fam("enorm_server_cpu_limit_cores", "The server's CPU limit")
        mem_lim = fam("enorm_server_memory_limit_bytes", "The server's memory limit")
        mem_use = fam("enorm_server_memory_usage_bytes", "Memory the container uses now")
        cpu_use = CounterMetricFamily("enorm_server_cpu_seconds",
                                      "CPU time the container has used", labels=lbl)
        users = fam("enorm_server_users", "Users the server serves")
        state = fam("enorm_server_state", "1 for the server's current state", ["state"])
        objective = fam("enorm_server_latency_objective_seconds",
                        "The server's application latency objective")
        latency = fam("enorm_server_latency_seconds", "Latency measured in the last "
                      "auto-scaling round, by part: application = network + computing",
                      ["part"])
        measured = self.m.last_measured
        for s in servers:
            v = [s.id, s.app, s.owner]
            prio.add_metric(v, s.priority)
            n_units.add_metric(v, units(s.limits, node.unit))
            cpu_lim.add_metric(v, s.limits.cores)
            mem_lim.add_metric(v, s.limits.memory_mb * MB)
            users.add_metric(v, s.users)
            objective.add_metric(v, s.latency_objective_ms / 1000)
            for st in STATES:
                state.add_metric(v + [st], 1.0 if s.state == st else 0.0)
            if s.state == "running":
                try:
                    u = node.containers.usage(s.container)
                except Exception:  # stopped or gone between the listing and now
                    pass
                else:
                    mem_use.add_metric(v, u.memory_bytes)
                    cpu_use.add_metric(v, u.cpu_ns / 1e9)
            for part, ms in measured.get(s.id, {}).items():
                if ms is not None:
                    latency.add_metric(v + [part], ms / 1000)
        yield from (prio, n_units, cpu_lim, mem_lim, mem_use, cpu_use, users, state,
                    objective, latency)


class NodeMetrics:
    """The node's registry: a state collector plus counters fed by events and rounds."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.registry = CollectorRegistry()
        # server id -> {"application": ms, "network": ms, "computing": ms}
        self.last_measured: dict[str, dict[str, float | None]] = {}
        # The last rounds' decisions, newest last, for the dashboard's timeline.
        self.recent_rounds: deque[dict[str, Any]] = deque(maxlen=20)
        r = self.registry
        self.handshakes = Counter("enorm_handshakes", "Setup requests answered, by result "
                                  "(accepted, rejected) and reason of a rejection",
                                  ["result", "reason"], registry=r)
        self.handshake_seconds = Histogram("enorm_handshake_duration_seconds",
                                           "Handshake (admission + launch) duration",
                                           registry=r, buckets=DURATION_BUCKETS)
        self.deployments = Counter("enorm_deployments", "Containers launched and handed to "
                                   "a cloud manager for deployment", registry=r)
        self.terminations = Counter("enorm_terminations", "Servers terminated, by reason",
                                    ["reason"], registry=r)
        self.termination_seconds = Histogram("enorm_termination_duration_seconds",
                                             "Termination (merge + destroy) duration, as "
                                             "the API's caller saw it", registry=r,
                                             buckets=DURATION_BUCKETS)
        self.migration_failures = Counter("enorm_migration_failures",
                                          "Merges back to the cloud that failed (server "
                                          "kept, migration pending)", registry=r)
        self.scaling = Counter("enorm_scaling_actions", "Limits changed, by kind (up, "
                               "down, restore) and reason", ["kind", "reason"], registry=r)
        self.keys = Counter("enorm_migrated_keys", "Keys merged back to the cloud (written, "
                            "or untouched), shared keys included", registry=r)
        self.untouched = Counter("enorm_untouched_keys", "Of the keys merged back, those "
                                 "the edge left as copied: not written, the cloud's value "
                                 "stands", registry=r)
        self.merge_seconds = Histogram("enorm_merge_duration_seconds",
                                       "Duration of merging a server's data back",
                                       registry=r, buckets=DURATION_BUCKETS)
        self.rounds = Counter("enorm_autoscale_rounds", "Auto-scaling rounds, by result "
                              "(ok, error)", ["result"], registry=r)
        self.round_seconds = Histogram("enorm_autoscale_round_duration_seconds",
                                       "Duration of one auto-scaling round", registry=r,
                                       buckets=DURATION_BUCKETS)
        self.undocumented = Counter("enorm_api_undocumented_answers", "API answers whose "
                                    "status the route's OpenAPI entry does not list (a bug)",
                                    ["operation", "status"], registry=r)
        r.register(_StateCollector(self))

    def outbox_size(self) -> int:
        try:
            return len(self.node.store.outbox())
        except Exception:
            return 0

    # -- fed by the node -------------------------------------------------------------------
    def handshake(self, accepted: bool, reason: str = "", seconds: float | None = None) -> None:
        self.handshakes.labels("accepted" if accepted else "rejected", reason).inc()
        if seconds is not None:
            self.handshake_seconds.observe(seconds)

    def on_event(self, ev: Event) -> None:
        d = ev.data
        if ev.type == "server.launched":
            self.deployments.inc()
        elif ev.type == "server.terminated":
            self.terminations.labels(ev.reason).inc()
            self.keys.inc(int(d.get("keys_migrated") or 0))
            self.untouched.inc(int(d.get("untouched") or 0))
            if d.get("merge_s") is not None:
                self.merge_seconds.observe(float(d["merge_s"]))
            self.last_measured.pop(ev.server_id, None)
        elif ev.type == "server.migration_failed":
            self.migration_failures.inc()
        elif ev.type == "server.scaled":
            self.scaling.labels(scale_kind(d), ev.reason).inc()

    def on_round(self, report: dict[str, Any]) -> None:
        """A round's report (control_loop.round_report): its time and what it measured."""
        self.rounds.labels("error" if report.get("error") else "ok").inc()
        if report.get("duration_s") is not None:
            self.round_seconds.observe(report["duration_s"])
        self.last_measured = {
            s["id"]: {"application": s.get("latency_ms"), "network": s.get("network_ms"),
                      "computing": s.get("computing_ms")}
            for s in report.get("servers", [])
        }
        self.recent_rounds.append({
            "at": report.get("started_at"), "duration_s": report.get("duration_s"),
            "error": report.get("error"),
            "actions": [{"action": a.get("action"), "server_id": a.get("server_id"),
                         "reason": a.get("reason")} for a in report.get("plan", [])],
        })


def scale_kind(data: dict) -> str:
    """up / down from a server.scaled event's limits, or the kind the event names."""
    if "kind" in data:
        return str(data["kind"])
    old, new = data.get("from") or {}, data.get("to") or {}
    grew = (new.get("cores", 0) - old.get("cores", 0), new.get("memory_mb", 0)
            - old.get("memory_mb", 0))
    return "up" if max(grew) > 0 else "down"
