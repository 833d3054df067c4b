"""Handover between nodes, the cloud's side (`CloudManager.handover`), start-first.

The new server is admitted on another node (`to`, or where the placement puts the users;
never their current node), started, and its Redis reached through the SSH forward, while
the old server keeps serving. Then the switch, by one of two paths (`handover_path`):

- `direct` (the default): the old node fences its server and gives the users' keys
  straight to the new node, which restores and verifies them; the users go there, and
  the old node merges only the shared keys home and destroys its server afterwards; the
  new server inherits the old one's manifest, so its own merge still tells deletes and
  conflicts against what the cloud gave out first. The users wait (their requests
  retried) while the keys move, which costs no crossing of the cloud's link.
- `cloud`, or where the old node may not reach the new one (the operator's
  destinations): the users go to the cloud, the old node fences, merges back and
  destroys its server, the users' data is copied to the new server and they are sent
  there; the cloud serves them in between (edge -> cloud -> edge).

`timings["interruption"]` is the switch: from the first call that touches the old
server to the users' redirection.

The two halves can be apart (`prepare`, then `Prepared.complete` or `Prepared.cancel`):
the policy loop prepares the new server while it waits out its dwell time, so that the
move, once decided, is the switch alone.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import redis

from enorm import datasync
from enorm.protocol import TerminationReason, User

from .deployer import DeployError
from .edge_client import EdgeError

if TYPE_CHECKING:
    from .orchestrator import CloudManager, Deployment

log = logging.getLogger(__name__)

PATHS = ("direct", "cloud")


class HandoverFailed(DeployError):
    """A handover stopped half-way; `state` says where the users and their data are."""

    def __init__(self, message: str, state: str):
        super().__init__(f"{message} ({state})")
        self.state = state


def hand_over(cm: CloudManager, old: Deployment, to: str | None,
              users: Sequence[User] | None, over: dict,
              before_redirect: Callable[[Deployment], None] | None = None) -> Deployment:
    """Move `old`'s users to a new server on another node, start-first. `users` gives
    their addresses now (they moved into another node's area); same ids. Returns the
    new deployment. `before_redirect(new)`: once the new server holds the users' data,
    before they are sent there (`Prepared.complete`).

    If the old server's data cannot be merged (its node lost the cloud), the users stay
    on the cloud and the new server is withdrawn: HandoverFailed."""
    return prepare(cm, old, to, users, over).complete(before_redirect)


def _check(old: Deployment) -> None:
    if old.ended.is_set() or old.state != "deployed":
        raise ValueError(f"server {old.server_id} is {old.state}: nothing to hand over")


@dataclass
class Prepared:
    """The first half of a handover: the new server started and answering, its Redis
    reached; the old one still serves its users, nothing of theirs has moved."""

    cm: Any  # CloudManager
    old: Deployment
    new: Deployment
    edge: datasync.Client
    key: str | None
    seconds: float  # what preparing took

    def complete(self, before_redirect: Callable[[Deployment], None] | None = None
                 ) -> Deployment:
        """The switch: the users and their data to the new server. The old server must
        still serve them (else ValueError, and the new one is ended). `before_redirect
        (new)` runs once the new server holds the data, before the users are sent there
        (where the ledger records it); if it fails, the users go to the cloud with
        their data merged there from both servers (HandoverFailed)."""
        try:
            _check(self.old)
        except ValueError:
            self.cancel()
            raise
        return _complete(self, before_redirect)

    def cancel(self) -> None:
        """Not needed after all (the users did not go there): the new server ended."""
        self.edge.close()
        self.cm.abandon(self.new, restore=False)


def prepare(cm: CloudManager, old: Deployment, to: str | None,
            users: Sequence[User] | None, over: dict) -> Prepared:
    """A new server for `old`'s users on another node (`to`, or where the placement puts
    them), started and answering; nothing moved yet."""
    _check(old)
    moving = list(users) if users is not None else list(old.users)
    if sorted(u.id for u in moving) != sorted(old.user_ids):
        raise ValueError("users: a handover moves the deployment's own users")
    t0 = time.perf_counter()
    key = secrets.token_urlsafe(32) if cm.handover_path != "cloud" else None
    new = cm.admit(moving, [old.edge.name], to, {**over, "handover_key": key} if key else over,
                   handed_over_from=old.server_id)
    try:  # start-first: the old server serves until the new one answers
        cm.connect(new)
        cm.over_ssh(new, cm.start_server)
        cm.wait_ready(new)
        edge = datasync.connect(new.redis_forward(), timeout=30)  # ready for the copy
        edge.ping()
    except BaseException:
        log.exception("handover of %s: the new server %s on %s did not start",
                      old.server_id, new.server_id, new.edge.name)
        cm.abandon(new, restore=False)
        raise
    return Prepared(cm, old, new, edge, key, time.perf_counter() - t0)


def _complete(p: Prepared, before_redirect: Callable[[Deployment], None] | None
              ) -> Deployment:
    cm, old, new, edge, key = p.cm, p.old, p.new, p.edge, p.key
    t0 = time.perf_counter() - p.seconds  # `total`: preparing and switching, no wait between
    if key is not None:
        try:  # the shared keys the app names, as the cloud has them now
            datasync.copy_shared(cm.cloud, edge, cm.app.shared_keys_for(new.user_ids),
                                 datasync.SyncReport())
        except BaseException:
            log.exception("handover of %s: shared keys to %s", old.server_id, new.server_id)
            p.cancel()
            raise
        if _direct(cm, old, new, key, before_redirect):
            edge.close()
            new.timings["total"] = time.perf_counter() - t0
            return new
        # A refused import may have written part of the keys, which the old server
        # has served on since: the copy below starts from none of theirs.
        datasync.delete_users(edge, new.user_ids)
    t_switch = time.perf_counter()
    new.handover_path = "cloud"
    try:
        _end_old(cm, old, new)
    except BaseException:
        edge.close()
        raise
    try:
        cm.copy(new, edge)
        if before_redirect is not None:
            before_redirect(new)
    except BaseException as exc:
        cm.abandon(new, restore=False)
        raise HandoverFailed(f"{new.server_id}: {exc}", "users on the cloud, their data "
                             "merged") from None
    cm.send_users(new)
    now = time.perf_counter()
    new.timings["interruption"] = now - t_switch
    new.timings["total"] = now - t0
    return new


def _direct(cm: CloudManager, old: Deployment, new: Deployment, key: str,
            before_redirect: Callable[[Deployment], None] | None = None) -> bool:
    """The users' data edge -> edge: the old node fences its server and gives the keys
    to the new one, then the users go there; they are never served by the cloud
    meanwhile (its copy of their data is stale until the new server's merge, which
    inherits the old one's manifest). False, with nothing moved and the old server
    serving, when the old node cannot (no such destination allowed, the new node
    unreachable from it): the caller goes through the cloud instead."""
    t_switch = time.perf_counter()
    try:
        result = old.edge.hand_over(old.server_id, new.edge, new.server_id, key)
    except EdgeError as exc:
        if exc.status is not None and (exc.status < 500 or exc.status in (502, 503)):
            # the node answered that nothing moved (and lifted its fence)
            log.info("handover of %s: no direct path (%s); through the cloud",
                     old.server_id, exc)
            return False
        # No answer: the old node may or may not have given the keys.
        _end_both(cm, old, new, f"{old.edge.name} did not answer the handover: {exc}")
    old.timings["handover"] = time.perf_counter() - t_switch
    # Only now, with the keys on the new server: its merge tells deletes from the
    # manifest, and a manifest without the keys would delete them all on the cloud.
    datasync.move_manifest(cm.cloud, datasync.manifest_key(old.server_id),
                           datasync.manifest_key(new.server_id))
    if before_redirect is not None:
        try:
            before_redirect(new)
        except BaseException as exc:  # the keys moved, the users not sent: as above
            _end_both(cm, old, new, f"{new.server_id}: {exc}")
    cm.send_users(new)
    now = time.perf_counter()
    new.timings["interruption"] = now - t_switch
    new.timings["data"] = result.seconds
    new.handover_path = "direct"
    new.keys_received = result.keys
    with cm.lock:  # the old node's `server.terminated` comes later: already ended
        old.state, old.end_reason = "handed_over", TerminationReason.HANDOVER
        old.keys_migrated = result.keys
        old.confirmed = True  # verified on the new server, key by key
        old.ended.set()
    cm.close_session(old)
    return True


def _end_both(cm: CloudManager, old: Deployment, new: Deployment, why: str) -> NoReturn:
    """A direct switch that cannot go on, the keys maybe given to the new server: both
    servers end, each merging what it holds (the new one with the inherited manifest),
    and the users stay on the cloud (HandoverFailed)."""
    log.warning("handover of %s: %s; ending both servers", old.server_id, why)
    try:
        _end_old(cm, old, new)
    finally:
        cm.abandon(new, restore=False)
    # Both merged what they held; a handed-over old server leaves its manifest.
    with contextlib.suppress(redis.RedisError):
        cm.cloud.delete(datasync.manifest_key(old.server_id))
    raise HandoverFailed(why, "users on the cloud, their data merged from both servers"
                         ) from None


def _end_old(cm: CloudManager, old: Deployment, new: Deployment) -> None:
    """Users to the cloud, then the old node fences, merges and destroys its server."""
    t = time.perf_counter()
    cm.users_home(old)
    with cm.lock:  # its `server.terminated` may come before the answer: a handover either way
        old.state = "handing_over"
    try:
        result = old.edge.terminate(old.server_id)
    except EdgeError as exc:
        with cm.lock:
            if old.state == "handing_over":
                old.state = "deployed"
        cm.abandon(new, restore=False)
        raise HandoverFailed(f"{old.edge.name} did not end {old.server_id}: {exc}",
                             "users on the cloud, their data on the old node") from None
    old.timings["terminate"] = time.perf_counter() - t
    pending = old.server_id in result.pending
    with cm.lock:
        if pending:
            old.state, old.end_reason = "migration_pending", TerminationReason.HANDOVER
        elif not old.ended.is_set():  # else its event came first
            cm.finish(old, "handed_over", TerminationReason.HANDOVER, result.keys_migrated)
    if pending:
        cm.abandon(new, restore=False)
        raise HandoverFailed(f"{old.server_id}'s merge is pending on {old.edge.name}",
                             "users on the cloud, their data kept on the old node")
