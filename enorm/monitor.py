"""The Monitor: what is measured of each edge server and of the board, each round.

- network latency to the server's users (`probes`: TCP connect or ICMP, all users at
  once, bounded concurrency, a timeout counted as a loss with a penalty);
- computing latency from the edge server's request log (`requestlog`: only the lines
  since the last look), where the app writes one;
- application latency = network + computing (the paper's definition);
- activity: the last time the server's users sent it anything, from the node's own
  count of the packets to its application ports (`firewall.counters`, every app) and
  from its request log (an app that writes one); idle time runs from the later of
  the two, or from the launch;
- CPU and memory use per container (from the samples the container driver reads);
- the basic service: what the board's own processes use, outside enorm's containers.

It measures and knows nothing of deciding: the control loop turns its `ServerReport`s
into the auto-scaler's snapshot.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import psutil

from enorm.probes import DEFAULT_CONCURRENCY, ProbeMethod, probe
from enorm.protocol import Resources
from enorm.requestlog import LogReader, Request
from enorm.resources import Amount

# --------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class LatencyStats:
    """Mean and 95th percentile of a set of samples (ms); `lost` samples were penalised."""

    count: int
    mean_ms: float
    p95_ms: float
    lost: int = 0


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of an ascending sequence."""
    if not sorted_values:
        raise ValueError("no values")
    k = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return float(sorted_values[min(k, len(sorted_values)) - 1])


def stats(values: Iterable[float], lost: int = 0) -> LatencyStats | None:
    v = sorted(values)
    if not v:
        return None
    return LatencyStats(len(v), sum(v) / len(v), percentile(v, 95), lost)


def network_stats(rtts: Iterable[float | None], loss_penalty_ms: float) -> LatencyStats | None:
    """RTTs of one server's users; a lost probe (None) counts as `loss_penalty_ms`."""
    vals: list[float] = []
    lost = 0
    for r in rtts:
        if r is None:
            lost += 1
            vals.append(loss_penalty_ms)
        else:
            vals.append(r)
    return stats(vals, lost)


def idle_for(now: float, last_request_at: float | None, since: float) -> float:
    """Seconds without activity (a request, a packet from a user); a server that never
    had any is idle since `since` (its launch)."""
    last = since if last_request_at is None else max(last_request_at, since)
    return max(0.0, now - last)


def application_latency(network_ms: float | None, computing_ms: float | None) -> float | None:
    """The paper's application latency = network + computing. With one part unknown, the
    other alone; with both unknown, None."""
    if network_ms is None and computing_ms is None:
        return None
    return (network_ms or 0.0) + (computing_ms or 0.0)


def improvable(network_ms: float | None, objective_ms: float) -> bool:
    """More edge resources cannot help when the network alone is over the objective."""
    return network_ms is None or network_ms < objective_ms


@dataclass(frozen=True)
class ComputingStats:
    count: int
    mean_ms: float | None
    p95_ms: float | None
    last_request_at: float | None


def computing_stats(requests: Sequence[Request]) -> ComputingStats:
    if not requests:
        return ComputingStats(0, None, None, None)
    s = stats(r.duration_ms for r in requests)
    assert s is not None
    return ComputingStats(s.count, s.mean_ms, s.p95_ms, max(r.at for r in requests))


# --------------------------------------------------------------------------- cgroups


@dataclass(frozen=True)
class CgroupSample:
    at: float  # time.monotonic() of the reading
    cpu_ns: int  # cumulative CPU time of the cgroup
    memory_bytes: int


def cores_used(prev: CgroupSample, cur: CgroupSample) -> float:
    """Average cores used between two samples: delta CPU time / delta wall time."""
    dt = cur.at - prev.at
    if dt <= 0:
        return 0.0
    return max(0.0, (cur.cpu_ns - prev.cpu_ns) / 1e9 / dt)


def usage(prev: CgroupSample | None, cur: CgroupSample) -> Amount:
    """A container's use: cores over the interval (0 without a previous sample), memory now."""
    return Amount(0.0 if prev is None else cores_used(prev, cur), cur.memory_bytes / (1 << 20))


# --------------------------------------------------------------------------- basic service


def basic_service(
    total_cores_used: float, total_memory_mb: float, containers: Iterable[Amount]
) -> Resources:
    """What the board's own processes use: the whole machine minus enorm's containers."""
    c = m = 0.0
    for a in containers:
        c += a.cores
        m += a.memory_mb
    return Resources(
        cores=round(max(0.0, total_cores_used - c), 3),
        memory_mb=int(max(0.0, total_memory_mb - m)),
    )


@dataclass
class HostSampler:
    """Machine-wide CPU and memory use from psutil, CPU as cores over the interval."""

    _prev: tuple[float, float] | None = None  # (monotonic, busy cpu seconds)

    def sample(self) -> tuple[float, float]:
        """(cores used since the previous call, memory used in MB now)."""
        t = psutil.cpu_times()
        busy = sum(t) - t.idle - getattr(t, "iowait", 0.0)
        now = time.monotonic()
        cores = 0.0
        if self._prev is not None and now > self._prev[0]:
            cores = max(0.0, (busy - self._prev[1]) / (now - self._prev[0]))
        self._prev = (now, busy)
        vm = psutil.virtual_memory()
        return cores, (vm.total - vm.available) / (1 << 20)


# --------------------------------------------------------------------------- the monitor


@dataclass(frozen=True)
class ServerInput:
    """What the Monitor needs of one server."""

    server_id: str
    created_at: float
    latency_objective_ms: float
    user_addresses: Sequence[str] = ()
    log_path: str | os.PathLike[str] | None = None
    # The tenant's writable layer the log lies in: nothing below it is trusted.
    log_root: str | os.PathLike[str] | None = None
    # Packets its users sent to its application ports so far (the node's own count;
    # None: not counted).
    packets: int | None = None


@dataclass(frozen=True)
class ServerReport:
    """Everything measured about one server in one round (also for /metrics)."""

    server_id: str
    network: LatencyStats | None
    computing: ComputingStats
    latency_ms: float | None
    idle_for_s: float
    improvable: bool

    @property
    def network_ms(self) -> float | None:
        return None if self.network is None else self.network.mean_ms


@dataclass
class Monitor:
    """Measures the servers, round after round.

    `statistic` chooses which number stands for a server's latency: "mean" (default) or
    "p95". Keeps, per server, the log offsets and the last request time across rounds.
    """

    method: ProbeMethod = "tcp"
    probe_port: int = 7
    probe_timeout_s: float = 0.5
    loss_penalty_ms: float = 1000.0
    concurrency: int = DEFAULT_CONCURRENCY
    statistic: Literal["mean", "p95"] = "mean"
    source: str = ""  # the local address probes leave from ("": the route's)
    logs: LogReader = field(default_factory=LogReader)
    last_request: dict[str, float] = field(default_factory=dict)  # last activity
    packets: dict[str, int] = field(default_factory=dict)
    last_reports: dict[str, ServerReport] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Any, **kw: Any) -> Monitor:
        return cls(
            method=config.probe,
            probe_port=config.probe_port,
            probe_timeout_s=config.probe_timeout_s,
            loss_penalty_ms=config.loss_penalty_ms,
            source=str(config.probe_source or ""),
            **kw,
        )

    def measure(
        self, inputs: Sequence[ServerInput], now: float | None = None
    ) -> dict[str, ServerReport]:
        now = time.time() if now is None else now
        everyone = [a for i in inputs for a in map(str, i.user_addresses)]
        rtts = probe(everyone, self.method, self.probe_port, self.probe_timeout_s,
                     self.concurrency, self.source)
        reports: dict[str, ServerReport] = {}
        for i in inputs:
            sid = i.server_id
            net = None
            if self.method != "none":
                net = network_stats(
                    (rtts.get(str(a)) for a in i.user_addresses), self.loss_penalty_ms
                )
            reqs = (self.logs.read_new(i.log_path, i.log_root)
                    if i.log_path is not None else [])
            comp = computing_stats(reqs)
            if comp.last_request_at is not None:
                self.last_request[sid] = max(self.last_request.get(sid, 0.0), comp.last_request_at)
            if i.packets is not None:
                if i.packets != self.packets.get(sid, 0):  # more, or a rule made anew
                    self.last_request[sid] = now
                self.packets[sid] = i.packets
            pick = (lambda s: s.p95_ms) if self.statistic == "p95" else (lambda s: s.mean_ms)
            net_ms = pick(net) if net is not None else None
            comp_ms = pick(comp) if comp.count else None
            reports[sid] = ServerReport(
                server_id=sid,
                network=net,
                computing=comp,
                latency_ms=application_latency(net_ms, comp_ms),
                idle_for_s=idle_for(now, self.last_request.get(sid), i.created_at),
                improvable=improvable(net_ms, i.latency_objective_ms),
            )
        live = {i.server_id for i in inputs}
        for seen in (self.last_request, self.packets):
            for gone in set(seen) - live:
                seen.pop(gone, None)
        self.last_reports = reports
        return reports


def cgroup_usage(
    samples: Mapping[str, CgroupSample], prev: Mapping[str, CgroupSample]
) -> dict[str, Amount]:
    """Per-container use from this round's and the previous round's samples."""
    return {k: usage(prev.get(k), v) for k, v in samples.items()}
