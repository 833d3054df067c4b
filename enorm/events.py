"""Events: what the edge did, recorded in the store and sent to the cloud's callback.

Delivery is at-least-once within a bound: an event waits in the store's outbox until the
cloud answers 2xx, and a background thread retries with exponential back-off (to 30 s),
also after a restart of the daemon, for at most `callback_give_up_s`.
A crash between the cloud's 2xx and the acknowledgement sends the same event (same id)
again: receivers drop ids they have seen (the cloud manager ignores a second
`server.terminated` of a deployment that ended).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable

import requests

from enorm.protocol import Event, EventReason, EventType
from enorm.store import ServerRecord, Store

log = logging.getLogger(__name__)
# One line per decision (admission, scaling, termination, migration) with its reason.
decisions = logging.getLogger("enorm.decisions")


class Events:
    def __init__(self, store: Store, timeout: float = 2.0, give_up_s: float = 3600.0) -> None:
        self.store = store
        self.timeout = timeout
        # A callback that has failed for this long is dropped from the outbox; the event
        # itself stays in the store's list (GET /v1/events) for the operator.
        self.give_up_s = give_up_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._session = requests.Session()
        # Called with every event as it is recorded (metrics); a failing one is logged.
        self.listeners: list[Callable[[Event], None]] = []

    def make(self, type_: EventType, rec: ServerRecord, reason: EventReason,
             data: dict | None = None) -> Event:  # fmt: skip
        return Event(id=secrets.token_hex(8), type=type_, server_id=rec.id, app=rec.app,
                     owner=rec.owner, at=time.time(), reason=reason, data=data or {})

    def emit(self, type_: EventType, rec: ServerRecord, reason: EventReason,
             data: dict | None = None, notify: bool = True) -> Event:
        """Record an event about a server; with `notify`, send it to its callback too."""
        ev = self.make(type_, rec, reason, data)
        url = rec.callback_url if notify else None
        self.store.add_event(ev, url)
        self.announce(ev, rec, queued=bool(url))
        return ev

    def announce(self, ev: Event, rec: ServerRecord, queued: bool) -> None:
        """What follows an event once it is in the store: delivery, the decision log, the
        listeners (metrics)."""
        if queued:
            self._wake.set()
        decide(ev.type.removeprefix("server."), ev.reason, server=rec.id, app=rec.app,
               owner=rec.owner, **ev.data)
        for listener in self.listeners:
            try:
                listener(ev)
            except Exception:
                log.exception("event listener %r", listener)

    def deliver_once(self) -> int:
        """Try every pending event once; returns how many are still pending."""
        pending = 0
        for url, ev in self.store.outbox():
            try:
                resp = self._session.post(url, json=ev.model_dump(), timeout=self.timeout)
                ok = 200 <= resp.status_code < 300
            except requests.RequestException as exc:
                log.info("event %s to %s: %s", ev.id, url, exc)
                ok = False
            if ok:
                self.store.outbox_ack(ev.id)
            elif time.time() - ev.at > self.give_up_s:
                log.warning("event %s to %s: no 2xx for %.0f s, given up (kept in the "
                            "event list)", ev.id, url, self.give_up_s)
                self.store.outbox_ack(ev.id)
            else:
                pending += 1
        return pending

    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            try:
                pending = self.deliver_once()
            except Exception:  # the store may be briefly gone; keep the thread alive
                log.exception("event delivery")
                pending = 1
            backoff = min(backoff * 2, 30.0) if pending else 0.5
            self._wake.wait(backoff if pending else 30.0)
            self._wake.clear()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="enorm-events", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=5)


def decide(what: str, reason: str, **fields: object) -> None:
    """Log one decision: `what reason=... k=v ...`; with --log-json, fields become keys."""
    text = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None and v != "")
    decisions.info("%s reason=%s %s", what, reason, text,
                   extra={"decision": what, "reason": reason, "fields": fields})
