"""The cloud manager: offload users to an edge node and bring them home (Procedures 1-4
from the cloud's side), with failover over the configured edge nodes.

Offloading (`CloudManager.offload`), in the order of its steps:
  handshake with the first edge node that admits (409 -> the next one), in the
  placement's order (`placement.Placer`: `first` as configured, `scored` from the nodes'
  offers and their probes of the users; nodes the registry holds down are passed over)
  -> SSH into the container -> upload + start the partitioned server while the users'
  keys are copied cloud -> container Redis (through an SSH port forward; verified) ->
  wait until the server answers on its user-facing port -> only then redirect the users.
Withdrawal (`CloudManager.withdraw`, the cloud's override):
  redirect the users back first, then DELETE on the edge node, which merges the edge data
  into the cloud Redis (user keys replace, shared keys union) before it destroys the
  container; then confirm on the cloud that the users' data is there.

The other jobs, each in its own module, compose these steps: a handover between nodes
(`handover.py`), the node's events and the servers gone without one (`events.py`), the
users sent to another node when theirs ended for want of resources (`rehome.py`).
A user is a `protocol.User` (id and address) from the CLI to the setup request; the
app's redirection and datasync take the ids.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import quote

import paramiko
from flask import Blueprint

from enorm import datasync
from enorm.protocol import (
    DataSink,
    Event,
    MergeReport,
    SetupRequest,
    SetupResponse,
    TerminationReason,
    User,
)

from . import events, handover
from .app import App, EdgeContext, sink_for
from .deployer import Deployer, DeployError, Session, wait_http
from .edge_client import EdgeClient, EdgeError, Rejected
from .ledger import (
    LEASE_S,
    UNREACHABLE,
    CloudUnreachable,
    Entry,
    Intent,
    Intents,
    Lapsed,
    Ledger,
)
from .orphans import Orphans
from .placement import Placer, Policy, Weights
from .policy import Settings as PolicySettings
from .policy_loop import PolicyLoop, Population
from .registry import Heartbeats, Registry

log = logging.getLogger(__name__)

CONTAINER_REDIS_PORT = 6379


class NoEdgeAvailable(Exception):
    """No edge node admitted the server: each refused it (409, with the reason) or could
    not be reached (`refusals`: node -> why). A node that refused the request itself (a
    wrong token, a destination its operator does not allow) is named with that cause;
    when every node did so, that error is raised instead (`Unauthorized`,
    `DestinationNotAllowed`, ...): no other node would have done better."""

    def __init__(self, refusals: dict[str, str]):
        super().__init__("no edge node admitted the server: "
                         + "; ".join(f"{n}: {r}" for n, r in refusals.items()))
        self.refusals = refusals


@dataclass
class Deployment:
    """One edge server serving some of the cloud's users."""

    edge: EdgeClient
    setup: SetupResponse
    users: list[User]
    url: str  # the user-facing base URL of the edge server
    session: Session | None = None
    state: str = "deployed"  # deployed | withdrawn | terminated | migration_pending |
    # handing_over (its node is ending it for a handover through the cloud) | handed_over
    # | left_to_lease (its record's outcome unknown: another process completes or ends it)
    timings: dict[str, float] = field(default_factory=dict)
    copy: datasync.SyncReport | None = None
    refused: dict[str, str] = field(default_factory=dict)  # edges that said no first
    # How the node was chosen: the order asked and, when scored, each node's figures.
    placement: dict = field(default_factory=dict)
    # The node redirects the users' traffic itself (transparent redirection).
    intercepted: bool = False
    end_reason: TerminationReason | None = None
    keys_migrated: int | None = None
    # What the termination's merge did (keys migrated, deleted, conflicts and not merged,
    # with samples): from the node's answer to a withdrawal or its `server.terminated`.
    merge: MergeReport | None = None
    confirmed: bool | None = None  # the users' data was found on the cloud at the end
    handed_over_from: str | None = None  # the server these users came from
    handover_path: str | None = None  # direct (edge -> edge) | cloud (edge -> cloud -> edge)
    keys_received: int | None = None  # the users' keys the old node gave (direct)
    ended: threading.Event = field(default_factory=threading.Event)

    @property
    def server_id(self) -> str:
        return self.setup.server_id

    @property
    def user_ids(self) -> list[str]:
        return [u.id for u in self.users]

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


@dataclass
class PreparedOffload:
    """An offload's first half (`CloudManager.prepare_offload`)."""

    cm: CloudManager
    dep: Deployment
    seconds: float  # what preparing took

    def complete(self, before_redirect: Callable[[Deployment], None] | None = None
                 ) -> Deployment:
        """The users sent to the server; `before_redirect(dep)` first (where the ledger
        records it: if it fails, the server ends and nobody was sent there, unless the
        cloud Redis did not answer: `CloudManager.record`)."""
        t = time.perf_counter()
        if before_redirect is not None:
            self.cm.record(self.dep, before_redirect, restore=False)
        self.cm.send_users(self.dep)
        self.dep.timings["total"] = self.seconds + time.perf_counter() - t
        return self.dep

    def cancel(self) -> None:
        """Not needed after all: the server ended (nobody was sent there)."""
        self.cm.abandon(self.dep, restore=False)


class CloudManager:
    """The library a cloud application server embeds to use edge nodes."""

    def __init__(self, edges: Iterable[EdgeClient], app: App, *,
                 cloud_redis: datasync.Client | str,
                 sink: DataSink, callback_url: str | None = None,
                 deployer: Deployer | None = None, priority: int = 5,
                 latency_objective_ms: float = 50.0, override: bool = False,
                 ready_timeout: float = 30.0, registry: Registry | None = None,
                 placement: Policy = "first", weights: Weights | None = None,
                 probe_sample: int = 64, rehome: bool = False,
                 handover_path: str = "direct"):  # fmt: skip
        if handover_path not in handover.PATHS:
            raise ValueError(f"handover_path must be one of {handover.PATHS}, not "
                             f"{handover_path!r}")
        self.handover_path = handover_path
        self.edges = list(edges)
        self.registry = registry
        self.placer = Placer(registry, placement, weights or Weights(), probe_sample)
        self.rehome = rehome
        self.rehomed: dict[str, Deployment | Exception] = {}  # ended server -> what followed
        self._heartbeats: Heartbeats | None = None
        self._orphans: Orphans | None = None
        self.intents: Intents | None = None  # `start_intents`
        self.policy: PolicyLoop | None = None  # `start_policy`
        self.app = app
        self.sink = sink_for(app, sink)
        # The library's own connection to the cloud Redis: a URL, or a twin of the app's
        # client when that one decodes replies (DUMP payloads are bytes).
        self.cloud = (datasync.connect(cloud_redis, cluster=self.sink.cluster)
                      if isinstance(cloud_redis, str) else datasync.binary(cloud_redis))
        self._own_cloud = self.cloud is not cloud_redis
        self.callback_url = callback_url
        self.deployer = deployer or Deployer()
        self.priority, self.latency_objective_ms = priority, latency_objective_ms
        self.override = override
        self.ready_timeout = ready_timeout
        self.deployments: dict[str, Deployment] = {}
        self.lock = threading.RLock()
        self.closing = threading.Event()

    @property
    def placement(self) -> Policy:
        """The placement policy (`first` or `scored`); may be changed between offloads."""
        return self.placer.policy

    @placement.setter
    def placement(self, policy: Policy) -> None:
        p = self.placer
        p.close()
        self.placer = Placer(p.registry, policy, p.weights, p.probe_sample, p.probe_nodes,
                             p.head_s)

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

    def place(self, req: SetupRequest, exclude: Iterable[str] = (), only: str | None = None,
              near: Iterable[str] = ()) -> tuple[list[EdgeClient], dict[str, str], dict]:
        """The nodes to ask, in order (`Placer.place`; `near`: nodes the caller knows to
        be near the users, probed even when a large fleet's shortlist leaves them out)."""
        return self.placer.place(self.edges, req, exclude, only, near)

    def handshake(self, req: SetupRequest) -> tuple[EdgeClient, SetupResponse, dict[str, str]]:
        """The first node that admits, in the placement's order; 409s, dead nodes and
        nodes the registry holds down are skipped."""
        edge, setup, refused, _ = self._first_to_admit(req)
        return edge, setup, refused

    def _first_to_admit(self, req: SetupRequest, exclude: Iterable[str] = (),
                        only: str | None = None, near: Iterable[str] = ()
                        ) -> tuple[EdgeClient, SetupResponse, dict[str, str], dict]:
        edges, refused, placed = self.place(req, exclude, only, near)
        wrong: list[EdgeError] = []  # nodes that refused the request itself
        for edge in edges:
            try:
                return edge, edge.setup(req), refused, placed
            except Rejected as exc:
                refused[edge.name] = exc.reason
            except EdgeError as exc:
                if exc.status is None:
                    refused[edge.name] = f"unreachable: {exc}"
                else:  # it answered: a wrong token, a destination not allowed, ...
                    refused[edge.name] = str(exc)
                    wrong.append(exc)
            log.info("edge %s refused: %s", edge.name, refused[edge.name])
        if wrong and len(wrong) == len(edges):
            raise wrong[0]
        raise NoEdgeAvailable(refused)

    def offload(self, users: Sequence[User], exclude: Iterable[str] = (),
                near: Iterable[str] = (),
                before_redirect: Callable[[Deployment], None] | None = None,
                **over) -> Deployment:
        """Move `users` to an edge server (on none of the nodes in `exclude`; the nodes
        `near` are probed in a large fleet, see `place`); returns once they are
        redirected there. `before_redirect(dep)` runs once the server is ready, before
        a user is sent there (where the ledger records it: a failure withdraws it)."""
        return self._prepare_offload(users, exclude, over, restore=True, near=near,
                                     before_redirect=before_redirect).complete()

    def prepare_offload(self, users: Sequence[User], exclude: Iterable[str] = (),
                        **over) -> PreparedOffload:
        """An offload's first half: the server started with the users' data (as the cloud
        has it now) and answering, the users not sent there yet: `.complete()` sends
        them, `.cancel()` ends the server (and a failure here leaves them where they
        are). The policy loop prepares so the move of a group whose node is down."""
        return self._prepare_offload(users, exclude, over, restore=False)

    def _prepare_offload(self, users: Sequence[User], exclude: Iterable[str], over: dict,
                         restore: bool, near: Iterable[str] = (),
                         before_redirect: Callable[[Deployment], None] | None = None
                         ) -> PreparedOffload:
        t0 = time.perf_counter()
        dep = self.admit(list(users), exclude, None, over, near)
        try:
            self.connect(dep)
            self.over_ssh(dep, self.start_server, self.copy)
            self.wait_ready(dep)
        except BaseException:
            log.exception("deployment of %s on %s failed; withdrawing", dep.server_id,
                          dep.edge.name)
            self.abandon(dep, restore=restore)
            raise
        if before_redirect is not None:
            self.record(dep, before_redirect, restore)
        return PreparedOffload(self, dep, time.perf_counter() - t0)

    # -- the steps of a deployment (offload, handover and re-homing compose them) --------
    def admit(self, users: list[User], exclude: Iterable[str], only: str | None,
              over: dict, near: Iterable[str] = (),
              handed_over_from: str | None = None) -> Deployment:
        """Handshake (placement, then the first node that admits): a new deployment,
        in flight (`start_intents`: its intent recorded, leased until its users are sent
        there or it is abandoned)."""
        t0 = time.perf_counter()
        req = self.request_for(users, **over)
        try:
            edge, setup, refused, placed = self._first_to_admit(req, exclude, only, near)
        except UNREACHABLE as exc:  # the registry's reading (placement)
            raise CloudUnreachable("placing the server", exc) from exc
        dep = Deployment(edge=edge, setup=setup, users=users, refused=refused,
                         placement=placed, intercepted=bool(req.intercept),
                         url=f"http://{setup.access.host}:{setup.ports[self.app.port]}",
                         handed_over_from=handed_over_from)
        dep.timings["handshake"] = time.perf_counter() - t0
        with self.lock:
            self.deployments[setup.server_id] = dep
        if self.intents is not None:
            try:
                self.intents.begin(Intent(
                    Entry(server_id=dep.server_id, node=edge.name, app=req.app, url=dep.url,
                          users=users), handed_over_from, dep.intercepted))
            except BaseException as exc:  # (an intent that landed lapses: then ended)
                self.abandon(dep, restore=False)
                if isinstance(exc, UNREACHABLE):
                    raise CloudUnreachable("recording the offload in flight", exc) from exc
                raise
        return dep

    def record(self, dep: Deployment, hook: Callable[[Deployment], None],
               restore: bool = True) -> None:
        """`hook(dep)`, where the ledger records the server, before any user is sent
        there; if it fails, the server ends and nobody was sent there (`abandon`), unless
        the cloud Redis did not answer while the offload is leased: the record may have
        landed, so ending the server here could leave a record of a server gone; it is
        left to its lease instead (`CloudUnreachable`), and the process that takes it over
        once it lapsed completes it if it was recorded, or ends it (orphans.py)."""
        try:
            hook(dep)
        except UNREACHABLE as exc:
            if self.intents is None or not self.intents.holds(dep.server_id):
                self.abandon(dep, restore=restore)  # (no lease: the orphans' grace)
                raise CloudUnreachable(f"recording {dep.server_id}", exc) from exc
            self.intents.drop(dep.server_id)
            self.close_session(dep)
            with self.lock:
                self.deployments.pop(dep.server_id, None)
                dep.state = "left_to_lease"
            log.warning("the record of %s on %s did not answer (%s): left to its lease",
                        dep.server_id, dep.edge.name, exc)
            raise CloudUnreachable(f"recording {dep.server_id}", exc) from exc
        except BaseException:
            self.abandon(dep, restore=restore)
            raise

    def connect(self, dep: Deployment) -> None:
        t = time.perf_counter()
        dep.session = self.deployer.connect(dep.setup.access)
        dep.timings["ssh"] = time.perf_counter() - t

    def over_ssh(self, dep: Deployment, *steps: Callable[[Deployment], None]) -> None:
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
                self.close_session(dep)
                self.connect(dep)

    def start_server(self, dep: Deployment) -> None:
        t = time.perf_counter()
        inside_redis = (f"redis://:{quote(dep.setup.redis_password, safe='')}"
                        f"@127.0.0.1:{CONTAINER_REDIS_PORT}/0")  # fmt: skip
        ctx = EdgeContext(gateway=dep.session.gateway(), redis_url=inside_redis,
                          port=self.app.port)
        dep.session.start_app(self.app.command, self.app.env(ctx), files=self.app.files)
        dep.timings["upload_start"] = time.perf_counter() - t

    def copy(self, dep: Deployment, edge: datasync.Client | None = None) -> None:
        """The users' keys, and the shared keys the app names for them, cloud -> the edge
        server's Redis (over `edge` if connected)."""
        t = time.perf_counter()
        shared = self.app.shared_keys_for(dep.user_ids)  # checked before anything moves
        edge = edge or datasync.connect(dep.redis_forward(), timeout=30)
        try:
            # The manifest (on the cloud) lets the edge's merge at termination delete
            # what the edge deleted and tell what the cloud changed meanwhile.
            dep.copy = datasync.copy_users(
                self.cloud, edge, dep.user_ids, manifest=datasync.manifest_key(dep.server_id),
                schema=self.app.key_schema, shared=shared)
        finally:
            edge.close()
        dep.timings["data"] = time.perf_counter() - t

    def wait_ready(self, dep: Deployment) -> None:
        """Until the server answers its health path on its user-facing port; a server
        whose process exits meanwhile fails at once, and either failure carries the tail
        of its log (`DeployError.app_log`), read before the container goes."""
        t = time.perf_counter()
        session = dep.session
        try:
            wait_http(dep.url + self.app.health_path, timeout=self.ready_timeout,
                      exited=None if session is None else session.app_exited)
        except DeployError as exc:
            if session is not None and exc.app_log is None:
                exc.add_log(session.app_log())
            raise
        dep.timings["ready"] = time.perf_counter() - t

    def send_users(self, dep: Deployment) -> None:
        """The users redirected to the server (raises `ledger.Lapsed`, nobody sent, if
        its offload was taken over by another process meanwhile; if the redirect fails,
        its offload is left to lapse: another process's reconcile tries again)."""
        t = time.perf_counter()
        try:
            if self.intents is not None:
                self.intents.keep(dep.server_id)
            if dep.intercepted:
                dep.edge.redirect(dep.server_id, True)  # the node routes the users' traffic
            else:
                self.app.redirect(dep.user_ids, dep.url)
        except Lapsed:
            raise
        except BaseException:
            if self.intents is not None:  # another process's reconcile tries it again
                self.intents.drop(dep.server_id)
            raise
        dep.timings["redirect"] = time.perf_counter() - t
        if self.intents is not None:  # no longer in flight
            self.intents.end(dep.server_id)

    def users_home(self, dep: Deployment) -> None:
        """The users back to the cloud (the node's rules first, where it redirects them),
        and the SSH session closed."""
        if dep.intercepted:  # new connections reach the cloud
            dep.edge.redirect(dep.server_id, False)
        self.app.restore(dep.user_ids)
        self.close_session(dep)

    def abandon(self, dep: Deployment, restore: bool = True) -> None:
        """A failed deployment: nobody was redirected; withdraw the server (and, unless
        the users are served elsewhere, point them at the cloud)."""
        try:
            if restore:
                self.app.restore(dep.user_ids)
        finally:
            self.close_session(dep)
            try:
                dep.edge.terminate(dep.server_id)
            except EdgeError:
                log.exception("could not withdraw %s", dep.server_id)
            if self.intents is not None:  # (not withdrawn: an orphan to the reconcile)
                self.intents.end(dep.server_id)
            # Under the lock: the node's `server.terminated` for it, handled meanwhile,
            # must not leave it `terminated` (its own end) after this sets `withdrawn`.
            with self.lock:
                dep.state = "withdrawn"
                dep.end_reason = TerminationReason.DEPLOYMENT_FAILED
                dep.ended.set()

    def finish(self, dep: Deployment, state: str, reason: TerminationReason,
               keys_migrated: int) -> None:  # fmt: skip
        """The deployment has ended: its data confirmed on the cloud."""
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
        keys = [self.app.user_key(u) for u in dep.user_ids]
        return datasync.count_existing(self.cloud, keys) == len(keys)

    def close_session(self, dep: Deployment) -> None:
        if dep.session is not None:
            dep.session.close()
            dep.session = None

    # -- Procedure 4: termination --------------------------------------------------------
    def withdraw(self, dep: Deployment | str) -> Deployment:
        """The cloud's override: users back to the cloud, then the edge merges the data
        back and destroys the server; then the data is confirmed on the cloud. Returns the
        deployment with what the termination did in `merge` (keys migrated and deleted,
        conflicts, keys not owned or not merged, each with a sample) and `confirmed`; a
        node whose merge failed leaves it `migration_pending` (the node retries). A node
        that does not answer raises `EdgeError` with the users already home: then
        `merge_home(dep, cloud_wins=True)` later ends the server (the policy loop does)."""
        dep = self.deployments[dep] if isinstance(dep, str) else dep
        t0 = time.perf_counter()
        self.users_home(dep)  # before the edge server goes away
        dep.timings["restore"] = time.perf_counter() - t0
        self.merge_home(dep)
        dep.timings["withdraw_total"] = time.perf_counter() - t0
        return dep

    def merge_home(self, dep: Deployment, cloud_wins: bool = False) -> Deployment:
        """A withdrawal's second half, its users home: the node merges the server's data
        back and destroys it. `cloud_wins`: a key the cloud changed since the copy keeps
        the cloud's value (the users wrote it there after they came home, while the node
        was out of reach: it is the newer one); counted as a conflict either way."""
        t = time.perf_counter()
        result = dep.edge.terminate(dep.server_id, conflicts="cloud" if cloud_wins else None)
        dep.timings["terminate"] = time.perf_counter() - t
        with self.lock:
            if dep.server_id in result.pending:
                dep.state, dep.end_reason = "migration_pending", TerminationReason.CLOUD_WITHDRAWAL
                return dep
            dep.merge = MergeReport.model_validate(result.model_dump(
                include=set(MergeReport.model_fields)))
            self.finish(dep, "withdrawn", TerminationReason.CLOUD_WITHDRAWAL,
                        result.keys_migrated)
        return dep

    # -- the other jobs, in their own modules --------------------------------------------
    def handover(self, dep: Deployment | str, to: str | None = None,
                 users: Sequence[User] | None = None,
                 before_redirect: Callable[[Deployment], None] | None = None,
                 **over) -> Deployment:
        """A deployment's users to a new server on another node, start-first
        (`handover.hand_over`); `before_redirect(new)` runs once the new server holds
        their data, before they are sent there (as `offload`'s)."""
        old = self.deployments[dep] if isinstance(dep, str) else dep
        return handover.hand_over(self, old, to, users, over, before_redirect)

    def prepare_handover(self, dep: Deployment | str, to: str | None = None,
                         users: Sequence[User] | None = None, **over) -> handover.Prepared:
        """A handover's first half: the new server started while the old one serves on;
        `.complete()` is then the switch alone, `.cancel()` ends the new server."""
        old = self.deployments[dep] if isinstance(dep, str) else dep
        return handover.prepare(self, old, to, users, over)

    def handle_event(self, event: Event) -> str:
        """An event the edge node posted; returns what was done (`events.handle`)."""
        return events.handle(self, event)

    def reconcile(self) -> dict[str, str]:
        """Every live deployment checked against its node (`events.reconcile`)."""
        return events.reconcile(self)

    def user_reports_dead(self, user: str) -> str:
        """A user's client found its edge server dead (`events.user_reports_dead`)."""
        return events.user_reports_dead(self, user)

    def blueprint(self, path: str = "/edge-events",
                  name: str = "enorm_cloud_manager") -> Blueprint:
        """The callback edge nodes send events to (`events.blueprint`); a second manager
        in the same Flask app takes another `path` and `name`."""
        return events.blueprint(self, path, name)

    def start_reconciling(self, interval_s: float) -> None:
        """Run `reconcile` every `interval_s` in a daemon thread until `close`."""
        def loop() -> None:
            while not self.closing.wait(interval_s):
                try:
                    self.reconcile()
                except Exception:  # keep checking; one bad round is logged
                    log.exception("cloud manager reconcile")

        threading.Thread(target=loop, name="cloud-reconcile", daemon=True).start()

    def start_heartbeats(self, interval_s: float = 5.0, timeout_s: float = 2.0,
                         max_rate: float = 200.0) -> Heartbeats:
        """Ask every node for its offer every `interval_s` (stretched so that the fleet's
        heartbeats stay under `max_rate` requests/s) into the registry, the polling shared
        with the other cloud-manager processes (registry.py), until `close`."""
        if self.registry is None:
            raise ValueError("start_heartbeats needs a registry")
        self._heartbeats = Heartbeats(self.registry, self.edges, interval_s, timeout_s,
                                      max_rate)
        self._heartbeats.start()
        return self._heartbeats

    def start_intents(self, ledger: Ledger, lease_s: float = LEASE_S) -> Intents:
        """Record each offload in flight in the ledger, from its node's admission to its
        users' redirection, under a lease this process renews until `close`, so that if
        it dies another process's orphans' reconcile completes or ends it (ledger.py)."""
        if self.intents is None:
            self.intents = Intents(ledger, lease_s).start()
        return self.intents

    def start_orphans(self, ledger: Ledger, interval_s: float = 60.0, grace_s: float = 300.0,
                      max_rate: float = 50.0) -> Orphans:
        """End the servers of this app that the ledger does not know (a process killed
        between a handshake and its record), finish records cut half-way, and complete
        or end the offloads whose owner died (their intents' leases lapsed), the work
        shared with the other processes (orphans.py), until `close`."""
        self._orphans = Orphans(self, ledger, interval_s, grace_s, max_rate,
                                lease_s=LEASE_S if self.intents is None else self.intents.lease_s)
        self._orphans.start()
        return self._orphans

    def start_policy(self, population: Population, settings: PolicySettings | None = None,
                     opted_out: Callable[[], Iterable[str]] | None = None) -> PolicyLoop:
        """Let the cloud manager decide by itself where the app's groups are served
        (`policy_loop.py`), every `settings.interval_s` until `close`. Re-homing after a
        pre-emption is the policy's then; heartbeats start if there is a registry."""
        if self.policy is not None:
            raise ValueError("the policy runs already")
        loop = PolicyLoop(self, settings or PolicySettings(), population, opted_out)
        self.rehome = False
        if self.registry is not None and self._heartbeats is None:
            self.start_heartbeats()
        self.policy = loop
        loop.start()
        return loop

    def stop_policy(self) -> None:
        """The policy's rounds ended, its moves under way finished, its standbys ended;
        the deployments it made stay as they are (`start_policy` may start it again)."""
        if self.policy is not None:
            self.policy.stop()
            self.policy = None

    def close(self) -> None:
        self.closing.set()
        if self.policy is not None:
            self.policy.stop()
        if self._heartbeats is not None:
            self._heartbeats.stop()
        if self._orphans is not None:
            self._orphans.stop()
        if self.intents is not None:
            self.intents.stop()
        self.placer.close()
        with self.lock:
            for dep in self.deployments.values():
                self.close_session(dep)
        for e in self.edges:
            e.close()
        if self._own_cloud:
            self.cloud.close()
