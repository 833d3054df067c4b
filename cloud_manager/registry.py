"""The node registry: which edge nodes there are, what each offers, whether it is up.

It lives in the cloud Redis, one hash under one hash tag (so it works unchanged on a Redis
Cluster), so that several cloud-manager processes share one view. Heartbeats come from
the configured list: every `interval_s` the cloud manager asks each node for its offer
(`GET /v1/node`: free resources, unit, load, admission policy); the node needs no route
to the cloud for it. Of several processes, one polls per interval (a lock key that
expires with the interval) and the others read what it wrote. A node that has not
answered for `down_after_s` is down: placement passes it over. Its running servers are
left alone: an edge server keeps serving its users while the cloud cannot see its node.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from enorm.protocol import NodeOffer

from .edge_client import EdgeClient, EdgeError

log = logging.getLogger(__name__)

KEY = "enorm:{registry}:nodes"
POLL_LOCK = "enorm:{registry}:poll"


@dataclass(frozen=True)
class NodeState:
    """One node as the registry last saw it."""

    name: str
    url: str
    offer: NodeOffer | None  # the last offer it answered with
    seen_at: float | None  # when it last answered
    checked_at: float  # when it was last asked
    error: str | None = None  # why the last question got no offer
    status: int | None = None  # the HTTP status it answered with then (None: no answer)

    def up(self, now: float, down_after_s: float) -> bool:
        return self.seen_at is not None and now - self.seen_at <= down_after_s

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "url": self.url, "seen_at": self.seen_at,
                "checked_at": self.checked_at, "error": self.error, "status": self.status,
                "offer": None if self.offer is None else self.offer.model_dump(mode="json")}


class Registry:
    """The shared view (reads and writes only the cloud Redis)."""

    def __init__(self, client: Any, down_after_s: float = 15.0,
                 clock: Callable[[], float] = time.time) -> None:
        if not down_after_s > 0:
            raise ValueError("down_after_s must be > 0")
        self.r, self.down_after_s, self.clock = client, down_after_s, clock

    def record(self, name: str, url: str, offer: NodeOffer | None,
               error: str | None = None, status: int | None = None) -> NodeState:
        """What one heartbeat found: an offer (the node is up now) or an error (the
        node keeps its last offer and the time it was last seen; `status`: what it
        answered, e.g. 401 to a token it does not know)."""
        now = self.clock()
        old = self.get(name)
        state = NodeState(
            name, url, offer if offer is not None else (old.offer if old else None),
            now if offer is not None else (old.seen_at if old else None), now,
            None if offer is not None else error, None if offer is not None else status)
        self.r.hset(KEY, name, json.dumps(state.as_dict()))
        return state

    @staticmethod
    def _parse(raw: Any) -> NodeState:
        d = json.loads(raw)
        return NodeState(d["name"], d["url"],
                         None if d["offer"] is None else NodeOffer.model_validate(d["offer"]),
                         d["seen_at"], d["checked_at"], d.get("error"), d.get("status"))

    def get(self, name: str) -> NodeState | None:
        raw = self.r.hget(KEY, name)
        return None if raw is None else self._parse(raw)

    def nodes(self) -> dict[str, NodeState]:
        return {(k.decode() if isinstance(k, bytes) else k): self._parse(v)
                for k, v in self.r.hgetall(KEY).items()}

    def up(self, name: str) -> bool:
        st = self.get(name)
        return st is not None and st.up(self.clock(), self.down_after_s)

    def forget(self, name: str) -> None:
        self.r.hdel(KEY, name)

    def claim_poll(self, interval_s: float, owner: str) -> bool:
        """True for the one process that polls in this interval."""
        return bool(self.r.set(POLL_LOCK, owner, nx=True, px=max(1, int(interval_s * 1000))))


class Heartbeats:
    """Asks every configured node for its offer every `interval_s` and records it."""

    def __init__(self, registry: Registry, edges: Sequence[EdgeClient],
                 interval_s: float = 5.0, timeout_s: float = 2.0) -> None:
        if not interval_s > 0:
            raise ValueError("interval_s must be > 0")
        self.registry, self.edges = registry, list(edges)
        self.interval_s, self.timeout_s = interval_s, timeout_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._owner = f"{id(self):x}"
        self._was_up: dict[str, bool] = {}

    def _ask(self, edge: EdgeClient) -> tuple[EdgeClient, NodeOffer | None, EdgeError | None]:
        try:
            return edge, edge.offer(timeout=self.timeout_s), None
        except EdgeError as exc:
            return edge, None, exc

    def beat(self) -> dict[str, NodeState]:
        """Ask every node now (in parallel) and record the answers."""
        out = {}
        with ThreadPoolExecutor(max(1, min(16, len(self.edges)))) as pool:
            for edge, offer, exc in pool.map(self._ask, self.edges):
                error = None if exc is None else str(exc)
                st = self.registry.record(edge.name, edge.url, offer, error,
                                          None if exc is None else exc.status)
                out[edge.name] = st
                up = st.up(self.registry.clock(), self.registry.down_after_s)
                if self._was_up.get(edge.name, True) != up:
                    log.warning("edge node %s is %s%s", edge.name, "up" if up else "down",
                                "" if up else f" (no offer for {self.registry.down_after_s:g} "
                                f"s: {error})")
                self._was_up[edge.name] = up
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self.registry.claim_poll(self.interval_s, self._owner):
                    self.beat()
            except Exception:  # the heartbeat outlives a Redis hiccup
                log.exception("heartbeat round failed")
            self._stop.wait(self.interval_s)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name="enorm-heartbeats")
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
