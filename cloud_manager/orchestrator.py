"""The cloud manager: offload users to an edge node and bring them home (Procedures 1-4
from the cloud's side), with failover over the configured edge nodes.

Offloading (`CloudManager.offload`):
  handshake with the first edge node that admits (409 -> the next one), in the
  placement's order (`first`: as configured; `scored`: placement.py, from the nodes'
  offers and their probes of the users; nodes the registry holds down are passed over),
  SSH into the
  container, upload + start the partitioned server while the users' keys are copied
  cloud -> container Redis (through an SSH port forward; verified), wait until the
  server answers on its user-facing port, and only then redirect the users to it.
Withdrawal (`CloudManager.withdraw`, the cloud's override):
  redirect the users back first, then DELETE on the edge node, which merges the edge data
  into the cloud Redis (user keys replace, shared keys union) before it destroys the
  container; then confirm on the cloud that the users' data is there.
Edge-initiated termination (`CloudManager.handle_event`, behind `POST /edge-events`):
  the edge merged the data already; redirect the users back and confirm it arrived; with
  `rehome`, a server the node ended for resources has its users offloaded again to
  another node.
Handover between nodes (`CloudManager.handover`, start-first): the new server is started
  on another node first. `direct` (the default): the old node fences its server and gives
  the users' keys straight to the new node, which restores and verifies them; the users
  go there, and the old node merges only the shared keys home and destroys its server
  afterwards; the new server inherits the old one's manifest, so its own merge still
  tells deletes and conflicts against what the cloud gave out first. The users wait
  (their requests retried) while the keys move, which costs no crossing of the cloud's
  link. Where the old node may not reach the new one (the operator's destinations), or
  with `cloud`: the users go to the cloud, the old node fences, merges back and destroys
  its server, the users' data is copied to the new server and they are sent there; the
  cloud serves them in between (edge -> cloud -> edge).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import paramiko
import redis
from flask import Blueprint, jsonify, request
from pydantic import ValidationError

from enorm import datasync
from enorm.protocol import DataSink, Event, SetupRequest, SetupResponse, TerminationReason, User

from .deployer import Deployer, DeployError, Session, wait_http
from .edge_client import EdgeClient, EdgeError, Rejected
from .placement import Candidate, Policy, Weights, cost, order
from .registry import Heartbeats, Registry

log = logging.getLogger(__name__)

CONTAINER_REDIS_PORT = 6379


class NoEdgeAvailable(Exception):
    """Every configured edge node refused (409) or could not be reached."""

    def __init__(self, refusals: dict[str, str]):
        super().__init__("no edge node admitted the server: "
                         + "; ".join(f"{n}: {r}" for n, r in refusals.items()))
        self.refusals = refusals


HANDOVER_PATHS = ("direct", "cloud")


class HandoverFailed(DeployError):
    """A handover stopped half-way; `state` says where the users and their data are."""

    def __init__(self, message: str, state: str):
        super().__init__(f"{message} ({state})")
        self.state = state


@dataclass
class EdgeContext:
    """What an application needs to know to run in one container."""

    gateway: str  # the edge node's host as the container sees it
    redis_url: str  # the container's own Redis, from inside the container
    port: int  # the container port the server listens on


@dataclass
class App:
    """What the cloud manager deploys: the application's side of the contract."""

    name: str
    port: int  # container port the users reach (forwarded to a host port)
    files: dict[str, Path]  # remote path -> local file
    command: list[str]
    env: Callable[[EdgeContext], dict[str, str]]
    redirect: Callable[[Sequence[str], str], object]  # users -> edge URL
    restore: Callable[[Sequence[str]], object]  # users -> back to the cloud
    # The app's data, declared once: keys without a user's hash tag that the edge also
    # writes (merged back by union), and the users' keys whose cloud value wins a
    # conflict. The cloud manager's DataSink takes them from here.
    shared_patterns: list[str] = field(default_factory=list)
    cloud_wins_patterns: list[str] = field(default_factory=list)
    # Where a user's keys are (fixed names, families listed in index keys): the offload
    # reads them by name, so its cost does not grow with the cloud's other users. None:
    # a scan of the cloud's keyspace finds them (fine for small clouds).
    key_schema: datasync.KeySchema | None = None
    # A key every user has: checked on the cloud after termination.
    user_key: Callable[[str], str] | None = None
    health_path: str = "/healthz"


@dataclass
class Deployment:
    """One edge server serving some of the cloud's users."""

    edge: EdgeClient
    setup: SetupResponse
    users: list[str]
    url: str  # the user-facing base URL of the edge server
    members: list[User] = field(default_factory=list)  # the users with their addresses
    session: Session | None = None
    state: str = "deployed"  # deployed | withdrawn | terminated | migration_pending |
    # handed_over
    timings: dict[str, float] = field(default_factory=dict)
    copy: datasync.SyncReport | None = None
    refused: dict[str, str] = field(default_factory=dict)  # edges that said no first
    # How the node was chosen: the order asked and, when scored, each node's figures.
    placement: dict = field(default_factory=dict)
    # The node redirects the users' traffic itself (transparent redirection).
    intercepted: bool = False
    end_reason: TerminationReason | None = None
    keys_migrated: int | None = None
    confirmed: bool | None = None  # the users' data was found on the cloud at the end
    handed_over_from: str | None = None  # the server these users came from
    handover_path: str | None = None  # direct (edge -> edge) | cloud (edge -> cloud -> edge)
    keys_received: int | None = None  # the users' keys the old node gave (direct)
    ended: threading.Event = field(default_factory=threading.Event)

    @property
    def server_id(self) -> str:
        return self.setup.server_id

    @property
    def keys_copied(self) -> int:
        """The users' keys it was given: from the cloud, or from the old node (direct)."""
        return self.copy.keys if self.copy else self.keys_received or 0

    def redis_forward(self) -> str:
        """A redis:// URL on 127.0.0.1 that leads to the container's Redis (over SSH)."""
        if self.session is None:
            raise DeployError("no SSH session to the edge server")
        fw = self.session.forward("127.0.0.1", CONTAINER_REDIS_PORT)
        pw = quote(self.setup.redis_password, safe="")
        return f"redis://:{pw}@127.0.0.1:{fw.local_port}/0"


class CloudManager:
    """The library a cloud application server embeds to use edge nodes."""

    def __init__(self, edges: Iterable[EdgeClient], app: App, *, cloud_redis: datasync.Client,
                 sink: DataSink, callback_url: str | None = None,
                 deployer: Deployer | None = None, priority: int = 5,
                 latency_objective_ms: float = 50.0, override: bool = False,
                 ready_timeout: float = 30.0, registry: Registry | None = None,
                 placement: Policy = "first", weights: Weights | None = None,
                 probe_sample: int = 64, rehome: bool = False,
                 handover_path: str = "direct"):  # fmt: skip
        if placement not in ("first", "scored"):
            raise ValueError(f"placement must be 'first' or 'scored', not {placement!r}")
        if handover_path not in HANDOVER_PATHS:
            raise ValueError(f"handover_path must be one of {HANDOVER_PATHS}, not "
                             f"{handover_path!r}")
        self.handover_path = handover_path
        self.edges = list(edges)
        self.registry = registry
        self.placement, self.weights = placement, weights or Weights()
        self.probe_sample = probe_sample
        self.rehome = rehome
        self.rehomed: dict[str, Deployment | Exception] = {}  # ended server -> what followed
        self._heartbeats: Heartbeats | None = None
        self.app = app
        self.cloud = cloud_redis
        self.sink = sink_for(app, sink)
        self.callback_url = callback_url
        self.deployer = deployer or Deployer()
        self.priority, self.latency_objective_ms = priority, latency_objective_ms
        self.override = override
        self.ready_timeout = ready_timeout
        self.deployments: dict[str, Deployment] = {}
        self._lock = threading.RLock()
        self._closing = threading.Event()

    # -- Procedures 1-3: handshake and deployment ----------------------------------------
    def request_for(self, users: Sequence[User], **over) -> SetupRequest:
        return SetupRequest(
            app=over.pop("app", self.app.name),
            priority=over.pop("priority", self.priority),
            ports=[self.app.port],
            users=list(users),
            latency_objective_ms=over.pop("latency_objective_ms", self.latency_objective_ms),
            ssh_public_key=self.deployer.public_key,
            data_sink=self.sink,
            callback_url=over.pop("callback_url", self.callback_url),
            override=over.pop("override", self.override),
            **over,
        )

    def place(self, req: SetupRequest, exclude: Iterable[str] = (), only: str | None = None
              ) -> tuple[list[EdgeClient], dict[str, str], dict]:
        """The nodes to ask, in order, the ones passed over (down) and, for the record,
        the figures the order came from; never the nodes in `exclude`, only `only` if
        given."""
        refused: dict[str, str] = {}
        skip = set(exclude)
        edges = [e for e in self.edges if e.name not in skip and only in (None, e.name)]
        if only is not None and not edges:
            raise ValueError(f"no edge node named {only!r} besides the excluded ones")
        if self.registry is not None:
            edges, candidates = [], edges
            for e in candidates:
                if self.registry.up(e.name):
                    edges.append(e)
                else:
                    refused[e.name] = "down (no heartbeat)"
        if self.placement == "first" or len(edges) < 2:
            return edges, refused, {"policy": self.placement,
                                    "order": [e.name for e in edges]}
        sample = [str(u.address) for u in req.users[: self.probe_sample]]
        with ThreadPoolExecutor(min(16, len(edges))) as pool:
            cands = list(pool.map(lambda e: self._candidate(e, req, sample), edges))
        names = order(cands, "scored", self.weights)
        by_name = {e.name: e for e in edges}
        return [by_name[n] for n in names], refused, {
            "policy": "scored", "order": names,
            "nodes": {c.name: {"latency_ms": c.latency_ms, "free_units": c.free_units,
                               "load": c.load, "admits": c.admits,
                               "cost": round(cost(c, self.weights), 3)}
                      for c in cands}}

    def _candidate(self, edge: EdgeClient, req: SetupRequest,
                   sample: list[str]) -> Candidate:
        """One node's figures: its offer (the registry's, else asked now) and its probe of
        a sample of the users; what it cannot answer counts as unknown."""
        offer = None
        if self.registry is not None and (st := self.registry.get(edge.name)) is not None:
            offer = st.offer
        try:
            offer = offer or edge.offer()
        except EdgeError:
            return Candidate(edge.name, admits=False)
        try:
            latency = edge.probe(sample).median_ms if sample else None
        except EdgeError as exc:
            log.info("edge %s: probe failed: %s", edge.name, exc)
            latency = None
        units = min(offer.free.cores / offer.unit.cores if offer.unit.cores else 0.0,
                    offer.free.memory_mb / offer.unit.memory_mb if offer.unit.memory_mb else 0.0)
        room = units >= 1.0
        preempt = not room and offer.admission == "preempt"
        return Candidate(
            edge.name, latency_ms=latency, free_units=units, load=offer.load,
            admits=req.priority >= offer.min_priority and (room or preempt),
            needs_preemption=preempt)

    def handshake(self, req: SetupRequest) -> tuple[EdgeClient, SetupResponse, dict[str, str]]:
        """The first node that admits, in the placement's order; 409s, dead nodes and
        nodes the registry holds down are skipped."""
        edge, setup, refused, _ = self._handshake(req)
        return edge, setup, refused

    def _handshake(self, req: SetupRequest, exclude: Iterable[str] = (), only: str | None = None
                   ) -> tuple[EdgeClient, SetupResponse, dict[str, str], dict]:
        edges, refused, placed = self.place(req, exclude, only)
        for edge in edges:
            try:
                return edge, edge.setup(req), refused, placed
            except Rejected as exc:
                refused[edge.name] = exc.reason
            except EdgeError as exc:
                refused[edge.name] = f"unreachable: {exc}"
            log.info("edge %s refused: %s", edge.name, refused[edge.name])
        raise NoEdgeAvailable(refused)

    def offload(self, users: Sequence[User | tuple[str, str] | str],
                exclude: Iterable[str] = (), **over) -> Deployment:
        """Move `users` to an edge server (on none of the nodes in `exclude`); returns
        once they are redirected there."""
        users = [_user(u) for u in users]
        t0 = time.perf_counter()
        dep = self._admitted(users, exclude, None, over)
        try:
            self._connect(dep)
            self._over_ssh(dep, self._start_server, self._copy)
            self._wait_ready(dep)
        except BaseException:
            log.exception("deployment of %s on %s failed; withdrawing", dep.server_id,
                          dep.edge.name)
            self._abandon(dep)
            raise
        self._send_users(dep)
        dep.timings["total"] = time.perf_counter() - t0
        return dep

    def _admitted(self, users: list[User], exclude: Iterable[str], only: str | None,
                  over: dict) -> Deployment:
        """Handshake (placement, then the first node that admits): a new deployment."""
        t0 = time.perf_counter()
        req = self.request_for(users, **over)
        edge, setup, refused, placed = self._handshake(req, exclude, only)
        dep = Deployment(edge=edge, setup=setup, users=[u.id for u in users], members=users,
                         refused=refused, placement=placed, intercepted=bool(req.intercept),
                         url=f"http://{setup.access.host}:{setup.ports[self.app.port]}")
        dep.timings["handshake"] = time.perf_counter() - t0
        with self._lock:
            self.deployments[setup.server_id] = dep
        return dep

    def _connect(self, dep: Deployment) -> None:
        t = time.perf_counter()
        dep.session = self.deployer.connect(dep.setup.access)
        dep.timings["ssh"] = time.perf_counter() - t

    def _over_ssh(self, dep: Deployment, *steps: Callable[[Deployment], None]) -> None:
        """Run the steps side by side over the deployment's SSH session; if the session
        dropped meanwhile (a container's sshd restarting just after boot), connect again
        and run them once more (each step is idempotent: the upload overwrites, the copy
        replaces and writes a fresh manifest)."""
        for attempt in (1, 2):
            try:
                with ThreadPoolExecutor(len(steps), thread_name_prefix="deploy") as pool:
                    for f in [pool.submit(step, dep) for step in steps]:
                        f.result()
                return
            except (paramiko.SSHException, EOFError, OSError, datasync.SyncError) as exc:
                if attempt == 2 or dep.session is None or dep.session.transport.is_active():
                    raise
                log.warning("SSH session to %s dropped (%s); connecting again",
                            dep.server_id, exc)
                self._close_session(dep)
                self._connect(dep)

    def _start_server(self, dep: Deployment) -> None:
        t = time.perf_counter()
        inside_redis = (f"redis://:{quote(dep.setup.redis_password, safe='')}"
                        f"@127.0.0.1:{CONTAINER_REDIS_PORT}/0")  # fmt: skip
        ctx = EdgeContext(gateway=dep.session.gateway(), redis_url=inside_redis,
                          port=self.app.port)
        dep.session.start_app(self.app.command, self.app.env(ctx), files=self.app.files)
        dep.timings["upload_start"] = time.perf_counter() - t

    def _copy(self, dep: Deployment, edge: datasync.Client | None = None) -> None:
        """The users' keys cloud -> the edge server's Redis (over `edge` if connected)."""
        t = time.perf_counter()
        edge = edge or datasync.connect(dep.redis_forward(), timeout=30)
        try:
            # The manifest (on the cloud) lets the edge's merge at termination delete
            # what the edge deleted and tell what the cloud changed meanwhile.
            dep.copy = datasync.copy_users(
                self.cloud, edge, dep.users, manifest=datasync.manifest_key(dep.server_id),
                schema=self.app.key_schema)
        finally:
            edge.close()
        dep.timings["data"] = time.perf_counter() - t

    def _wait_ready(self, dep: Deployment) -> None:
        t = time.perf_counter()
        wait_http(dep.url + self.app.health_path, timeout=self.ready_timeout)
        dep.timings["ready"] = time.perf_counter() - t

    def _send_users(self, dep: Deployment) -> None:
        t = time.perf_counter()
        if dep.intercepted:
            dep.edge.redirect(dep.server_id, True)  # the node routes the users' traffic
        else:
            self.app.redirect(dep.users, dep.url)
        dep.timings["redirect"] = time.perf_counter() - t

    def _abandon(self, dep: Deployment, restore: bool = True) -> None:
        """A failed deployment: nobody was redirected; withdraw the server (and, unless
        the users are served elsewhere, point them at the cloud)."""
        try:
            if restore:
                self.app.restore(dep.users)
        finally:
            self._close_session(dep)
            try:
                dep.edge.terminate(dep.server_id)
            except EdgeError:
                log.exception("could not withdraw %s", dep.server_id)
            dep.state = "withdrawn"
            dep.end_reason = TerminationReason.DEPLOYMENT_FAILED
            dep.ended.set()

    # -- Procedure 4: termination --------------------------------------------------------
    def withdraw(self, dep: Deployment | str) -> Deployment:
        """The cloud's override: users back to the cloud, then the edge merges the data
        back and destroys the server; then the data is confirmed on the cloud."""
        dep = self.deployments[dep] if isinstance(dep, str) else dep
        t0 = time.perf_counter()
        if dep.intercepted:  # the node's rules go first: new connections reach the cloud
            dep.edge.redirect(dep.server_id, False)
        self.app.restore(dep.users)  # before the edge server goes away
        t = time.perf_counter()
        dep.timings["restore"] = t - t0
        self._close_session(dep)
        result = dep.edge.terminate(dep.server_id)
        dep.timings["terminate"] = time.perf_counter() - t
        with self._lock:
            if dep.server_id in result.pending:
                dep.state, dep.end_reason = "migration_pending", TerminationReason.CLOUD_WITHDRAWAL
                return dep
            dep.keys_migrated = result.keys_migrated
            self._finish(dep, "withdrawn", TerminationReason.CLOUD_WITHDRAWAL,
                         result.keys_migrated)
        dep.timings["withdraw_total"] = time.perf_counter() - t0
        return dep

    # -- handover between nodes ------------------------------------------------------------
    def handover(self, dep: Deployment | str, to: str | None = None,
                 users: Sequence[User | tuple[str, str]] | None = None, **over) -> Deployment:
        """Move a deployment's users to a new server on another node (`to`, or where the
        placement puts them, never the node they are on), start-first. `users` gives
        their addresses now (they moved into another node's area); same ids. Returns the
        new deployment; `timings["interruption"]` is the switch, from the first step that
        touches the old server to the users' redirection (`handover_path` direct: they
        waited, their requests retried; cloud: the cloud served them).

        If the old server's data cannot be merged (its node lost the cloud), the users
        stay on the cloud and the new server is withdrawn: HandoverFailed."""
        old = self.deployments[dep] if isinstance(dep, str) else dep
        if old.ended.is_set() or old.state != "deployed":
            raise ValueError(f"server {old.server_id} is {old.state}: nothing to hand over")
        members = [_user(u) for u in (users if users is not None
                                      else old.members or old.users)]
        if sorted(u.id for u in members) != sorted(old.users):
            raise ValueError("users: a handover moves the deployment's own users")
        t0 = time.perf_counter()
        key = secrets.token_urlsafe(32) if self.handover_path != "cloud" else None
        new = self._admitted(members, [old.edge.name], to,
                             {**over, "handover_key": key} if key else over)
        new.handed_over_from = old.server_id
        try:  # start-first: the old server serves until the new one answers
            self._connect(new)
            self._over_ssh(new, self._start_server)
            self._wait_ready(new)
            edge = datasync.connect(new.redis_forward(), timeout=30)  # ready for the copy
            edge.ping()
        except BaseException:
            log.exception("handover of %s: the new server %s on %s did not start",
                          old.server_id, new.server_id, new.edge.name)
            self._abandon(new, restore=False)
            raise
        if key is not None:
            if self._direct(old, new, key):
                edge.close()
                new.timings["total"] = time.perf_counter() - t0
                return new
            # A refused import may have written part of the keys, which the old server
            # has served on since: the copy below starts from none of theirs.
            datasync.delete_users(edge, new.users)
        t_switch = time.perf_counter()
        new.handover_path = "cloud"
        try:
            self._end_for_handover(old, new)
        except BaseException:
            edge.close()
            raise
        try:
            self._copy(new, edge)
        except BaseException:
            self._abandon(new, restore=False)
            raise HandoverFailed(f"copy to {new.server_id} failed", "users on the cloud, "
                                 "their data merged") from None
        self._send_users(new)
        now = time.perf_counter()
        new.timings["interruption"] = now - t_switch
        new.timings["total"] = now - t0
        return new

    def _direct(self, old: Deployment, new: Deployment, key: str) -> bool:
        """The users' data edge -> edge: the old node fences its server and gives the
        keys to the new one, then the users go there; they are never served by the cloud
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
            # No answer: the old node may or may not have given the keys. Both servers
            # end, each merging what it holds (the new one with the inherited manifest).
            log.warning("handover of %s: %s did not answer (%s); ending both servers",
                        old.server_id, old.edge.name, exc)
            try:
                self._end_for_handover(old, new)
            finally:
                self._abandon(new, restore=False)
            # Both merged what they held; a handed-over old server leaves its manifest.
            with contextlib.suppress(redis.RedisError):
                self.cloud.delete(datasync.manifest_key(old.server_id))
            raise HandoverFailed(f"{old.edge.name} did not answer the handover: {exc}",
                                 "users on the cloud, their data merged from both "
                                 "servers") from None
        old.timings["handover"] = time.perf_counter() - t_switch
        # Only now, with the keys on the new server: its merge tells deletes from the
        # manifest, and a manifest without the keys would delete them all on the cloud.
        datasync.move_manifest(self.cloud, datasync.manifest_key(old.server_id),
                               datasync.manifest_key(new.server_id))
        self._send_users(new)
        now = time.perf_counter()
        new.timings["interruption"] = now - t_switch
        new.timings["data"] = result.seconds
        new.handover_path = "direct"
        new.keys_received = result.keys
        with self._lock:  # the old node's `server.terminated` comes later: already ended
            old.state, old.end_reason = "handed_over", TerminationReason.HANDOVER
            old.keys_migrated = result.keys
            old.confirmed = True  # verified on the new server, key by key
            old.ended.set()
        self._close_session(old)
        return True

    def _end_for_handover(self, old: Deployment, new: Deployment) -> None:
        """Users to the cloud, then the old node fences, merges and destroys its server."""
        t = time.perf_counter()
        if old.intercepted:
            old.edge.redirect(old.server_id, False)
        self.app.restore(old.users)
        self._close_session(old)
        try:
            result = old.edge.terminate(old.server_id)
        except EdgeError as exc:
            self._abandon(new, restore=False)
            raise HandoverFailed(f"{old.edge.name} did not end {old.server_id}: {exc}",
                                 "users on the cloud, their data on the old node") from None
        old.timings["terminate"] = time.perf_counter() - t
        pending = old.server_id in result.pending
        with self._lock:
            if pending:
                old.state, old.end_reason = "migration_pending", TerminationReason.HANDOVER
            elif not old.ended.is_set():  # else its event came first
                self._finish(old, "handed_over", TerminationReason.HANDOVER,
                             result.keys_migrated)
        if pending:
            self._abandon(new, restore=False)
            raise HandoverFailed(f"{old.server_id}'s merge is pending on {old.edge.name}",
                                 "users on the cloud, their data kept on the old node")

    def _finish(self, dep: Deployment, state: str, reason: TerminationReason,
                keys_migrated: int) -> None:
        t = time.perf_counter()
        dep.state, dep.end_reason, dep.keys_migrated = state, reason, keys_migrated
        dep.confirmed = self.confirm(dep)
        dep.timings["confirm"] = time.perf_counter() - t
        dep.ended.set()

    def confirm(self, dep: Deployment) -> bool:
        """The users' data is on the cloud: every user's marker key exists there."""
        if not dep.users:
            return True
        if self.app.user_key is None:
            return bool(dep.keys_migrated)
        keys = [self.app.user_key(u) for u in dep.users]
        return datasync.count_existing(self.cloud, keys) == len(keys)

    def _close_session(self, dep: Deployment) -> None:
        if dep.session is not None:
            dep.session.close()
            dep.session = None

    # -- events from the edge ------------------------------------------------------------
    def handle_event(self, event: Event) -> str:
        """An event the edge node posted; returns what was done (for logs and tests)."""
        with self._lock:
            dep = self.deployments.get(event.server_id)
            if dep is None:
                return "unknown server"
            if event.type == "server.terminated":
                if dep.ended.is_set():
                    return "already ended"
                self.app.restore(dep.users)
                self._close_session(dep)
                keys = int(event.data.get("keys_migrated", 0))
                self._finish(dep, "terminated", event.reason, keys)
                if self.rehome and event.reason.rehome and not self._closing.is_set():
                    threading.Thread(target=self._rehome, args=(dep,), daemon=True,
                                     name=f"rehome-{dep.server_id}").start()
                    return "users restored, offloading them to another node"
                return "users restored"
            if event.type == "server.migration_failed":
                if dep.ended.is_set():
                    return "already ended"  # a retry succeeded before this event came
                # The edge keeps the data (container stopped) and retries the merge; the
                # users go home now, and the edge's values replace the cloud's later.
                self.app.restore(dep.users)
                self._close_session(dep)
                dep.state = "migration_pending"
                dep.end_reason = event.reason
                return "users restored, merge pending"
            return "noted"

    def _rehome(self, dep: Deployment) -> None:
        """The node ended `dep` for resources: its users (home, data merged) go to another
        node if one admits them, else they stay on the cloud."""
        try:
            self.rehomed[dep.server_id] = self.offload(dep.members or dep.users,
                                                       exclude=[dep.edge.name])
        except Exception as exc:  # noqa: BLE001 (the users are served by the cloud)
            log.info("users of %s stay on the cloud: %s", dep.server_id, exc)
            self.rehomed[dep.server_id] = exc

    # -- the cloud's own reconciliation ----------------------------------------------------
    def reconcile(self) -> dict[str, str]:
        """Check every live deployment against its edge node. A server the node no longer
        has, with no event received (lost, or the callback was down for longer than the
        node kept trying), is ended here: users home, their data confirmed on the cloud.
        An unreachable node is left alone (its servers may well be serving). Returns
        what was done per server id."""
        done: dict[str, str] = {}
        with self._lock:
            live = [d for d in self.deployments.values()
                    if not d.ended.is_set() and d.state == "deployed"]
        for dep in live:
            try:
                info = dep.edge.server(dep.server_id)
            except EdgeError as exc:
                done[dep.server_id] = f"node unreachable: {exc}"
                continue
            if info is not None:
                continue
            with self._lock:
                if dep.ended.is_set():
                    continue
                log.warning("server %s is gone from %s without an event: users home",
                            dep.server_id, dep.edge.name)
                self.app.restore(dep.users)
                self._close_session(dep)
                self._finish(dep, "terminated", TerminationReason.GONE_WITHOUT_EVENT, 0)
            done[dep.server_id] = ("users restored, data confirmed" if dep.confirmed
                                   else "users restored, data NOT on the cloud")
        return done

    def user_reports_dead(self, user: str) -> str:
        """A user's client found its edge server dead: check that deployment now rather
        than at the next interval. Returns what was done."""
        with self._lock:
            dep = next((d for d in self.deployments.values()
                        if user in d.users and not d.ended.is_set()), None)
        if dep is None:
            return "not offloaded"
        return self.reconcile().get(dep.server_id, "server alive")

    def start_reconciling(self, interval_s: float) -> None:
        """Run `reconcile` every `interval_s` in a daemon thread until `close`."""
        def loop() -> None:
            while not self._closing.wait(interval_s):
                try:
                    self.reconcile()
                except Exception:  # keep checking; one bad round is logged
                    log.exception("cloud manager reconcile")

        threading.Thread(target=loop, name="cloud-reconcile", daemon=True).start()

    def start_heartbeats(self, interval_s: float = 5.0, timeout_s: float = 2.0) -> Heartbeats:
        """Ask every node for its offer every `interval_s` into the registry (one of the
        cloud-manager processes sharing it polls per interval), until `close`."""
        if self.registry is None:
            raise ValueError("start_heartbeats needs a registry")
        self._heartbeats = Heartbeats(self.registry, self.edges, interval_s, timeout_s)
        self._heartbeats.start()
        return self._heartbeats

    def blueprint(self, path: str = "/edge-events") -> Blueprint:
        """`POST <path>`: the callback URL edge nodes send events to (2xx = acknowledged)."""
        bp = Blueprint("enorm_cloud_manager", __name__)

        @bp.post(path)
        def _edge_event():
            try:
                event = Event.model_validate_json(request.get_data(cache=False))
            except ValidationError as exc:
                err = exc.errors()[0]
                field = ".".join(str(p) for p in err["loc"] if str(p).isidentifier())
                return jsonify({"error": "bad_request", "field": field or "body",
                                "detail": f"not an enorm event: {err['msg']}"}), 400
            try:
                done = self.handle_event(event)
            except Exception as exc:  # the edge retries until acknowledged
                log.exception("event %s", event.id)
                return jsonify({"error": str(exc)}), 500
            return jsonify({"ok": True, "done": done})

        @bp.post(f"{path}/dead")
        def _user_reports_dead():
            """A game client could not reach its edge server: check it now."""
            body = request.get_json(silent=True)
            user = body.get("user") if isinstance(body, dict) else None
            if not isinstance(user, str) or not user:
                return jsonify({"error": "bad_request", "field": "user",
                                "detail": "must be a user id"}), 400
            return jsonify({"ok": True, "done": self.user_reports_dead(user)})

        return bp

    def close(self) -> None:
        self._closing.set()
        if self._heartbeats is not None:
            self._heartbeats.stop()
        with self._lock:
            for dep in self.deployments.values():
                self._close_session(dep)
        for e in self.edges:
            e.close()


def sink_for(app: App, sink: DataSink) -> DataSink:
    """The sink with the app's data declaration; the App is the one place that declares
    it, so a sink that says otherwise is an error, not a silent drop."""
    update = {}
    for name in ("shared_patterns", "cloud_wins_patterns"):
        declared, given = getattr(app, name), getattr(sink, name)
        if given and declared and sorted(given) != sorted(declared):
            raise ValueError(f"{name}: the app {app.name} declares {declared}, the DataSink "
                             f"says {given}; declare them once, on the App")
        for p in declared or given:
            if "{" in p or "}" in p:
                raise ValueError(f"{name}: {p!r} names a user's hash tag; users' keys are "
                                 "found by their tag, not declared shared")
        update[name] = list(declared or given)
    return sink.model_copy(update=update)


def _user(u: User | tuple[str, str] | str) -> User:
    if isinstance(u, User):
        return u
    if isinstance(u, str):
        return User(id=u, address="127.0.0.1")
    return User(id=u[0], address=u[1])
