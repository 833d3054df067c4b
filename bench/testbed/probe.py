"""A ping-like probe (no ping binary here, and ICMP needs raw sockets): a UDP echo server
run inside a namespace and a client that measures round trips through the emulated link.

    python -m bench.testbed.probe serve HOST PORT   # echo until killed
"""

from __future__ import annotations

import socket
import statistics
import sys
import time


def serve(host: str, port: int) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, port))
    print("ready", flush=True)
    while True:
        data, addr = s.recvfrom(2048)
        s.sendto(data, addr)


def rtts(host: str, port: int, count: int, interval_s: float, size: int = 64,
         source: str = "") -> list[float]:  # fmt: skip
    """Round trips in ms of `count` probes sent every `interval_s` (lost ones left out).
    Probes are sent on a schedule without waiting for replies, so the packet rate is
    1/interval_s whatever the delay."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((source, 0))
    s.setblocking(False)
    sent: dict[int, float] = {}
    got: dict[int, float] = {}
    start = time.monotonic()
    i = 0
    while True:
        now = time.monotonic()
        if i < count and now >= start + i * interval_s:
            sent[i] = time.monotonic()
            s.sendto(i.to_bytes(4, "big") + bytes(max(0, size - 4)), (host, port))
            i += 1
            continue
        try:
            data, _ = s.recvfrom(4096)
            got[int.from_bytes(data[:4], "big")] = time.monotonic()
            continue
        except BlockingIOError:
            pass
        if i >= count and (len(got) == count or now > sent[count - 1] + 2.0):
            break
        time.sleep(min(interval_s, 0.0005))
    s.close()
    return [(got[k] - sent[k]) * 1000 for k in sorted(got)]


def summary(samples: list[float], sent: int) -> dict:
    q = statistics.quantiles(samples, n=100) if len(samples) > 1 else samples * 99
    return {"sent": sent, "received": len(samples), "mean_ms": statistics.fmean(samples),
            "p50_ms": q[49], "p99_ms": q[98], "min_ms": min(samples), "max_ms": max(samples),
            "stdev_ms": statistics.pstdev(samples)}


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]))
