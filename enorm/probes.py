"""Network latency probes: the RTT from the edge node to each of a server's users.

TCP connect is the default. It needs no privilege, every TCP stack answers it (SYN-ACK
from an open port, RST from a closed one: both give one RTT), and it crosses the
NATs/firewalls that let the game's own TCP traffic through. Successful probes are closed
with SO_LINGER 0 (an RST), so 16k probes leave no TIME_WAIT sockets behind. ICMP echo is
the option for networks that drop unsolicited SYNs: one socket for all users,
unprivileged (datagram ICMP, when net.ipv4.ping_group_range admits our group) or raw (as
root); one socket means no per-user file descriptor at all.
"""

from __future__ import annotations

import errno
import os
import resource
import select
import selectors
import socket
import struct
import time
from collections import deque
from collections.abc import Iterable
from typing import Literal

ProbeMethod = Literal["tcp", "icmp", "none"]
DEFAULT_CONCURRENCY = 1024



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
    source: str = "",
) -> dict[str, float | None]:
    """TCP-connect RTT (ms) to each distinct address; None = no answer within `timeout`.
    With `source`, probes leave from that local address (the node's own uplink).

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
                if source:
                    sock.bind((source, 0))
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
    source: str = "",
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
    if source:
        sock.bind((source, 0))
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
    source: str = "",
) -> dict[str, float | None]:
    """Probe all addresses at once (blocking); RTT in ms or None (lost / not probed)."""
    addrs = list(addresses)
    if method == "none" or not addrs:
        return dict.fromkeys(map(str, addrs))
    if method == "tcp":
        return probe_tcp(addrs, port, timeout, concurrency, source)
    if method == "icmp":
        return probe_icmp(addrs, timeout, concurrency, source)
    raise ValueError(f"unknown probe method {method!r}")
