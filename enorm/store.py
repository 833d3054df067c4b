"""The node's durable state in its local Redis (AOF): edge servers, their users, events.

Ports and addresses in use are not stored apart: they are read off the server records,
so there is one source of truth and nothing to keep in step. Key names are built in
one place, `Store.key`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
import shutil
import subprocess
import time
from pathlib import Path

import psutil
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from enorm.protocol import (
    Access,
    Event,
    Resources,
    ServerInfo,
    SetupRequest,
    SetupResponse,
    TerminationReason,
    User,
)

EVENTS_KEPT = 10_000


class StoreError(RuntimeError):
    """The node's Redis cannot be reached or started; the message says where."""


class ServerRecord(ServerInfo):
    """What the node keeps of a server beyond what it shows the cloud."""

    redis_password: str
    ssh_public_key: str
    # Why a termination began: a restart that finishes it reports the same reason.
    end_reason: TerminationReason | None = None
    # The transparent redirects are switched on (a restart puts them back).
    redirecting: bool = False
    # SHA-256 (hex) of the key a handover's old node imports this server's data with.
    handover_digest: str | None = None
    # Users whose data went to another node's server (`handed_to`): not merged from here.
    handed_to: str | None = None
    handed_users: list[str] = []

    @classmethod
    def admitted(cls, req: SetupRequest, *, sid: str, owner: str, container: str,
                 address: str, host_ports: list[int], limits: Resources,
                 created_at: float) -> ServerRecord:
        """A launching server's record: what the setup request asked for, as it asked,
        and where the node put it; `host_ports` are the access port, then one per port
        of the request, in its order."""
        return cls(
            **req.model_dump(mode="json", include=_AS_REQUESTED),
            id=sid, owner=owner, state="launching", container=container, address=address,
            access_port=host_ports[0], ports=dict(zip(req.ports, host_ports[1:], strict=True)),
            limits=limits, users=len(req.users), created_at=created_at,
            redis_password=secrets.token_urlsafe(18),
            handover_digest=key_digest(req.handover_key) if req.handover_key else None,
        )

    def response(self, public_host: str) -> SetupResponse:
        """The setup request's answer (201): how the cloud manager reaches its server."""
        return SetupResponse(server_id=self.id, access=Access(host=public_host,
                                                              port=self.access_port),
                             **self.model_dump(include=set(SetupResponse.model_fields)))

    def info(self) -> ServerInfo:
        return ServerInfo(**self.model_dump(include=set(ServerInfo.model_fields)))


# The setup request's fields a record keeps as they came (`ports` and `users` change
# shape: host ports per container port, a count; the node keeps the users apart).
_AS_REQUESTED = (set(SetupRequest.model_fields) & set(ServerRecord.model_fields)) - {
    "ports", "users"}


def key_digest(key: str) -> str:
    """What the node keeps of a handover key: its SHA-256 (hex)."""
    return hashlib.sha256(key.encode()).hexdigest()


class Store:
    def __init__(self, client: redis.Redis, node: str) -> None:
        self.r = client
        self.node = node

    def key(self, *parts: str) -> str:
        return ":".join(("enorm", self.node, *parts))

    # -- servers -------------------------------------------------------------------------
    def save(self, rec: ServerRecord, users: list[User] | None = None) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self.key("servers"), rec.id, rec.model_dump_json())
        if users is not None:
            pipe.set(self.key("users", rec.id), json.dumps([u.model_dump(mode="json")
                                                           for u in users]))
        pipe.execute()

    def get(self, sid: str) -> ServerRecord | None:
        raw = self.r.hget(self.key("servers"), sid)
        return ServerRecord.model_validate_json(raw) if raw else None

    def servers(self) -> list[ServerRecord]:
        return [ServerRecord.model_validate_json(v)
                for v in self.r.hgetall(self.key("servers")).values()]

    def users(self, sid: str) -> list[User]:
        raw = self.r.get(self.key("users", sid))
        return [User(**u) for u in json.loads(raw)] if raw else []

    def user_ids(self, sid: str) -> list[str]:
        return [u.id for u in self.users(sid)]

    def user_addresses(self, sids: list[str]) -> dict[str, list[str]]:
        """Every listed server's user addresses in one round trip, as stored.

        No `User` models: the addresses were validated when the setup request came in,
        and validating 16,384 of them again cost ~0.1 s of every auto-scaling round.
        """
        pipe = self.r.pipeline(transaction=False)
        for sid in sids:
            pipe.get(self.key("users", sid))
        return {sid: [str(u["address"]) for u in json.loads(raw)] if raw else []
                for sid, raw in zip(sids, pipe.execute(), strict=True)}

    def delete(self, sid: str, event: Event | None = None, outbox_url: str | None = None) -> None:
        """Forget a server; with `event`, record it (and queue it for `outbox_url`) in the
        same transaction, so that a crash leaves either the server or its event."""
        pipe = self.r.pipeline(transaction=True)
        pipe.hdel(self.key("servers"), sid)
        pipe.delete(self.key("users", sid))
        if event is not None:
            self._queue_event(pipe, event, outbox_url)
        pipe.execute()

    # -- events --------------------------------------------------------------------------
    def _queue_event(self, pipe: redis.client.Pipeline, event: Event,
                     outbox_url: str | None) -> None:  # fmt: skip
        pipe.lpush(self.key("events"), event.model_dump_json())
        pipe.ltrim(self.key("events"), 0, EVENTS_KEPT - 1)
        if outbox_url:
            pipe.hset(self.key("outbox"), event.id,
                      json.dumps({"url": outbox_url, "event": event.model_dump()}))

    def add_event(self, event: Event, outbox_url: str | None = None) -> None:
        """Record an event, and queue it for `outbox_url`, in one transaction."""
        pipe = self.r.pipeline(transaction=True)
        self._queue_event(pipe, event, outbox_url)
        pipe.execute()

    def events(self, limit: int = 100, server_id: str | None = None,
               owner: str | None = None) -> list[Event]:
        """Newest first; only one server's or one owner's when asked."""
        out = []
        for raw in self.r.lrange(self.key("events"), 0, EVENTS_KEPT):
            ev = Event.model_validate_json(raw)
            if (server_id is None or ev.server_id == server_id) and (
                    owner is None or ev.owner == owner):
                out.append(ev)
                if len(out) >= limit:
                    break
        return out

    # -- outbox: events not yet acknowledged by the cloud ---------------------------------
    def outbox(self) -> list[tuple[str, Event]]:
        out = []
        for raw in self.r.hgetall(self.key("outbox")).values():
            item = json.loads(raw)
            out.append((item["url"], Event(**item["event"])))
        return sorted(out, key=lambda x: x[1].at)

    def outbox_ack(self, event_id: str) -> None:
        self.r.hdel(self.key("outbox"), event_id)

    def wipe(self) -> None:
        """Forget the node entirely (decommissioning, tests)."""
        keys = list(self.r.scan_iter(match=self.key("*"), count=1000))
        if keys:
            self.r.delete(*keys)


# -- the node's own Redis ---------------------------------------------------------------
def managed_socket(state_dir: Path) -> Path:
    return state_dir / "store.sock"


def open_store(store_url: str | None, state_dir: Path, timeout: float = 10.0) -> redis.Redis:
    """Connect to the node's Redis; with no URL, start (or reuse) one under state_dir.

    The managed Redis is a separate daemonised process with AOF, so it outlives a killed
    enorm daemon and the next start finds the state where it was.
    """
    if store_url:
        client = redis.Redis.from_url(store_url, socket_timeout=timeout)
        try:
            client.ping()
        except redis.RedisError as exc:
            raise StoreError(f"store_url {store_url}: {exc}") from None
        return client
    state_dir.mkdir(parents=True, exist_ok=True)
    sock = managed_socket(state_dir)
    # Probing must not sit in redis-py's retry back-off (seconds) while nobody listens.
    probe = redis.Redis(unix_socket_path=str(sock), socket_timeout=timeout,
                        retry=Retry(NoBackoff(), 0))
    client = redis.Redis(unix_socket_path=str(sock), socket_timeout=timeout)
    if sock.exists():
        try:
            probe.ping()
            return client
        except redis.RedisError:
            pass
    server = shutil.which("redis-server")
    if server is None:
        raise StoreError("store: redis-server is not installed (apt-get install redis-server)")
    sock.unlink(missing_ok=True)
    proc = subprocess.run(
        [
            server, "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "600",
            "--dir", str(state_dir), "--appendonly", "yes", "--appendfsync", "everysec",
            "--save", "", "--daemonize", "yes",
            "--pidfile", str(state_dir / "store.pid"),
            "--logfile", str(state_dir / "store.log"),
        ],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise StoreError(f"store: redis-server failed to start: {proc.stderr.strip()}")
    deadline = time.monotonic() + timeout
    while True:
        try:
            probe.ping()
            return client
        except redis.RedisError:
            if time.monotonic() > deadline:
                raise StoreError(f"store: no answer on {sock} (see store.log)") from None
            time.sleep(0.01)


def stop_managed(state_dir: Path, timeout: float = 5.0) -> bool:
    """Stop the Redis that `open_store` started for this state dir, and only that one,
    whatever state it is in: found by the socket it serves (its process title names it;
    the pid file may be stale or gone after a crash), asked to shut down over that
    socket, then SIGTERM, then SIGKILL. Its data is in its AOF. Returns whether one ran."""
    procs = managed_processes(state_dir)
    if procs:
        try:
            redis.Redis(unix_socket_path=str(managed_socket(state_dir)), socket_timeout=timeout,
                        retry=Retry(NoBackoff(), 0)).shutdown(nosave=True)
        except redis.RedisError:
            pass
        _, alive = psutil.wait_procs(procs, timeout)
        for signal_them in (psutil.Process.terminate, psutil.Process.kill):
            for p in alive:
                with contextlib.suppress(psutil.Error):
                    signal_them(p)
            _, alive = psutil.wait_procs(alive, 2.0)
        if alive:
            raise StoreError(f"store: redis-server {[p.pid for p in alive]} of {state_dir} "
                             "did not stop")
    (state_dir / "store.pid").unlink(missing_ok=True)
    return bool(procs)


def managed_processes(state_dir: Path) -> list[psutil.Process]:
    """The redis-server processes serving this state dir's socket (one, normally)."""
    sock = str(managed_socket(state_dir))
    found = []
    for p in psutil.process_iter(["name", "cmdline"]):
        args = " ".join(p.info["cmdline"] or []).split()
        # Its title once started (`... unixsocket:PATH`), else its arguments.
        if (p.info["name"] or "").startswith("redis-server") and (
                f"unixsocket:{sock}" in args or sock in args):
            found.append(p)
    return found
