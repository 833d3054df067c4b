"""The Monitor: what the Auto-scaler needs to know about each edge server, each round.

- network latency to the server's users (a TCP-connect or ICMP probe, all users at once,
  bounded concurrency, timeout counted as loss with a penalty);
- computing latency from the edge server's request log (only the lines since the last
  round);
- application latency = network + computing (the paper's definition);
- CPU and memory use per container from its cgroup files (v1 and v2);
- the basic service: what the board's own processes use, outside enorm's containers.

The pure parts (statistics, log parsing, idle time, cgroup parsing, basic service) are
plain functions; `Monitor` ties them to the clock and the network and builds the
auto-scaler's `Snapshot`.

Probe choice: TCP connect is the default. It needs no privilege, every TCP stack answers
it (SYN-ACK from an open port, RST from a closed one: both give one RTT), and it crosses
the NATs/firewalls that let the game's own TCP traffic through. Successful probes are
closed with SO_LINGER 0 (an RST), so 16k probes leave no TIME_WAIT sockets behind. ICMP
echo is the option for networks that drop unsolicited SYNs: one socket for all users,
unprivileged (datagram ICMP, when net.ipv4.ping_group_range admits our group) or raw
(as root); one socket means no per-user file descriptor at all.
"""

from __future__ import annotations

import errno
import math
import os
import resource
import select
import selectors
import socket
import stat
import struct
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import psutil

from enorm.autoscaler import DEFAULT_UNIT, Amount, NodeSnapshot, ServerSnapshot, Snapshot
from enorm.protocol import Resources, ServerInfo

ProbeMethod = Literal["tcp", "icmp", "none"]
DEFAULT_CONCURRENCY = 1024


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


# --------------------------------------------------------------------------- probes


def _fd_budget(requested: int) -> int:
    """Concurrency that the open-files limit allows (leave room for everything else)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return max(1, requested)
    return max(1, min(requested, soft - 128))


def _close_rst(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN: no TIME_WAIT socket per probe."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


# A SYN-ACK (connected) or an RST (ECONNREFUSED) both mean the host answered: one RTT.
# New connects started between two polls: bounds how long a reply waits to be
# timestamped (~15 us per connect here, so ~0.5 ms), unlike starting all `concurrency`.
_BURST = 32
_IN_PROGRESS = (errno.EINPROGRESS, errno.EAGAIN, errno.EALREADY)


def probe_tcp(
    addresses: Iterable[str],
    port: int,
    timeout: float = 0.5,
    concurrency: int = DEFAULT_CONCURRENCY,
) -> dict[str, float | None]:
    """TCP-connect RTT (ms) to each distinct address; None = no answer within `timeout`.

    One thread, non-blocking connects, at most `concurrency` in flight (capped by the
    open-files limit), one epoll, new connects in bursts of `_BURST` between polls. The
    reply time is read right after the poll returns, not when a coroutine resumes:
    with asyncio, scheduling delay inflated the loopback RTT to ~70 ms at 1024 in flight.
    The loop works on bare file descriptors (epoll, not `selectors`): at 16,384 users the
    per-probe Python overhead is most of the cost of a round. Worst case (all lost) the
    probe lasts about ceil(n / concurrency) * timeout.
    """
    addrs = list(dict.fromkeys(str(a) for a in addresses))
    result: dict[str, float | None] = dict.fromkeys(addrs)
    limit = _fd_budget(concurrency)
    ep = select.epoll()
    inflight: dict[int, tuple[socket.socket, str, float]] = {}  # fd -> (socket, addr, t0)
    deadlines: deque[tuple[float, int, socket.socket]] = deque()  # FIFO: one timeout
    todo = iter(addrs)
    exhausted = False
    clock = time.perf_counter
    stream = socket.SOCK_STREAM | socket.SOCK_NONBLOCK
    out = select.EPOLLOUT

    def finish(fd: int) -> None:
        sock = inflight.pop(fd)[0]
        ep.unregister(fd)
        _close_rst(sock)

    try:
        while True:
            started = 0
            while not exhausted and len(inflight) < limit and started < _BURST:
                started += 1
                a = next(todo, None)
                if a is None:
                    exhausted = True
                    break
                sock = socket.socket(socket.AF_INET6 if ":" in a else socket.AF_INET, stream)
                t0 = clock()
                err = sock.connect_ex((a, port))
                if err in _IN_PROGRESS:
                    fd = sock.fileno()
                    ep.register(fd, out)
                    inflight[fd] = (sock, a, t0)
                    deadlines.append((t0 + timeout, fd, sock))
                    continue
                if err == 0:  # connected at once (loopback)
                    result[a] = (clock() - t0) * 1000.0
                    _close_rst(sock)
                    continue
                if err == errno.ECONNREFUSED:  # refused at once: answered, no TIME_WAIT
                    result[a] = (clock() - t0) * 1000.0
                sock.close()  # else unreachable etc.: loss
            if not inflight:
                break
            while deadlines and inflight.get(deadlines[0][1], (None,))[0] is not deadlines[0][2]:
                deadlines.popleft()
            wait = max(0.0, deadlines[0][0] - clock())
            if not exhausted and len(inflight) < limit:
                wait = 0.0  # harvest, then start the next burst
            events = ep.poll(wait)
            now = clock()
            for fd, _ in events:
                sock, a, t0 = inflight.pop(fd)
                ep.unregister(fd)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err == 0:
                    result[a] = (now - t0) * 1000.0
                    _close_rst(sock)  # established: close with an RST
                else:
                    if err == errno.ECONNREFUSED:
                        result[a] = (now - t0) * 1000.0
                    sock.close()  # never established: nothing lingers
            now = clock()
            while deadlines and deadlines[0][0] <= now:
                _, fd, sock = deadlines.popleft()
                if inflight.get(fd, (None,))[0] is sock:
                    finish(fd)  # timeout: loss
    finally:
        for fd in list(inflight):
            finish(fd)
        ep.close()
    return result


def _icmp_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def _icmp_socket() -> tuple[socket.socket, bool]:
    """A datagram ICMP socket if allowed, else raw (root). Returns (socket, is_raw)."""
    try:
        return socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP), False
    except PermissionError:
        return socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP), True


def probe_icmp(
    addresses: Iterable[str],
    timeout: float = 0.5,
    concurrency: int = DEFAULT_CONCURRENCY,
) -> dict[str, float | None]:
    """ICMP echo RTT (ms) to each distinct IPv4 address over one socket; None = lost.

    Requests go out in bursts of 64, with the socket drained between bursts, and at most
    `concurrency` unanswered at once; replies are matched by (address, sequence). A reply
    later than `timeout` is a loss. IPv6 addresses count as lost.
    """
    addrs = list(dict.fromkeys(str(a) for a in addresses))
    result: dict[str, float | None] = dict.fromkeys(addrs)
    v4 = [a for a in addrs if ":" not in a]
    if not v4:
        return result
    sock, raw = _icmp_socket()
    sock.setblocking(False)
    for opt in (getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF):
        if opt is None:
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, 8 << 20)
            break
        except OSError:
            continue
    ident = os.getpid() & 0xFFFF
    payload = b"enorm-probe"
    pending: dict[tuple[str, int], float] = {}  # (address, seq) -> sent at
    order: deque[tuple[float, tuple[str, int]]] = deque()
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)

    def drain() -> None:
        while True:
            try:
                data, (src, _) = sock.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                return
            now = time.perf_counter()
            if raw:
                data = data[(data[0] & 0x0F) * 4 :]  # strip the IP header
            if len(data) < 8 or data[0] != 0:  # echo replies only
                continue
            rid, seq = struct.unpack("!HH", data[4:8])
            if raw and rid != ident:
                continue  # somebody else's ping (datagram sockets filter for us)
            sent = pending.pop((src, seq), None)
            if sent is not None and now - sent <= timeout:
                result[src] = (now - sent) * 1000.0

    def expire() -> None:
        now = time.perf_counter()
        while order and (order[0][1] not in pending or order[0][0] <= now):
            _, key = order.popleft()
            pending.pop(key, None)

    try:
        i = 0
        while i < len(v4) or pending:
            burst = 0
            while i < len(v4) and burst < 64 and len(pending) < max(1, concurrency):
                a, seq = v4[i], i & 0xFFFF
                hdr = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + payload
                pkt = struct.pack("!BBHHH", 8, 0, _icmp_checksum(hdr), ident, seq) + payload
                t0 = time.perf_counter()
                try:
                    sock.sendto(pkt, (a, 0))
                except OSError:
                    pass  # unreachable at once: loss
                else:
                    pending[(a, seq)] = t0
                    order.append((t0 + timeout, (a, seq)))
                i += 1
                burst += 1
            drain()
            expire()
            if pending and (i >= len(v4) or len(pending) >= concurrency):
                wait = max(0.0, order[0][0] - time.perf_counter()) if order else 0.0
                if sel.select(wait):
                    drain()
                expire()
    finally:
        sel.close()
        sock.close()
    return result


def probe(
    addresses: Iterable[str],
    method: ProbeMethod = "tcp",
    port: int = 7,
    timeout: float = 0.5,
    concurrency: int = DEFAULT_CONCURRENCY,
) -> dict[str, float | None]:
    """Probe all addresses at once (blocking); RTT in ms or None (lost / not probed)."""
    addrs = list(addresses)
    if method == "none" or not addrs:
        return dict.fromkeys(map(str, addrs))
    if method == "tcp":
        return probe_tcp(addrs, port, timeout, concurrency)
    if method == "icmp":
        return probe_icmp(addrs, timeout, concurrency)
    raise ValueError(f"unknown probe method {method!r}")


# --------------------------------------------------------------------------- request log


@dataclass(frozen=True)
class Request:
    at: float
    path: str
    duration_ms: float


def parse_line(line: str) -> Request | None:
    """`<unix ts> <path> <duration_ms>`; None for a malformed line. Paths may hold spaces."""
    parts = line.split()
    if len(parts) < 3:
        return None
    try:
        at, dur = float(parts[0]), float(parts[-1])
    except ValueError:
        return None
    if not (math.isfinite(at) and math.isfinite(dur)) or dur < 0:
        return None
    return Request(at, " ".join(parts[1:-1]), dur)


def parse_lines(lines: Iterable[str]) -> tuple[list[Request], int]:
    """Parsed requests and the number of malformed (skipped) lines."""
    out: list[Request] = []
    bad = 0
    for line in lines:
        if not line.strip():
            continue
        r = parse_line(line)
        if r is None:
            bad += 1
        else:
            out.append(r)
    return out, bad


MAX_LOG_READ = 8 << 20  # per server and round: a tenant's huge log costs us no more


class _NotRegular(Exception):
    """The request log is not a regular file (a FIFO would block the round, a device or
    /dev/zero would never end)."""


def _open_beneath(root: Path, path: str):
    """Open `path`, which lies under `root`, following no symbolic link below `root`
    (a tenant's link to a host file is refused), without blocking, regular files only."""
    parts = Path(path).relative_to(root).parts
    flags = os.O_RDONLY | os.O_CLOEXEC
    fd = os.open(root, flags | os.O_DIRECTORY)
    try:
        for p in parts[:-1]:
            nxt = os.open(p, flags | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nxt
        leaf = os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(os.fstat(leaf).st_mode):
        os.close(leaf)
        raise _NotRegular(path)
    return os.fdopen(leaf, "rb")


@dataclass
class _LogPos:
    dev: int
    ino: int
    offset: int


class LogReader:
    """Reads each request log incrementally: only what was appended since the last call.

    Keeps (device, inode, offset) per path. A new inode (rotated: the old file renamed, a
    new one created) or a file shorter than the offset (truncated, `> log`) restarts at
    the beginning. A last line without its newline is left for the next call. Lines
    written to a rotated file after our last read are not seen (the price of not holding
    files open).
    """

    def __init__(self, max_read: int = MAX_LOG_READ) -> None:
        self._pos: dict[str, _LogPos] = {}
        self.malformed = 0
        self.refused = 0  # logs that were a link, a FIFO, a device...: not read
        self.max_read = max_read

    def read_new(self, path: str | os.PathLike[str],
                 beneath: str | os.PathLike[str] | None = None) -> list[Request]:
        """What was appended since the last call. With `beneath` (the container's
        writable layer), the tenant owns every component of the path below it: no link
        is followed, and only a regular file is read, at most `max_read` bytes a call."""
        key = str(path)
        try:
            f = open(key, "rb") if beneath is None else _open_beneath(Path(beneath), key)
        except FileNotFoundError:
            self._pos.pop(key, None)
            return []
        except (_NotRegular, OSError):
            self._pos.pop(key, None)
            self.refused += 1
            return []
        with f:
            st = os.fstat(f.fileno())
            pos = self._pos.get(key)
            if (
                pos is None
                or (pos.dev, pos.ino) != (st.st_dev, st.st_ino)
                or st.st_size < pos.offset
            ):
                pos = _LogPos(st.st_dev, st.st_ino, 0)
            f.seek(pos.offset)
            data = f.read(self.max_read)
        end = data.rfind(b"\n")
        if end < 0:
            if len(data) >= self.max_read:  # one line longer than we read: skip it
                pos.offset += len(data)
                self.malformed += 1
            self._pos[key] = pos
            return []
        pos.offset += end + 1
        self._pos[key] = pos
        reqs, bad = parse_lines(data[: end + 1].decode("utf-8", "replace").splitlines())
        self.malformed += bad
        return reqs

    def forget(self, path: str | os.PathLike[str]) -> None:
        self._pos.pop(str(path), None)


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


def idle_for(now: float, last_request_at: float | None, since: float) -> float:
    """Seconds without a request; a server that never had one is idle since `since`
    (its launch)."""
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


# --------------------------------------------------------------------------- cgroups


@dataclass(frozen=True)
class CgroupSample:
    at: float  # time.monotonic() of the reading
    cpu_ns: int  # cumulative CPU time of the cgroup
    memory_bytes: int


def _read_int(p: Path) -> int:
    return int(p.read_text().strip())


def read_cgroup(
    cpu_dir: str | os.PathLike[str],
    memory_dir: str | os.PathLike[str] | None = None,
    at: float | None = None,
) -> CgroupSample:
    """CPU time and memory use of one cgroup, v1 or v2 (detected from the files).

    v2: `cpu.stat` usage_usec and `memory.current` (one directory).
    v1: `cpuacct.usage` (ns) in the cpuacct hierarchy and `memory.usage_in_bytes` in the
    memory hierarchy (give both directories; they differ in v1).
    """
    cpu = Path(cpu_dir)
    mem = Path(memory_dir) if memory_dir is not None else cpu
    if (cpu / "cpuacct.usage").exists():
        cpu_ns = _read_int(cpu / "cpuacct.usage")
    elif (cpu / "cpu.stat").exists():
        cpu_ns = -1
        for line in (cpu / "cpu.stat").read_text().splitlines():
            k, _, v = line.partition(" ")
            if k == "usage_usec":
                cpu_ns = int(v) * 1000
                break
        if cpu_ns < 0:
            raise ValueError(f"{cpu / 'cpu.stat'} has no usage_usec")
    else:
        raise FileNotFoundError(f"no cpuacct.usage or cpu.stat in {cpu}")
    if (mem / "memory.usage_in_bytes").exists():
        mem_b = _read_int(mem / "memory.usage_in_bytes")
    elif (mem / "memory.current").exists():
        mem_b = _read_int(mem / "memory.current")
    else:
        raise FileNotFoundError(f"no memory.usage_in_bytes or memory.current in {mem}")
    return CgroupSample(time.monotonic() if at is None else at, cpu_ns, mem_b)


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
    """What the Edge Manager hands the Monitor about one server."""

    info: ServerInfo
    user_addresses: Sequence[str] = ()
    log_path: str | os.PathLike[str] | None = None
    # The tenant's writable layer the log lies in: nothing below it is trusted.
    log_root: str | os.PathLike[str] | None = None


@dataclass(frozen=True)
class ServerReport:
    """Everything measured about one server in one round (also for /metrics)."""

    server_id: str
    network: LatencyStats | None
    computing: ComputingStats
    latency_ms: float | None
    idle_for_s: float
    improvable: bool


@dataclass
class Monitor:
    """Measures the servers and builds the auto-scaler's `Snapshot`.

    `statistic` chooses which number stands for a server's latency: "mean" (default) or
    "p95". Keeps, per server, the log offsets and the last request time across rounds.
    """

    method: ProbeMethod = "tcp"
    probe_port: int = 7
    probe_timeout_s: float = 0.5
    loss_penalty_ms: float = 1000.0
    concurrency: int = DEFAULT_CONCURRENCY
    statistic: Literal["mean", "p95"] = "mean"
    logs: LogReader = field(default_factory=LogReader)
    last_request: dict[str, float] = field(default_factory=dict)
    last_reports: dict[str, ServerReport] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Any, **kw: Any) -> Monitor:
        return cls(
            method=config.probe,
            probe_port=config.probe_port,
            probe_timeout_s=config.probe_timeout_s,
            loss_penalty_ms=config.loss_penalty_ms,
            **kw,
        )

    def measure(
        self, inputs: Sequence[ServerInput], now: float | None = None
    ) -> dict[str, ServerReport]:
        now = time.time() if now is None else now
        everyone = [a for i in inputs for a in map(str, i.user_addresses)]
        rtts = probe(everyone, self.method, self.probe_port, self.probe_timeout_s, self.concurrency)
        reports: dict[str, ServerReport] = {}
        for i in inputs:
            sid = i.info.id
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
            pick = (lambda s: s.p95_ms) if self.statistic == "p95" else (lambda s: s.mean_ms)
            net_ms = pick(net) if net is not None else None
            comp_ms = pick(comp) if comp.count else None
            reports[sid] = ServerReport(
                server_id=sid,
                network=net,
                computing=comp,
                latency_ms=application_latency(net_ms, comp_ms),
                idle_for_s=idle_for(now, self.last_request.get(sid), i.info.created_at),
                improvable=improvable(net_ms, i.info.latency_objective_ms),
            )
        for gone in set(self.last_request) - {i.info.id for i in inputs}:
            self.last_request.pop(gone, None)
        self.last_reports = reports
        return reports

    def snapshot(
        self,
        inputs: Sequence[ServerInput],
        free: Amount | Resources,
        unit: Amount | Resources = DEFAULT_UNIT,
        now: float | None = None,
    ) -> Snapshot:
        """Measure every server and build the Snapshot (`free` = capacity - basic service
        - all servers' limits; may be negative)."""
        now = time.time() if now is None else now
        reports = self.measure(inputs, now)
        servers = []
        for i in inputs:
            info, r = i.info, reports[i.info.id]
            servers.append(
                ServerSnapshot(
                    id=info.id,
                    priority=info.priority,
                    limits=info.limits,
                    users=info.users,
                    latency_objective_ms=info.latency_objective_ms,
                    latency_ms=r.latency_ms,
                    idle_for_s=r.idle_for_s,
                    override=info.override,
                    termination=info.termination,
                    owner=info.owner,
                    app=info.app,
                    created_at=info.created_at,
                    improvable=r.improvable,
                    network_ms=None if r.network is None else r.network.mean_ms,
                    computing_ms=r.computing.mean_ms,
                )
            )
        return Snapshot(NodeSnapshot(Amount.of(free), Amount.of(unit)), tuple(servers), now)


def free_after(
    capacity: Resources | Amount,
    basic: Resources | Amount,
    limits: Iterable[Resources | Amount],
    reserve: Resources | Amount | None = None,
) -> Amount:
    """capacity - max(basic service, reserve) - sum(limits), per dimension; may be < 0."""
    b = Amount.of(basic)
    if reserve is not None:
        r = Amount.of(reserve)
        b = Amount(max(b.cores, r.cores), max(b.memory_mb, r.memory_mb))
    total = Amount.of(capacity) - b
    for lim in limits:
        total = total - Amount.of(lim)
    return total


def cgroup_usage(
    samples: Mapping[str, CgroupSample], prev: Mapping[str, CgroupSample]
) -> dict[str, Amount]:
    """Per-container use from this round's and the previous round's samples."""
    return {k: usage(prev.get(k), v) for k, v in samples.items()}


__all__ = [
    "CgroupSample",
    "ComputingStats",
    "HostSampler",
    "LatencyStats",
    "LogReader",
    "Monitor",
    "Request",
    "ServerInput",
    "ServerReport",
    "application_latency",
    "basic_service",
    "cgroup_usage",
    "computing_stats",
    "cores_used",
    "free_after",
    "idle_for",
    "improvable",
    "network_stats",
    "parse_line",
    "parse_lines",
    "percentile",
    "probe",
    "probe_icmp",
    "probe_tcp",
    "read_cgroup",
    "stats",
    "usage",
]
