"""Release: what is left of a terminated server, undone off the answer's path.

Once a server's data is home and its container stopped (its CPU and memory free), what
is left is plumbing: its forwards and fence, its container's files, mounts, loop device
and id claim, its bridge guard. Undoing it costs more than the stop (iptables and
ebtables rewrites, LXC's delete) and nobody waits for it, so one worker thread does it
after the answer. Until it is done the server's address and host ports stay `held`, and
admission gives them to no one (`Node.taken_ports`, `Node.taken_addresses`); a sweep
waits for the worker (`drain`) rather than race it. A release that fails (a refused
unmount, `losetup`, iptables: each step is idempotent) keeps them held and is tried
again as a whole, after `RETRY_S`, then with each `retry_pending` (`retry`), until it
succeeds; `retries` counts the tries again (a metric). A crash before it is done leaves
a container and rules that no record owns: the next start removes them (`reconcile`),
as after any crash.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

# Waits before each retry of a failed release; after the last, `retry` (called with each
# `retry_pending`, every `migration_retry_s`) queues it again.
RETRY_S = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
# At most this many releases wait: a termination that would queue more waits for room
# (up to BACKLOG_WAIT_S), so that under steady churn the held addresses and ports stay
# bounded (a soak at 9 cycles/s held the whole /24 after 626 cycles and was refused).
BACKLOG = 8
BACKLOG_WAIT_S = 60.0


@dataclass(frozen=True)
class Held:
    """What a server being released still holds on the node."""

    container: str
    address: str
    ports: frozenset[int]


class Releases:
    """The pending releases and the one worker that carries them out, in order."""

    def __init__(self) -> None:
        self._held: dict[str, Held] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[str, Callable[[], None], int]] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._failed: dict[str, tuple[Callable[[], None], int]] = {}  # sid -> undo, tries
        self._closed = threading.Event()
        self.retries = 0  # tries again of failed releases, all servers
        self._room = threading.Condition()

    def hold(self, sid: str, held: Held) -> None:
        """Hold what the server has (before its record goes)."""
        with self._lock:
            self._held[sid] = held

    def submit(self, sid: str, undo: Callable[[], None]) -> None:
        """Run `undo` in the worker, then let go of what `sid` held; first wait while
        `BACKLOG` releases are queued (the caller holds no lock of the node)."""
        deadline = time.monotonic() + BACKLOG_WAIT_S
        with self._room:
            while self._queue.qsize() >= BACKLOG and time.monotonic() < deadline:
                self._room.wait(0.5)
        self._put(sid, undo, 0)

    def _put(self, sid: str, undo: Callable[[], None], tries: int) -> None:
        with self._lock:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._run, daemon=True,
                                                name="enorm-release")
                self._worker.start()
        self._queue.put((sid, undo, tries))

    def _run(self) -> None:
        while True:
            sid, undo, tries = self._queue.get()
            try:
                undo()
            except Exception as exc:
                self._fail(sid, undo, tries + 1, exc)
            else:
                with self._lock:
                    self._held.pop(sid, None)
                if tries:
                    log.info("release of %s done on retry %d", sid, tries)
            finally:
                self._queue.task_done()
                with self._room:
                    self._room.notify_all()

    def _fail(self, sid: str, undo: Callable[[], None], tries: int, exc: Exception) -> None:
        """Keep what `sid` holds and try again: after the next wait, or with `retry`."""
        with self._lock:
            self._failed[sid] = (undo, tries)
        log.warning("release of %s failed (%s, try %d); its address and ports stay held, "
                    "retried", sid, exc, tries)
        if tries <= len(RETRY_S):
            threading.Thread(target=self._later, args=(sid, RETRY_S[tries - 1]), daemon=True,
                             name=f"enorm-release-retry-{sid}").start()

    def _later(self, sid: str, wait: float) -> None:
        if not self._closed.wait(wait):
            self._again(sid)

    def _again(self, sid: str) -> None:
        with self._lock:
            failed = self._failed.pop(sid, None)  # queued once, whoever asks first
            if failed is None:
                return
            self.retries += 1
        self._put(sid, *failed)

    def retry(self) -> None:
        """Queue every failed release again (with each `retry_pending`)."""
        for sid in list(self._failed):
            self._again(sid)

    def close(self) -> None:
        """Stop the timed retries (what is still held is swept by the next start)."""
        self._closed.set()

    def drain(self) -> None:
        """Wait until every release submitted so far has run (or failed)."""
        self._queue.join()

    def held(self) -> list[Held]:
        with self._lock:
            return list(self._held.values())

    def addresses(self) -> set[str]:
        return {h.address for h in self.held()}

    def ports(self) -> set[int]:
        return {p for h in self.held() for p in h.ports}
