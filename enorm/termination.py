"""Procedure 4, the edge side: a server ends with its data merged back to the cloud first.

One server's end, in the order its steps are recorded and taken (`Terminator.end`):

    record `terminating` and why -> lift its transparent redirects -> fence its ports
    (TCP resets, then `merge_drain_s` for requests it already received) -> merge its
    data into the sink (`migrate`) -> kill the container (its CPU and memory free) ->
    forget the record and record `server.terminated` in one transaction -> the answer;
    then, off the answer's path (`release`, its address and ports held until done):
    remove its forwards, destroy the container, lift its bridge guard and the fence

A sink that does not answer stops there: the container is stopped and kept
(`migration_pending`, no host ports held) and `retry_pending` tries again later; the
operator's last resort is `discard_pending` (keys saved to a file). A restart finds a
record still `terminating` and finishes it with the reason it began with (a stopped
container is started again to merge; the merge is idempotent), and removes what a
release a crash cut off left (no record owns it). A release that fails (a refused
unmount, `losetup`, iptables) is retried by the release worker, its address and ports
held until it succeeds: the answer does not wait for it. Per server a
lock (`busy`) is held while a handover or an import runs on it, so that a termination
merges what is there once it is done.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from enorm import migration
from enorm.faults import crash_point
from enorm.node import Node, NotFound, port_of
from enorm.protocol import MergeReport, TerminateResult, TerminationReason
from enorm.release import Held
from enorm.store import ServerRecord

log = logging.getLogger(__name__)

# Merges a server's data back to its sink: (record, served users' ids) -> report.
Migrate = Callable[[ServerRecord, list[str]], MergeReport]


class MigrationPending(RuntimeError):
    """The data could not be merged back; the container is stopped and kept."""


class Terminator:
    """Ends servers: fence, merge, destroy, retries, and the per-server locks."""

    def __init__(self, node: Node, migrate: Migrate | None = None) -> None:
        self.node = node
        self.migrate = migrate
        # Per server: held while its users are handed over (old node) or its data comes
        # in (new node); a termination waits for it, so that it merges what is there.
        self._busy: dict[str, threading.Lock] = {}

    def busy(self, sid: str) -> threading.Lock:
        with self.node.lock:
            return self._busy.setdefault(sid, threading.Lock())

    def terminate(self, server_id: str, reason: TerminationReason, numbers: dict | None = None,
                  owner: str | None = None, cloud_wins: bool = False) -> TerminateResult:
        """Terminate a server (and, in `multiple` mode, its siblings of the same app).
        `cloud_wins`: the merge keeps the cloud's value of every key it changed since the
        copy (kept in the record: a retried merge does the same)."""
        rec = self.node.get(server_id, owner)
        group = [rec]
        if rec.termination == "multiple":
            group += [s for s in self.node.store.servers()
                      if s.id != rec.id and s.owner == rec.owner and s.app == rec.app]
        result = TerminateResult(terminated=[])
        for s in group:
            try:
                result.add(self.end(s.id, reason, numbers or {}, cloud_wins))
                result.terminated.append(s.id)
            except MigrationPending:
                result.pending.append(s.id)
            except NotFound:
                pass  # terminated meanwhile by someone else
        return result

    def end(self, sid: str, reason: TerminationReason, numbers: dict,
            cloud_wins: bool = False) -> MergeReport:
        """This one server, whatever its termination mode (the steps above)."""
        node = self.node
        # A handover or an import under way finishes first: then the merge below sees
        # the users as handed (old node), or the keys that came in (new node).
        node.get(sid)  # an unknown id gets no lock
        with self.busy(sid), node.lock:
            rec = node.get(sid)
            if rec.state == "terminating" and reason != TerminationReason.RECONCILE:
                raise NotFound(sid)  # another call is on it
            resumed = rec.state == "terminating"  # a restart finishes what a crash cut off
            was_pending = rec.state == "migration_pending"
            if resumed or (was_pending and rec.end_reason):
                reason = rec.end_reason or reason
            rec.state, rec.end_reason = "terminating", reason
            if cloud_wins and rec.data_sink is not None:
                rec.data_sink = rec.data_sink.model_copy(update={"cloud_wins_patterns": ["*"]})
            node.store.save(rec)
        if resumed:
            numbers = {**numbers, "resumed_after_restart": True}
        # No new connection of a user may reach a server that is going: the redirects go
        # before the data is merged.
        if rec.intercept:
            node.firewall.unredirect(rec.id)
        crash_point("terminate.started")
        if not node.containers.exists(rec.container):
            # Gone behind our back, with its data: nothing is left to merge.
            node.firewall.remove(rec.id, redirects=bool(rec.intercept))
            node.firewall.unguard(rec.id)
            node.containers.destroy(rec.container)  # its id range and mounts
            self.forget(rec, reason if resumed else TerminationReason.CONTAINER_LOST,
                        {**numbers, "keys_migrated": 0, "requested_by": reason})
            return MergeReport()
        if was_pending or (resumed and not node.containers.running(rec.container)):
            node.containers.start(rec.container)  # its Redis lives in the container
        merged, merge_s = MergeReport(), None
        if self.migrate is not None and rec.data_sink is not None:
            t0 = time.perf_counter()
            self.fence(rec)
            try:
                merged = self.migrate(rec, node.store.user_ids(rec.id))
            except Exception as exc:
                self._keep_for_retry(rec, reason, exc)
                raise MigrationPending(str(exc)) from exc
            merge_s = round(time.perf_counter() - t0, 4)
        crash_point("terminate.merged")
        node.containers.kill(rec.container)  # the rest of its stop: in the release
        crash_point("terminate.stopped")
        ports = frozenset((rec.access_port, *rec.ports.values()))
        node.releases.hold(rec.id, Held(rec.container, rec.address, ports))
        self.forget(rec, reason, {**numbers, **merged.model_dump(), "merge_s": merge_s})
        self._release(rec, fenced=rec.data_sink is not None or rec.handed_to is not None
                      or resumed)
        return merged

    def fence(self, rec: ServerRecord) -> None:
        """No request reaches the server once its data is being read: its application
        ports answer with a TCP reset (a user's open connection too, which conntrack
        would keep past the forward's removal), and what it had already received gets
        `merge_drain_s` to write. A client reset goes back to the cloud, which the cloud
        manager pointed it to before asking for the termination."""
        if not rec.ports:
            return
        self.node.firewall.fence(rec.id, rec.address, sorted(rec.ports))
        time.sleep(self.node.config.merge_drain_s)

    def _release(self, rec: ServerRecord, fenced: bool) -> None:
        """Undo the stopped server's plumbing in the release worker (its address and
        ports are held until then): forwards, then the container's files and its bridge
        guard side by side (LXC's delete in this process, ebtables' rewrite in a child),
        then the fence (`fenced`: else never made: spare the `iptables -S`)."""
        node = self.node

        def undo() -> None:
            node.firewall.remove(rec.id, redirects=bool(rec.intercept))
            unguarded = node.firewall.unguard_begin(rec.id, port_of(rec))
            try:
                node.containers.destroy(rec.container)
            finally:
                unguarded()
            if fenced:
                node.firewall.unfence(rec.id)
            crash_point("terminate.released")

        node.releases.submit(rec.id, undo)

    def forget(self, rec: ServerRecord, reason: TerminationReason, data: dict) -> None:
        """The record goes and its `server.terminated` event comes in one transaction:
        after a crash the cloud learns of the termination from one or the other."""
        events = self.node.events
        ev = events.make("server.terminated", rec, reason, data)
        with self.node.lock:
            self.node.store.delete(rec.id, event=ev, outbox_url=rec.callback_url)
            self._busy.pop(rec.id, None)
        crash_point("terminate.forgotten")
        events.announce(ev, rec, queued=bool(rec.callback_url))

    def _keep_for_retry(self, rec: ServerRecord, reason: TerminationReason,
                        exc: Exception) -> None:
        """The sink is unreachable: stop the container but keep it (and its data)."""
        log.warning("migration of %s failed (%s); container kept", rec.id, exc)
        node = self.node
        node.firewall.remove(rec.id, redirects=bool(rec.intercept))
        node.containers.stop(rec.container)
        node.firewall.unfence(rec.id)
        with node.lock:
            rec.state = "migration_pending"
            node.store.save(rec)
        node.events.emit("server.migration_failed", rec, reason, {"error": str(exc)})

    def retry_pending(self) -> list[str]:
        """Try again to merge back and destroy servers whose migration failed before, and
        the releases that failed."""
        self.node.releases.retry()
        done = []
        for rec in self.node.store.servers():
            if rec.state == "migration_pending":
                try:
                    self.end(rec.id, TerminationReason.MIGRATION_RETRY, {})
                    done.append(rec.id)
                except (MigrationPending, NotFound):
                    pass
        return done

    def discard_pending(self, save_dir: Path) -> dict[str, Path]:
        """Operator's last resort (`enorm down --force`): save each pending server's keys to
        a file under save_dir, then destroy it without merging. Returns id -> file."""
        node = self.node
        saved = {}
        save_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for rec in node.store.servers():
            if rec.state != "migration_pending":
                continue
            path = save_dir / f"{rec.id}-{int(time.time())}.json"
            if node.containers.exists(rec.container):
                node.containers.start(rec.container)
                keys = migration.save_keys(rec, path)
                node.containers.destroy(rec.container)
            else:
                keys = 0
            node.firewall.remove(rec.id, redirects=bool(rec.intercept))
            self.forget(rec, TerminationReason.DISCARDED_BY_OPERATOR,
                        {"keys_migrated": 0, "keys_saved": keys, "saved_to": str(path)})
            saved[rec.id] = path
        return saved

    def shutdown(self) -> TerminateResult:
        """Terminate every server (data merged back), e.g. when decommissioning."""
        result = TerminateResult(terminated=[])
        for s in self.node.store.servers():
            try:
                r = self.terminate(s.id, TerminationReason.NODE_SHUTDOWN)
            except NotFound:
                continue  # a sibling of one terminated before
            except Exception:  # keep going: the others still get their data back
                log.exception("terminating %s", s.id)
                result.pending.append(s.id)
                continue
            result.terminated += r.terminated
            result.pending += r.pending
            result.add(r)
        return result
