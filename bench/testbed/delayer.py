"""A packet-level delayer: the kernel here has no netem, so one-way delay and jitter are
added in user space through NFQUEUE. iptables hands every packet of a link to this
process, which holds it and gives the verdict (accept) when its time has come, so TCP
handshakes, data and ACKs all see the path's RTT as on a real network.

Run in the namespace whose PREROUTING hands it the packets (NFQUEUE is per network
namespace; on OUTPUT a held packet would still count against its sending socket):
    python -m bench.testbed.delayer --queue 1:20:2 --queue 2:20:2
(queue number : one-way delay ms : jitter ms). Packets of one queue leave in order (a
packet never overtakes the one before it), like a single link; jitter is uniform in
[-jitter, +jitter] around the delay.
"""

from __future__ import annotations

import argparse
import heapq
import random
import select
import signal
import sys
import time
from collections.abc import Callable

from netfilterqueue import NetfilterQueue


class Queue:
    """One direction of one link: a fixed one-way delay plus jitter, order kept."""

    def __init__(self, delay_s: float, jitter_s: float, push: Callable):
        self.delay_s, self.jitter_s, self.push = delay_s, jitter_s, push
        self.last = 0.0  # release time of the previous packet (keeps order)

    def __call__(self, pkt) -> None:
        due = time.monotonic() + self.delay_s + random.uniform(-self.jitter_s, self.jitter_s)
        self.last = due = max(due, self.last)
        self.push(due, pkt)


def serve(specs: list[tuple[int, float, float]]) -> None:
    heap: list = []
    seq = 0

    def push(due: float, pkt) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(heap, (due, seq, pkt))

    nfqs = []
    for num, delay_ms, jitter_ms in specs:
        nfq = NetfilterQueue()
        nfq.bind(num, Queue(delay_ms / 1000, jitter_ms / 1000, push), max_len=65536)
        nfqs.append(nfq)
    fds = {nfq.get_fd(): nfq for nfq in nfqs}
    stop = False

    def _stop(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    print("ready", flush=True)
    while not stop:
        now = time.monotonic()
        while heap and heap[0][0] <= now:
            heapq.heappop(heap)[2].accept()
        timeout = max(0.0, heap[0][0] - now) if heap else 0.2
        try:
            ready, _, _ = select.select(list(fds), [], [], timeout)
        except InterruptedError:
            continue
        for fd in ready:
            fds[fd].run(block=False)
    for _, _, pkt in heap:  # let what is held go, not drop it
        pkt.accept()
    for nfq in nfqs:
        nfq.unbind()


def parse(spec: str) -> tuple[int, float, float]:
    num, delay, jitter = spec.split(":")
    return int(num), float(delay), float(jitter)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--queue", action="append", type=parse, required=True,
                    help="NUM:DELAY_MS:JITTER_MS (repeat per direction)")
    serve(ap.parse_args(argv).queue)


if __name__ == "__main__":
    sys.exit(main())
