"""Orphans: servers on the nodes that the ledger does not know, found and ended.

An offload is recorded in the ledger once its node admitted the server; a process killed
in between leaves a server nobody will withdraw (an orphan), and a record cut half-way
leaves a deployment unlisted or users not pointing at it. This reconcile finds both from
the nodes' side, so that its cost follows the servers, not the ledger: its turns are
shared between the cloud-manager processes as the heartbeats' are (a lease per shard and
turn, `registry.run_turns`), each node is asked for its servers (`GET /v1/servers`, the
cloud's own token sees its own) once a period, stretched so that the fleet's requests
stay under `max_rate` a second, and each server of this app is judged (`judge`, pure):

    recorded, leased                     KNOWN      its offload in flight finishes it
    recorded, created within `window_s`  FINISH     its record may have been cut: the
                                                    deployment listed and its users'
                                                    pointers repaired (`Ledger.finish`)
    recorded                             KNOWN
    not recorded, leased                 IN_FLIGHT  an offload whose owner is alive
                                                    (`ledger.Intents`): left alone
    not recorded, younger than `grace_s` IN_FLIGHT  an offload between its handshake and
                                                    its record: left alone
    not recorded, older                  ORPHAN     fenced (`Ledger.fence`: a record that
                                                    comes late fails, `Ended`), then
                                                    terminated on its node, which merges
                                                    its data back to the cloud first (the
                                                    cloud's values win: no user was sent
                                                    there)

At the same turns the offloads whose owner died are taken over: the intents of the
ledger's shard of the turn whose lease expired (`Ledger.lapsed`), each taken by one
process (`Ledger.take`) and carried on (`carry_on`, pure):

    recorded      COMPLETED  its record finished (`Ledger.finish`), its users sent there
                             (the app's redirect, as the owner would have; a handover's
                             old server forgotten), its intent released
    not recorded  ENDED      fenced, terminated on its node (its data merged back: the
                             cloud's values win for an offload from the cloud, none of
                             its users was sent there; a handover's new server's own
                             rule, it may hold the keys its old node gave it), its
                             intent released: its users stay where they are, to be
                             offered again (the policy's next round)

A redirect is sent again only if the owner died between sending it and releasing the
intent (one Redis command), or was cut off from the cluster there for most of a lease
(`ledger.Intents.end`): the app's redirect must be idempotent (the same users to the
same URL). A completed offload's data is the copy made before its record: what its
users wrote on the cloud since (a lease at most) counts as conflicts at its merge.

So an orphan is ended within `grace_s + 2 period + timeout` of its handshake (its node's
next turn after the grace, one missed turn tolerated), and never while its record can
still land; an offload whose owner died is carried on within `lease + 2 period` of the
owner's last renewal; a deployment is young (`window_s`) for the grace, two periods and the time
a record is retried through a failover (`ledger.RETRY_S`).

Only for a cloud whose offloads are recorded in the ledger (enorm-cloud, the policy loop,
processes that record as they do): a server this process holds in memory is known, and
the servers of other apps are not looked at, but a server of this app that a process
offloaded without recording it is an orphan to this reconcile. The grace is
counted on the node's clock (the server's `created_at`): a skew moves it by as much.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from enum import StrEnum
from typing import TYPE_CHECKING

from .edge_client import EdgeClient, EdgeError
from .ledger import LEASE_S, RETRY_S, Intent, Ledger, deployment_key, lease_key
from .registry import SHARDS, TurnJob, period, run_turns, shard

if TYPE_CHECKING:
    from enorm.protocol import ServerInfo

    from .orchestrator import CloudManager

log = logging.getLogger(__name__)


class Verdict(StrEnum):
    KNOWN = "known"
    FINISH = "finish"
    IN_FLIGHT = "in_flight"
    ORPHAN = "orphan"
    COMPLETED = "completed"  # an offload taken over, its users sent to its server
    ENDED = "ended"  # an offload taken over, its server ended


def judge(recorded: bool, age_s: float, grace_s: float, window_s: float,
          leased: bool = False) -> Verdict:
    """What a server of this app found on its node is (module docstring's table)."""
    if recorded:
        return Verdict.FINISH if age_s < window_s and not leased else Verdict.KNOWN
    return Verdict.IN_FLIGHT if leased or age_s < grace_s else Verdict.ORPHAN


def carry_on(recorded: bool) -> Verdict:
    """What becomes of an offload whose owner died (module docstring's second table)."""
    return Verdict.COMPLETED if recorded else Verdict.ENDED


class Orphans(TurnJob):
    """The reconcile of the nodes' servers against the ledger (module docstring)."""

    thread_name = "enorm-orphans"

    def __init__(self, cm: CloudManager, ledger: Ledger, interval_s: float = 60.0,
                 grace_s: float = 300.0, max_rate: float = 50.0, workers: int = 8,
                 lease_s: float = LEASE_S) -> None:
        if cm.registry is None:
            raise ValueError("the orphans' reconcile needs a registry (its turn leases)")
        if not (interval_s > 0 and grace_s >= 0 and max_rate > 0):
            raise ValueError("interval_s and max_rate must be > 0, grace_s >= 0")
        super().__init__()
        self.cm, self.ledger, self.registry = cm, ledger, cm.registry
        self.grace_s, self.workers = grace_s, workers
        self.period_s = period(len(cm.edges), interval_s, max_rate)
        # A record cut half-way (retried through a failover until it was) is found at
        # its node's first turn after it: young is what may not have been seen since.
        self.window_s = grace_s + 2 * self.period_s + RETRY_S
        self.by_shard: dict[int, list[EdgeClient]] = {}
        for e in cm.edges:
            self.by_shard.setdefault(shard(e.name), []).append(e)
        self.counts: Counter[str] = Counter()  # what was done, by verdict (bench, tests)
        self.lease_s = lease_s  # how long a lapsed offload taken over is this process's
        self.edges = {e.name: e for e in cm.edges}
        self._owner = f"{id(self):x}"
        self._lock = threading.Lock()
        self._pending: set[int] = set()  # shards whose check is queued or running
        self._finished: dict[str, float] = {}  # young deployments finished: id -> when

    def turn(self, i: int, pool: ThreadPoolExecutor | None = None) -> bool:
        """Turn number `i` (shard `i % SHARDS`): if this process wins its lease, check
        the shard's nodes (in `pool` if given, so that a slow node holds up no other
        turn), and say so."""
        k = i % SHARDS
        edges = self.by_shard.get(k, [])
        if not self.registry.claim(k, i, self.period_s, self._owner, "orphans"):
            return False
        if pool is None:
            self.take_over(k)
            if edges:
                self.check(edges)
            return True
        with self._lock:  # a shard still being checked is not queued twice
            if k in self._pending:
                return True
            self._pending.add(k)
        pool.submit(self._check, i, edges)
        return True

    def _check(self, i: int, edges: Sequence[EdgeClient]) -> None:
        try:
            self.take_over(i % SHARDS)
            if edges:
                self.check(edges)
        except Exception:  # a Redis outage: the shard's next turn runs
            log.exception("orphans turn %d failed", i)
        finally:
            with self._lock:
                self._pending.discard(i % SHARDS)

    def check(self, edges: Sequence[EdgeClient]) -> dict[str, Verdict]:
        """Each server of this app on `edges`, judged and dealt with; server id ->
        verdict. A node that does not answer is passed over until its next turn."""
        with ThreadPoolExecutor(max(1, min(self.workers, len(edges)))) as pool:
            listed = list(pool.map(self._servers, edges))
        with self.cm.lock:
            live = set(self.cm.deployments)
        found = [(e, s) for e, servers in zip(edges, listed, strict=True) for s in servers
                 if s.app == self.cm.app.name and s.id not in live
                 and s.state in ("launching", "running")]
        if not found:
            return {}
        pipe = self.ledger.r.pipeline(transaction=False)
        for _, s in found:
            pipe.exists(deployment_key(s.id))
            pipe.exists(lease_key(s.id))
        replies = pipe.execute()
        now, out = time.time(), {}
        with self._lock:  # forget what is no longer young
            self._finished = {k: t for k, t in self._finished.items()
                              if now - t < self.window_s}
        for (edge, s), rec, leased in zip(found, replies[::2], replies[1::2], strict=True):
            v = judge(bool(rec), now - s.created_at, self.grace_s, self.window_s,
                      bool(leased))
            if v is Verdict.FINISH:
                if s.id in self._finished:  # once a process is enough: its record is done
                    v = Verdict.KNOWN
                elif (e := self.ledger.get(s.id)) is not None:
                    self.ledger.finish(e)
                    with self._lock:
                        self._finished[s.id] = now
            elif v is Verdict.ORPHAN:
                v = self._end(edge, s)
            out[s.id] = v
            self.counts[v] += 1
        return out

    def take_over(self, k: int) -> dict[str, Verdict]:
        """The offloads of the ledger's shard `k` whose owner died (their lease lapsed),
        each taken by this process or another, completed or ended (module docstring);
        server id -> verdict. Those on a node this process does not know are left."""
        out = {}
        mine = set() if self.cm.intents is None else self.cm.intents.held
        for intent in self.ledger.lapsed(k):
            e = intent.entry
            edge = self.edges.get(e.node)
            # (this process's own, lapsed in a stall, is its own still: renewed next)
            if edge is None or e.app != self.cm.app.name or e.server_id in mine or \
                    not self.ledger.take(e.server_id, self._owner, self.lease_s):
                continue
            out[e.server_id] = v = self._lapsed(intent, edge)
            self.counts[v] += 1
        return out

    def _lapsed(self, intent: Intent, edge: EdgeClient) -> Verdict:
        e = intent.entry
        # not recorded: fenced first, so that the owner's record, late, fails (`Ended`)
        v = carry_on(self.ledger.get(e.server_id) is not None
                      or not self.ledger.fence(e.server_id))
        if v is Verdict.ENDED:
            log.warning("offload of %s to %s lapsed before its record: ending it (its "
                        "users stay where they are)", e.server_id, e.node)
            try:
                edge.terminate(e.server_id,
                               conflicts=None if intent.handed_over_from else "cloud")
            except EdgeError as exc:  # fenced: an orphan to its node's next turn
                log.warning("lapsed offload %s on %s: %s", e.server_id, e.node, exc)
        else:
            log.warning("offload of %s to %s lapsed after its record: completing it (its "
                        "users sent there)", e.server_id, e.node)
            self.ledger.finish(e)
            dep = e.deployment(edge)
            dep.intercepted = intent.intercepted
            self.cm.send_users(dep)
            if intent.handed_over_from:
                self.ledger.forget(intent.handed_over_from)
        self.ledger.release(e.server_id)
        return v

    def _servers(self, edge: EdgeClient) -> list[ServerInfo]:
        try:
            return edge.servers()
        except EdgeError as exc:
            log.info("orphans: %s did not list its servers: %s", edge.name, exc)
            return []

    def _end(self, edge: EdgeClient, s: ServerInfo) -> Verdict:
        if not self.ledger.fence(s.id):  # recorded since it was read: known
            return Verdict.KNOWN
        log.warning("server %s on %s is not in the ledger %.0f s after its handshake: "
                    "ending it (its data merged back)", s.id, edge.name,
                    time.time() - s.created_at)
        try:  # no user was sent there: the cloud's values are the newer ones
            edge.terminate(s.id, conflicts="cloud")
        except EdgeError as exc:  # fenced: ended at its node's next turn
            log.warning("orphan %s on %s: %s", s.id, edge.name, exc)
        return Verdict.ORPHAN

    def _run(self) -> None:  # (TurnJob)
        pool = ThreadPoolExecutor(4, thread_name_prefix="enorm-orphans")
        try:
            run_turns(self.period_s, self._stop, lambda i: self.turn(i, pool), "orphans")
        finally:  # a check in flight is not waited for: its node's next turn redoes it
            pool.shutdown(wait=False, cancel_futures=True)

