"""A packet-level delayer: the kernel here has no netem, so one-way delay and jitter are
added in user space through NFQUEUE. iptables hands every packet of a link to a delayer
process, which holds it and gives the verdict (accept) when its time has come, so TCP
handshakes, data and ACKs all see the path's RTT as on a real network.

Two implementations of one contract: `delayer.c` (the default; built with the system cc
on first use, cached by its source's digest under /var/cache/enorm/delayer) and this
module's Python one, which wakes the interpreter for every packet and costs several
times the CPU per packet (`python -m bench.delayers` measures both side by side).
`start` runs either (`impl`, or ENORM_DELAYER=c|python) in a namespace, in the testbed's
cost group.

Run in the namespace whose PREROUTING hands it the packets (NFQUEUE is per network
namespace; on OUTPUT a held packet would still count against its sending socket):
    python -m bench.testbed.delayer --queue 1:20:2 --queue 2:20:2
(queue number : one-way delay ms : jitter ms). Packets of one queue leave in order (a
packet never overtakes the one before it), like a single link; jitter is uniform in
[-jitter, +jitter] around the delay. With `--control` (`start(..., control=True)`), a
line NUM:DELAY_MS:JITTER_MS on stdin sets that queue's delay from then on (`set_delay`:
the testbed's users walking between the nodes' areas). Both print `ready` once bound
and, when stopped, how late the packets left against their due time (`late packets=N
mean_us=.. p99_us=.. max_us=..`, p99 as its power-of-two bucket's bound; `lateness` reads it).
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import os
import random
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench.testbed import cost

IMPLS = ("c", "python")
SOURCE = Path(__file__).with_name("delayer.c")
CACHE = Path(os.environ.get("ENORM_DELAYER_CACHE", "/var/cache/enorm/delayer"))
ROOT = Path(__file__).resolve().parents[2]


def binary() -> Path:
    """The compiled delayer: built with the system cc (libnetfilter-queue-dev, installed
    by scripts/setup.sh) the first time this source is used, then reused."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    out = CACHE / f"enorm-delayer-{digest}"
    if out.is_file():
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    r = subprocess.run(["cc", "-O2", "-Wall", "-o", str(tmp), str(SOURCE), "-lnetfilter_queue",
                        "-lnfnetlink"], capture_output=True, text=True)  # fmt: skip
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"building {SOURCE.name} failed (is libnetfilter-queue-dev "
                           f"installed? scripts/setup.sh does): {r.stderr.strip()[-1500:]}")
    os.replace(tmp, out)  # atomic: a concurrent build of the same source is the same file
    return out


def command(queues: list[str], impl: str = "c", control: bool = False) -> list[str]:
    """The delayer's command line for `queues` (NUM:DELAY_MS:JITTER_MS each)."""
    flag = ["--control"] if control else []
    if impl == "c":
        return [str(binary()), *flag, *queues]
    if impl == "python":
        return [sys.executable, "-m", "bench.testbed.delayer", *flag,
                *(a for q in queues for a in ("--queue", q))]  # fmt: skip
    raise ValueError(f"delayer: impl {impl!r} is not one of {', '.join(IMPLS)}")


def start(queues: list[str], *, ns: str | None = None, impl: str | None = None,
          control: bool = False) -> subprocess.Popen:  # fmt: skip
    """A delayer for `queues`, in network namespace `ns` (None: the host's), in the
    testbed's `delayers` cost group; returns once it has bound its queues. `control`:
    its delays can be changed while it runs (`set_delay`)."""
    impl = impl or os.environ.get("ENORM_DELAYER", "c")
    cmd = [*cost.DELAYERS.open().launcher(), *(["ip", "netns", "exec", ns] if ns else []),
           *command(queues, impl, control)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, cwd=ROOT,
                            stdin=subprocess.PIPE if control else None)
    if proc.stdout.readline().strip() != b"ready":
        proc.kill()
        proc.wait()
        raise RuntimeError(f"the {impl} delayer for queues {queues} (namespace {ns}) did "
                           "not start")
    return proc


def set_delay(proc: subprocess.Popen, queue: int, delay_ms: float, jitter_ms: float) -> None:
    """A delayer started with `control=True`: `queue`'s delay from now on."""
    proc.stdin.write(f"{queue}:{delay_ms}:{jitter_ms}\n".encode())
    proc.stdin.flush()


class Queue:
    """One direction of one link: a fixed one-way delay plus jitter, order kept."""

    def __init__(self, delay_s: float, jitter_s: float, push: Callable):
        self.delay_s, self.jitter_s, self.push = delay_s, jitter_s, push
        self.last = 0.0  # release time of the previous packet (keeps order)

    def __call__(self, pkt) -> None:
        due = time.monotonic() + self.delay_s + random.uniform(-self.jitter_s, self.jitter_s)
        self.last = due = max(due, self.last)
        self.push(due, pkt)


def lateness(output: str) -> dict | None:
    """The `late ...` line a stopped delayer printed, as numbers (None: no such line)."""
    for line in output.splitlines():
        if line.startswith("late "):
            return {k: float(v) for k, v in (f.split("=") for f in line.split()[1:])}
    return None


class Late:
    """How late packets leave: count, sum, max and power-of-two buckets of microseconds
    (the C delayer's accounting, for a like-for-like report)."""

    def __init__(self) -> None:
        self.n, self.sum_s, self.max_s = 0, 0.0, 0.0
        self.buckets = [0] * 32

    def add(self, late_s: float) -> None:
        self.n += 1
        self.sum_s += late_s
        self.max_s = max(self.max_s, late_s)
        self.buckets[min(31, int(late_s * 1e6).bit_length())] += 1

    def line(self) -> str:
        seen, p99 = 0, 0
        for b, count in enumerate(self.buckets):
            seen += count
            if self.n and seen * 100 >= self.n * 99:
                p99 = 1 << b if b else 1
                break
        mean = self.sum_s * 1e6 / self.n if self.n else 0.0
        return (f"late packets={self.n} mean_us={mean:.1f} p99_us={p99} "
                f"max_us={self.max_s * 1e6:.1f}")


def serve(specs: list[tuple[int, float, float]], control: bool = False) -> None:
    from netfilterqueue import NetfilterQueue

    heap: list = []
    seq = 0

    def push(due: float, pkt) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(heap, (due, seq, pkt))

    nfqs, queues = [], {}
    for num, delay_ms, jitter_ms in specs:
        nfq = NetfilterQueue()
        queues[num] = Queue(delay_ms / 1000, jitter_ms / 1000, push)
        nfq.bind(num, queues[num], max_len=65536)
        nfqs.append(nfq)
    fds = {nfq.get_fd(): nfq for nfq in nfqs}
    ctl = sys.stdin.fileno() if control else None
    pending = b""
    stop = False

    def _stop(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    late = Late()
    print("ready", flush=True)
    while not stop:
        now = time.monotonic()
        while heap and heap[0][0] <= now:
            due, _, pkt = heapq.heappop(heap)
            pkt.accept()
            late.add(now - due)
        timeout = max(0.0, heap[0][0] - now) if heap else 0.2
        try:
            ready, _, _ = select.select([*fds, *([ctl] if ctl is not None else [])], [], [],
                                        timeout)
        except InterruptedError:
            continue
        for fd in ready:
            if fd != ctl:
                fds[fd].run(block=False)
                continue
            chunk = os.read(ctl, 4096)
            if not chunk:  # stdin closed: the delays stay as they are
                ctl = None
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in filter(None, (x.strip() for x in lines)):
                num, delay_ms, jitter_ms = parse(line.decode())
                queues[num].delay_s, queues[num].jitter_s = delay_ms / 1000, jitter_ms / 1000
    for _, _, pkt in heap:  # let what is held go, not drop it
        pkt.accept()
    print(late.line(), flush=True)
    for nfq in nfqs:
        nfq.unbind()


def parse(spec: str) -> tuple[int, float, float]:
    num, delay, jitter = spec.split(":")
    return int(num), float(delay), float(jitter)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--queue", action="append", type=parse, required=True,
                    help="NUM:DELAY_MS:JITTER_MS (repeat per direction)")
    ap.add_argument("--control", action="store_true",
                    help="read NUM:DELAY_MS:JITTER_MS lines on stdin: new delays")
    a = ap.parse_args(argv)
    serve(a.queue, a.control)


if __name__ == "__main__":
    sys.exit(main())
