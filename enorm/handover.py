"""Handover between nodes, the edge side: the old server's node gives its users' keys
straight to the new server's node, which restores them into its server; the cloud manager
then switches the users and the old node ends its server with only the shared keys merged
home. The data never waits for the cloud's link, which the switch would otherwise cross
twice (edge -> cloud -> edge).

`Handovers` sequences both sides on a node: `hand_over` (the old server's: fence, send,
then end the server in the background, its handed users' keys left out of the merge) and
`import_data` (the new server's), each under the server's termination lock, so that a
termination waits and merges what is there.

Trust: the new server's setup request carried a one-time key (its SHA-256 is kept), and
only the holder of that key may write into that server; the receiving node writes only
keys of that server's own users, whatever the sender offers (a tenant's Redis on the old
node is tenant data, untrusted). The old node connects only where the operator's
destinations for that cloud manager allow (`to_url`, an IP literal: no name lookup).
"""

from __future__ import annotations

import base64
import hmac
import logging
import threading
import time
from collections.abc import Iterator

import requests

from enorm import datasync
from enorm.datasync import payloads
from enorm.migration import connect_container
from enorm.node import Forbidden, Node, NotFound
from enorm.protocol import (
    HandoverData,
    HandoverRequest,
    HandoverResult,
    ImportResult,
    TerminationReason,
)
from enorm.store import ServerRecord, key_digest
from enorm.termination import MigrationPending, Terminator

log = logging.getLogger(__name__)

POST_BYTES = 4 << 20  # per import request: well under the receiver's body limit (16 MB)
TIMEOUT_S = 30.0


class HandoverError(Exception):
    """The other node did not take the data; `status` is what the API answers with."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


def key_matches(rec: ServerRecord, key: str) -> bool:
    """Constant-time check of an import's key against the one the setup request gave."""
    if rec.handover_digest is None:
        return False
    return hmac.compare_digest(rec.handover_digest, key_digest(key))


def _batches(dumped: dict[bytes, tuple]) -> Iterator[list[tuple[str, str, int]]]:
    """The keys as wire triples, cut into requests of about POST_BYTES each."""
    batch: list[tuple[str, str, int]] = []
    size = 0
    for key, (payload, ttl) in dumped.items():
        batch.append((base64.b64encode(key).decode(), base64.b64encode(payload).decode(), ttl))
        size += (len(key) + len(payload)) * 4 // 3 + 16
        if size >= POST_BYTES:
            yield batch
            batch, size = [], 0
    yield batch  # the last one, possibly empty, says final


def send(rec: ServerRecord, users: list[str], shared_patterns: list[str], to_url: str,
         to_server: str, key: str, session: requests.Session) -> HandoverResult:  # fmt: skip
    """Dump the users' keys of the (fenced) server and post them to the other node;
    returns once the other node has restored and verified every one."""
    t0 = time.perf_counter()
    try:
        edge = connect_container(rec)
        try:
            dumped, others = datasync.export_users(edge, users, shared_patterns)
        finally:
            edge.close()
    except datasync.SyncError as exc:
        raise HandoverError(503, "source_unavailable", f"the server's Redis: {exc}") from None
    url = f"{to_url}/v1/servers/{to_server}/import"
    batches = list(_batches(dumped))
    written = 0
    for i, batch in enumerate(batches):
        body = HandoverData(keys=batch, final=i == len(batches) - 1).model_dump_json()
        try:
            r = session.post(url, data=body, timeout=TIMEOUT_S, allow_redirects=False,
                             headers={"Authorization": f"Bearer {key}",
                                      "Content-Type": "application/json"})
        except requests.RequestException as exc:
            raise HandoverError(502, "peer_unreachable", f"{to_url}: {exc}") from None
        if r.status_code != 200:
            raise HandoverError(502, "peer_refused", f"{to_url} answered {r.status_code}: "
                                f"{r.text[:300]}")
        try:
            written += ImportResult.model_validate_json(r.content).keys
        except ValueError:
            raise HandoverError(502, "peer_refused", f"{to_url}: not an import result") from None
    if written != len(dumped):
        raise HandoverError(502, "peer_refused", f"{to_url} restored {written} of "
                            f"{len(dumped)} keys")
    return HandoverResult(server_id=rec.id, to_server=to_server, keys=written,
                          bytes=sum(len(k) + len(p) for k, (p, _) in dumped.items()),
                          others=others, seconds=round(time.perf_counter() - t0, 4))


def receive(rec: ServerRecord, users: list[str], data: HandoverData) -> ImportResult:
    """Restore what the old node sent into this server's Redis: only keys tagged with one
    of its users (RESTORE checks each payload: a refused one is a 400)."""
    owned = {u.encode() for u in users}
    keep: dict[bytes, tuple[bytes, int]] = {}
    refused = 0
    for k64, p64, ttl in data.keys:
        try:
            key = base64.b64decode(k64, validate=True)
            payload = base64.b64decode(p64, validate=True)
        except ValueError:
            raise ValueError("keys: an item is not base64") from None
        if ttl < 0 or not payload or datasync.hash_tag(key) not in owned:
            refused += 1
            continue
        keep[key] = (payload, ttl)
    try:
        edge = connect_container(rec)
    except datasync.SyncError as exc:
        raise HandoverError(503, "unavailable", f"the server's Redis: {exc}") from None
    try:
        written = payloads.restore(edge, keep, replace=True) if keep else []
    except (datasync.DestinationUnreachable, datasync.VerificationFailed) as exc:
        raise HandoverError(503, "unavailable", f"the server's Redis: {exc}") from None
    except datasync.SyncError as exc:  # RESTORE refused a payload
        raise ValueError(f"keys: {exc}") from None
    finally:
        edge.close()
    return ImportResult(keys=len(written), refused=refused)


class Handovers:
    """A node's side of handovers: giving a server's users away, taking them in."""

    def __init__(self, node: Node, ends: Terminator) -> None:
        self.node = node
        self.ends = ends
        self._peer = requests.Session()  # node to node; no proxy from the environment
        self._peer.trust_env = False

    def hand_over(self, sid: str, req: HandoverRequest,
                  owner: str | None = None) -> HandoverResult:
        """Give the server's users, data included, to `req.to_server` on another node:
        fence the server, send the keys, and once the other node holds them all end this
        server in the background, its shared keys merged home but not the handed users'
        keys. If the other node does not take them, the fence goes and the server serves
        on (HandoverError)."""
        node = self.node
        busy = self.ends.busy(node.get(sid, owner).id)
        if not busy.acquire(blocking=False):
            raise HandoverError(409, "not_running", f"server {sid} is busy (being handed "
                                "over or receiving data)")
        try:
            rec = node.get(sid)
            if rec.state != "running":
                raise HandoverError(409, "not_running", f"server {sid} is {rec.state}")
            moving = node.store.user_ids(sid)
            self.ends.fence(rec)
            try:
                patterns = rec.data_sink.shared_patterns if rec.data_sink else []
                result = send(rec, moving, patterns, req.to_url, req.to_server, req.key,
                              self._peer)
            except BaseException:
                node.firewall.unfence(rec.id)
                raise
            with node.lock:
                rec = node.get(sid)
                rec.handed_to, rec.handed_users = req.to_server, moving
                node.store.save(rec)
        finally:
            busy.release()
        threading.Thread(target=self._end_handed, args=(sid, result), daemon=True,
                         name=f"handed-{sid}").start()
        return result

    def _end_handed(self, sid: str, result: HandoverResult) -> None:
        try:  # this server alone, whatever its termination mode: its siblings serve on
            self.ends.end(sid, TerminationReason.HANDOVER,
                          {"handed_to": result.to_server, "keys_handed": result.keys})
        except (MigrationPending, NotFound):
            pass  # kept for a retry / ended by someone else meanwhile
        except Exception:  # noqa: BLE001 (a thread of its own: log it)
            log.exception("ending %s after its handover", sid)

    def import_data(self, sid: str, key: str, data: HandoverData) -> ImportResult:
        """The receiving side: `key` must be the one of the setup request; the last
        request (`final`) spends it."""
        node = self.node
        rec = node.store.get(sid)
        if rec is None or not key_matches(rec, key):
            raise Forbidden(sid)
        with self.ends.busy(sid):
            rec = node.get(sid)
            if rec.state != "running":
                raise HandoverError(409, "not_running", f"server {sid} is {rec.state}")
            result = receive(rec, node.store.user_ids(sid), data)
            if data.final:
                with node.lock:
                    rec = node.get(sid)
                    rec.handover_digest = None
                    node.store.save(rec)
        return result
