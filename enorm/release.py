"""Release: what is left of a terminated server, undone off the answer's path.

Once a server's data is home and its container stopped (its CPU and memory free), what
is left is plumbing: its forwards and fence, its container's files, mounts, loop device
and id claim, its bridge guard. Undoing it costs more than the stop (iptables and
ebtables rewrites, LXC's delete) and nobody waits for it, so one worker thread does it
after the answer. Until it is done the server's address and host ports stay `held`, and
admission gives them to no one (`Node.taken_ports`, `Node.taken_addresses`); a sweep
waits for the worker (`drain`) rather than race it. A release that fails keeps them held
(logged). A crash before it is done leaves a container and rules that no
record owns: the next start removes them (`reconcile`), as after any crash.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


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
        self._queue: queue.Queue[tuple[str, Callable[[], None]]] = queue.Queue()
        self._worker: threading.Thread | None = None

    def hold(self, sid: str, held: Held) -> None:
        """Hold what the server has (before its record goes)."""
        with self._lock:
            self._held[sid] = held

    def submit(self, sid: str, undo: Callable[[], None]) -> None:
        """Run `undo` in the worker, then let go of what `sid` held."""
        with self._lock:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._run, daemon=True,
                                                name="enorm-release")
                self._worker.start()
        self._queue.put((sid, undo))

    def _run(self) -> None:
        while True:
            sid, undo = self._queue.get()
            try:
                undo()
            except Exception:
                log.exception("release of %s failed; its address and ports stay held "
                              "until the next start", sid)
            else:
                with self._lock:
                    self._held.pop(sid, None)
            finally:
                self._queue.task_done()

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
