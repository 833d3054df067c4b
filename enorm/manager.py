"""The Edge Manager: node manager (admission) and server manager (launch, terminate).

Policy comes from `resources.admit` and the auto-scaler's plan; mechanism from
`containers`, `firewall` and `network`; state from `store`. The manager only sequences
them, so that each step is recorded before it is taken and a restart can finish or undo
whatever a killed daemon left half done (`reconcile`).
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import requests

from enorm import handover, migration, network, resources, sizing
from enorm.config import ConfigError, NodeConfig
from enorm.containers import Containers
from enorm.events import Events
from enorm.firewall import Firewall, Forward, Port, Redirect
from enorm.protocol import (
    Access,
    HandoverData,
    HandoverRequest,
    HandoverResult,
    ImportResult,
    MergeReport,
    NodeOffer,
    Resources,
    ScaleReason,
    ServerInfo,
    SetupRequest,
    SetupResponse,
    TerminateResult,
    TerminationReason,
)
from enorm.store import ServerRecord, Store

log = logging.getLogger(__name__)

SSH_PORT = 22
# A hook run before a container is destroyed: merges its data back, returns keys moved.
# Merges a server's data back to its sink: (record, served users' ids) -> report.
Migrate = Callable[[ServerRecord, list[str]], MergeReport]


def _fault(point: str) -> None:
    """Crash here when ENORM_FAULT names this point: the crash-safety tests kill the
    daemon at each step of a termination. Unset, it costs one dict lookup."""
    if os.environ.get("ENORM_FAULT") == point:
        log.error("ENORM_FAULT=%s: exiting as a crash would", point)
        os._exit(70)


class AdmissionRefused(Exception):
    """Admission said no (409); `reason` is machine-readable."""

    def __init__(self, reason: str, detail: str, free: Resources | None = None) -> None:
        super().__init__(detail)
        self.reason, self.detail, self.free = reason, detail, free


class LaunchFailed(Exception):
    """The server was admitted but its container did not come up (503, typed); the node
    has undone the launch, so the cloud may retry here or go elsewhere."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class CannotRedirect(Exception):
    """Transparent redirection asked of a server that has none, or is not running."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


class NotFound(KeyError):
    pass


class Forbidden(PermissionError):
    pass


class MigrationPending(RuntimeError):
    """The data could not be merged back; the container is stopped and kept."""


@dataclass
class Node:
    """The parts one Edge Manager drives (built by `build`, replaced in tests)."""

    config: NodeConfig
    store: Store
    containers: Containers
    firewall: Firewall
    allocator: resources.Allocator
    events: Events


def build(config: NodeConfig, store: Store) -> Node:
    assert config.cores is not None and config.memory_mb is not None
    return Node(
        config=config,
        store=store,
        containers=Containers(config.lxc_path, config.container_prefix, config.base_container,
                              pids_max=config.pids_max, ids=config.id_range,
                              disk_mb=config.disk_mb),
        firewall=Firewall(config.name, config.subnet, config.bridge, config.container_egress),
        allocator=resources.Allocator(
            capacity=Resources(cores=config.cores, memory_mb=config.memory_mb),
            reserve=Resources(cores=config.reserve_cores, memory_mb=config.reserve_memory_mb),
        ),
        events=Events(store, timeout=config.callback_timeout_s,
                      give_up_s=config.callback_give_up_s),
    )


def check_unit(cfg: NodeConfig, needs: sizing.Needs | None = None) -> None:
    """Refuse a unit the base image cannot start in (ConfigError naming the field). With
    `needs` None, only against a figure already measured: the daemon asks before it
    touches anything (its store, the bridge)."""
    needs = needs or sizing.load(cfg.lxc_path, cfg.base_container)
    problem = needs and sizing.unit_problem(cfg.unit.memory_mb, needs, cfg.base_container)
    if problem:
        raise ConfigError(problem)


def _port(rec: ServerRecord) -> Port:
    return Port(network.host_veth(rec.id), network.mac_address(rec.id), rec.address)


def _redirects(rec: ServerRecord, users: list) -> list[Redirect]:
    """The transparent redirects of a server: each served user x each intercepted
    destination (IPv4 users only: the rules are iptables')."""
    return [Redirect(str(u.address), str(x.address), x.port, rec.address, x.to_port)
            for x in rec.intercept for u in users if u.address.version == 4]


def _forwards(rec: ServerRecord) -> list[Forward]:
    fw = [Forward(rec.access_port, rec.address, SSH_PORT)]
    fw += [Forward(hp, rec.address, cp) for cp, hp in sorted(rec.ports.items())]
    return fw


class EdgeManager:
    def __init__(self, node: Node, migrate: Migrate | None = None) -> None:
        self.node = node
        self.cfg = node.config
        self.store = node.store
        self.containers = node.containers
        self.firewall = node.firewall
        self.allocator = node.allocator
        self.events = node.events
        self.migrate = migrate
        self.unit = Resources(**self.cfg.unit.model_dump())  # the plain wire type
        # Guards admission and every change of allocations, ports and addresses.
        self._lock = threading.RLock()
        # Per server: held while its users are handed over (old node) or its data comes
        # in (new node); a termination waits for it, so that it merges what is there.
        self._busy: dict[str, threading.Lock] = {}
        self._peer = requests.Session()  # node to node (handover); no proxy from the env
        self._peer.trust_env = False

    # -- start-up ------------------------------------------------------------------------
    def start(self) -> dict:
        """Bring up the bridge and chains, reconcile the store with reality, and refuse a
        unit the image cannot start in."""
        known = sizing.load(self.cfg.lxc_path, self.cfg.base_container)
        if known is not None:
            check_unit(self.cfg, known)
        network.ensure_bridge(self.cfg.bridge, self.cfg.subnet)
        self.firewall.setup()
        report = self.reconcile()
        needs = known or self.image_needs()
        check_unit(self.cfg, needs)
        report["image_needs"] = needs.as_dict()
        return report

    def image_needs(self) -> sizing.Needs:
        """Measure what the base image needs to start (`start` does, once per image: a
        probe container, destroyed after; a crash leaves an orphan that `reconcile`
        removes) and keep the figure beside the image."""
        sid = secrets.token_hex(4)
        name = f"{self.cfg.container_prefix}{sid}"
        with self._lock:
            address = network.pick_address(
                self.cfg.subnet, {s.address for s in self.store.servers()})
        if address is None:
            raise ConfigError(f"subnet {self.cfg.subnet}: no address left to measure the image")
        port = Port(network.host_veth(sid), network.mac_address(sid), str(address))
        room = Resources(cores=max(1.0, self.unit.cores),
                         memory_mb=max(1024, self.unit.memory_mb))
        try:
            self.firewall.guard(sid, port)
            network.pin_neighbour(port.address, port.mac, self.cfg.bridge)
            self.containers.create(
                name, address=port.address, prefixlen=self.cfg.subnet.prefixlen,
                gateway=str(self.cfg.gateway), bridge=self.cfg.bridge, limits=room,
                authorized_key="", redis_password=secrets.token_hex(16),
                veth=port.veth, mac=port.mac)
            t0 = time.monotonic()
            self.containers.start(name)
            self.containers.wait_ssh(port.address, timeout=max(60.0, self.cfg.launch_timeout_s))
            started = time.monotonic() - t0
            network.wait_tcp(port.address, migration.CONTAINER_REDIS_PORT, timeout=30.0)
            time.sleep(0.5)  # settled: what it holds now, not what it is still reading in
            stat, peak = self.containers.memory_stat(name)
        finally:
            try:
                self.containers.destroy(name)
            finally:
                self.firewall.unguard(sid)
        needs = sizing.from_cgroup(stat, peak, started)
        sizing.save(self.cfg.lxc_path, self.cfg.base_container, needs)
        log.info("base image %s needs %s", self.cfg.base_container, needs)
        return needs

    # -- views ---------------------------------------------------------------------------
    def allocated(self, servers: list[ServerRecord] | None = None) -> resources.Amount:
        """Cores and memory held by servers (a stopped, migration-pending one holds none)."""
        servers = self.store.servers() if servers is None else servers
        return resources.total(s.limits for s in servers if s.state != "migration_pending")

    def free(self, servers: list[ServerRecord] | None = None) -> resources.Amount:
        """The node's one figure of free resources; negative where the basic service has
        grown into the allocations."""
        return self.allocator.free(self.allocated(servers))

    def _taken_ports(self, servers: list[ServerRecord]) -> set[int]:
        """Host ports in use. A migration-pending server holds none: its forwards are gone
        and the retry reaches its Redis over the bridge, so a tenant whose sink is down
        cannot exhaust the port range."""
        return {p for s in servers if s.state != "migration_pending"
                for p in (s.access_port, *s.ports.values())}

    def offer(self) -> NodeOffer:
        servers = self.store.servers()
        return NodeOffer(
            name=self.cfg.name,
            capacity=self.allocator.capacity,
            reserved=self.allocator.reserve,
            basic_service=self.allocator.basic,
            allocated=self.allocated(servers).resources(),
            free=self.free(servers).resources(),
            unit=self.unit,
            servers=len(servers),
            admission=self.cfg.admission,
            ports_free=network.free_port_count(self.cfg.port_range, self._taken_ports(servers)),
            autoscale_interval_s=self.cfg.autoscale_interval_s,
            load=round(os.getloadavg()[0] / max(1, len(os.sched_getaffinity(0))), 3),
            min_priority=self.cfg.min_priority,
        )

    def get(self, sid: str, owner: str | None = None) -> ServerRecord:
        rec = self.store.get(sid)
        if rec is None:
            raise NotFound(sid)
        if owner is not None and rec.owner != owner:
            raise Forbidden(sid)
        return rec

    def servers(self, owner: str | None = None) -> list[ServerInfo]:
        return sorted((s.info() for s in self.store.servers()
                       if owner is None or s.owner == owner),
                      key=lambda s: (-s.priority, s.created_at))

    # -- Procedure 2: handshake ----------------------------------------------------------
    def handshake(self, req: SetupRequest, owner: str) -> SetupResponse:
        """Admit (resources, priority, ports), then launch the container and forward ports."""
        rec, evict = self._reserve(req, owner)
        # Pre-emption: until the evicted tenants are gone the node is briefly over its
        # allocation on paper; meanwhile every other handshake sees less free, not more.
        for sid in evict:
            self.terminate(sid, TerminationReason.PREEMPTED, {"by_priority": req.priority})
        try:
            self._launch(rec)
        except Exception as exc:
            log.exception("launch of %s failed", rec.id)
            self._undo_launch(rec)
            raise LaunchFailed(f"{type(exc).__name__}: {exc}") from exc
        rec.state = "running"
        self.store.save(rec)
        self.events.emit("server.launched", rec, "handshake",
                         {"limits": rec.limits.model_dump()}, notify=False)
        return SetupResponse(
            server_id=rec.id,
            container=rec.container,
            address=rec.address,
            access=Access(host=self.cfg.public_host, port=rec.access_port),
            ports=rec.ports,
            limits=rec.limits,
            redis_password=rec.redis_password,
        )

    def _reserve(self, req: SetupRequest, owner: str) -> tuple[ServerRecord, list[str]]:
        with self._lock:
            servers = self.store.servers()
            active = [s for s in servers if s.state in ("launching", "running")]
            taken = self._taken_ports(servers)
            free = self.free(servers)
            decision = resources.admit(
                unit=self.unit,
                free=free,
                priority=req.priority,
                min_priority=self.cfg.min_priority,
                ports_needed=1 + len(req.ports),
                ports_free=network.free_port_count(self.cfg.port_range, taken),
                tenants=[resources.Tenant(s.id, s.priority, s.limits, s.created_at)
                         for s in active],
                policy=self.cfg.admission,
            )
            shown = free.resources()
            if not decision.admit:
                raise AdmissionRefused(decision.reason or "insufficient_resources", decision.detail,
                              shown)
            pending = sum(s.owner == owner and s.state == "migration_pending" for s in servers)
            if pending >= self.cfg.max_pending_per_owner:
                raise AdmissionRefused("migrations_pending",
                               f"{pending} servers of {owner} wait for their sink "
                               f"(at most {self.cfg.max_pending_per_owner})", shown)
            ports = network.pick_ports(self.cfg.port_range, taken, 1 + len(req.ports))
            if ports is None:  # counted free, but another process holds some of them
                raise AdmissionRefused("ports_unavailable",
                               f"fewer than {1 + len(req.ports)} bindable host ports in "
                               f"{self.cfg.port_range}", shown)
            address = network.pick_address(self.cfg.subnet, {s.address for s in servers})
            if address is None:
                raise AdmissionRefused("insufficient_resources",
                               f"no free address left in {self.cfg.subnet}", shown)
            sid = secrets.token_hex(4)
            rec = ServerRecord(
                id=sid,
                app=req.app,
                owner=owner,
                priority=req.priority,
                state="launching",
                container=f"{self.cfg.container_prefix}{sid}",
                address=str(address),
                access_port=ports[0],
                ports=dict(zip(req.ports, ports[1:], strict=True)),
                limits=self.unit,
                users=len(req.users),
                latency_objective_ms=req.latency_objective_ms,
                override=req.override,
                termination=req.termination,
                created_at=time.time(),
                data_sink=req.data_sink,
                callback_url=str(req.callback_url) if req.callback_url else None,
                intercept=req.intercept,
                redis_password=secrets.token_urlsafe(18),
                ssh_public_key=req.ssh_public_key,
                handover_digest=(handover.key_digest(req.handover_key)
                                 if req.handover_key else None),
            )
            self.store.save(rec, users=req.users)
            return rec, list(decision.evict)

    def _launch(self, rec: ServerRecord) -> None:
        port = _port(rec)
        self.firewall.guard(rec.id, port)
        network.pin_neighbour(rec.address, port.mac, self.cfg.bridge)
        self.containers.create(
            rec.container,
            address=rec.address,
            prefixlen=self.cfg.subnet.prefixlen,
            gateway=str(self.cfg.gateway),
            bridge=self.cfg.bridge,
            limits=rec.limits,
            authorized_key=rec.ssh_public_key,
            redis_password=rec.redis_password,
            veth=port.veth,
            mac=port.mac,
        )
        self.containers.start(rec.container)
        self.firewall.add(rec.id, _forwards(rec))
        self.containers.wait_ssh(rec.address, timeout=self.cfg.launch_timeout_s,
                                 name=rec.container)

    def _undo_launch(self, rec: ServerRecord) -> None:
        log.warning("launch of %s failed; undoing", rec.id)
        try:
            self.firewall.remove(rec.id, redirects=bool(rec.intercept))
        finally:
            try:
                self.containers.destroy(rec.container)
                self.firewall.unguard(rec.id)
            finally:
                with self._lock:
                    self.store.delete(rec.id)

    # -- transparent redirection ---------------------------------------------------------
    def set_redirect(self, sid: str, on: bool, owner: str | None = None) -> int:
        """Switch the server's transparent redirection on (the cloud manager, once its
        server answers) or off (first step of a withdrawal); returns the rules in place."""
        with self._lock:
            rec = self.get(sid, owner)
            if not rec.intercept:
                raise CannotRedirect(400, f"server {sid}: its setup request named no intercept")
            if on and rec.state != "running":
                raise CannotRedirect(409, f"server {sid} is {rec.state}")
            rec.redirecting = on
            self.store.save(rec)
        if on:
            rules = _redirects(rec, self.store.users(rec.id))
            self.firewall.redirect(rec.id, rules)
            return len(rules)
        self.firewall.unredirect(rec.id)
        return 0

    # -- handover between nodes ----------------------------------------------------------
    def hand_over(self, sid: str, req: HandoverRequest,
                  owner: str | None = None) -> HandoverResult:
        """Give the server's users, data included, to `req.to_server`
        on another node: fence the server, send the keys, and once the other node holds
        them all end this server in the background, its shared keys merged home but not
        the handed users' keys. If the other node does not take them, the fence goes and
        the server serves on (HandoverError)."""
        busy = self._busy_lock(self.get(sid, owner).id)
        if not busy.acquire(blocking=False):
            raise handover.HandoverError(409, "not_running", f"server {sid} is busy (being "
                                         "handed over or receiving data)")
        try:
            rec = self.get(sid)
            if rec.state != "running":
                raise handover.HandoverError(409, "not_running", f"server {sid} is {rec.state}")
            moving = [u.id for u in self.store.users(sid)]
            self._fence(rec)
            try:
                patterns = rec.data_sink.shared_patterns if rec.data_sink else []
                result = handover.send(rec, moving, patterns, req.to_url, req.to_server,
                                       req.key, self._peer)
            except BaseException:
                self.firewall.unfence(rec.id)
                raise
            with self._lock:
                rec = self.get(sid)
                rec.handed_to, rec.handed_users = req.to_server, moving
                self.store.save(rec)
        finally:
            busy.release()
        threading.Thread(target=self._end_handed, args=(sid, result), daemon=True,
                         name=f"handed-{sid}").start()
        return result

    def _end_handed(self, sid: str, result: HandoverResult) -> None:
        try:  # this server alone, whatever its termination mode: its siblings serve on
            self._terminate_one(sid, TerminationReason.HANDOVER, {"handed_to": result.to_server,
                                                  "keys_handed": result.keys})
        except (MigrationPending, NotFound):
            pass  # kept for the merge's retry / ended by someone else meanwhile
        except Exception:  # noqa: BLE001 (a thread of its own: log it)
            log.exception("ending %s after its handover", sid)

    def import_data(self, sid: str, key: str, data: HandoverData) -> ImportResult:
        """The receiving side: `key` must be the one of the setup request; the last
        request (`final`) spends it."""
        rec = self.store.get(sid)
        if rec is None or not handover.key_matches(rec, key):
            raise Forbidden(sid)
        with self._busy_lock(sid):
            rec = self.get(sid)
            if rec.state != "running":
                raise handover.HandoverError(409, "not_running", f"server {sid} is {rec.state}")
            result = handover.receive(rec, [u.id for u in self.store.users(sid)], data)
            if data.final:
                with self._lock:
                    rec = self.get(sid)
                    rec.handover_digest = None
                    self.store.save(rec)
        return result

    def _busy_lock(self, sid: str) -> threading.Lock:
        with self._lock:
            return self._busy.setdefault(sid, threading.Lock())

    # -- scaling (used by the auto-scaler) -----------------------------------------------
    def scale(self, server_id: str, limits: Resources, reason: ScaleReason,
              numbers: dict) -> None:
        with self._lock:
            rec = self.get(server_id)
            if rec.state != "running":
                raise RuntimeError(f"{server_id}: cannot scale a server that is {rec.state}")
            growth = (resources.Amount.of(limits) - resources.Amount.of(rec.limits)).at_least_zero()
            if not growth.is_zero() and not resources.fits(growth, self.free()):
                raise AdmissionRefused("insufficient_resources", f"{server_id}: no room to grow")
            self.containers.set_limits(rec.container, limits)
            old = rec.limits
            rec.limits = limits
            self.store.save(rec)
        self.events.emit("server.scaled", rec, reason,
                         {**numbers, "from": old.model_dump(), "to": limits.model_dump()})

    def enforce_limits(self) -> dict[str, dict[str, str]]:
        """Put back the limits of every running server whose kernel values differ from the
        store's (a tenant or a stray tool wrote them); each case is a
        `server.limits_restored` event. Runs at the start of every auto-scaling round."""
        restored: dict[str, dict[str, str]] = {}
        for rec in self.store.servers():
            if rec.state != "running":
                continue
            with self._lock:
                try:
                    changed = self.containers.restore(rec.container, rec.limits)
                except Exception as exc:  # gone meanwhile, or the kernel said no
                    log.warning("limits of %s not restored: %s", rec.id, exc)
                    continue
            if changed:
                restored[rec.id] = changed
                self.events.emit("server.limits_restored", rec, "changed_outside_enorm",
                                 {"found": changed, "limits": rec.limits.model_dump()},
                                 notify=False)
        return restored

    # -- Procedure 4: termination --------------------------------------------------------
    def terminate(self, server_id: str, reason: TerminationReason, numbers: dict | None = None,
                  owner: str | None = None) -> TerminateResult:
        """Terminate a server (and, in `multiple` mode, its siblings of the same app)."""
        rec = self.get(server_id, owner)
        group = [rec]
        if rec.termination == "multiple":
            group += [s for s in self.store.servers()
                      if s.id != rec.id and s.owner == rec.owner and s.app == rec.app]
        result = TerminateResult(terminated=[])
        for s in group:
            try:
                result.add(self._terminate_one(s.id, reason, numbers or {}))
                result.terminated.append(s.id)
            except MigrationPending:
                result.pending.append(s.id)
            except NotFound:
                pass  # terminated meanwhile by someone else
        return result

    def _terminate_one(self, sid: str, reason: TerminationReason, numbers: dict) -> MergeReport:
        # A handover or an import under way finishes first: then the merge below sees
        # the users as handed (old node), or the keys that came in (new node).
        self.get(sid)  # an unknown id gets no lock
        with self._busy_lock(sid), self._lock:
            rec = self.get(sid)
            if rec.state == "terminating" and reason != TerminationReason.RECONCILE:
                raise NotFound(sid)  # another call is on it
            resumed = rec.state == "terminating"  # a restart finishes what a crash cut off
            was_pending = rec.state == "migration_pending"
            if resumed or (was_pending and rec.end_reason):
                reason = rec.end_reason or reason
            rec.state, rec.end_reason = "terminating", reason
            self.store.save(rec)
        if resumed:
            numbers = {**numbers, "resumed_after_restart": True}
        # No new connection of a user may reach a server that is going: the redirects go
        # before the data is merged.
        if rec.intercept:
            self.firewall.unredirect(rec.id)
        _fault("terminate.started")
        if not self.containers.exists(rec.container):
            # Destroyed by us after its merge (a crash came before the record went), or
            # gone behind our back with its data: either way nothing is left to merge.
            self.firewall.remove(rec.id, redirects=bool(rec.intercept))
            self.firewall.unguard(rec.id)
            self.containers.destroy(rec.container)  # its id range and mounts
            self._forget(rec, reason if resumed else TerminationReason.CONTAINER_LOST,
                         {**numbers, "keys_migrated": 0, "requested_by": reason})
            return MergeReport()
        if was_pending:  # its Redis lives in the stopped container: bring it back first
            self.containers.start(rec.container)
        merged, merge_s = MergeReport(), None
        if self.migrate is not None and rec.data_sink is not None:
            t0 = time.perf_counter()
            self._fence(rec)
            try:
                merged = self.migrate(rec, [u.id for u in self.store.users(rec.id)])
            except Exception as exc:
                self._keep_for_retry(rec, reason, exc)
                raise MigrationPending(str(exc)) from exc
            merge_s = round(time.perf_counter() - t0, 4)
        _fault("terminate.merged")
        self.firewall.remove(rec.id, redirects=bool(rec.intercept))
        self._destroy(rec)
        if rec.data_sink is not None or rec.handed_to is not None or resumed:
            self.firewall.unfence(rec.id)  # else never fenced: spare the `iptables -S`
        _fault("terminate.destroyed")
        self._forget(rec, reason, {**numbers, **merged.model_dump(), "merge_s": merge_s})
        return merged

    def _fence(self, rec: ServerRecord) -> None:
        """No request reaches the server once its data is being read: its application
        ports answer with a TCP reset (a user's open connection too, which conntrack
        would keep past the forward's removal), and what it had already received gets
        `merge_drain_s` to write. A client reset goes back to the cloud, which the cloud
        manager pointed it to before asking for the termination."""
        if not rec.ports:
            return
        self.firewall.fence(rec.id, rec.address, sorted(rec.ports))
        time.sleep(self.cfg.merge_drain_s)

    def _destroy(self, rec: ServerRecord) -> None:
        """Stop the container, then delete its files and lift its bridge guard side by
        side: once it is stopped its veth is gone, so the guard protects nothing, and
        LXC's delete (in this process) and ebtables' rewrite (a child) overlap."""
        self.containers.stop(rec.container)
        unguarded = self.firewall.unguard_begin(rec.id, _port(rec))
        try:
            self.containers.destroy(rec.container)
        finally:
            unguarded()

    def _forget(self, rec: ServerRecord, reason: TerminationReason, data: dict) -> None:
        """The record goes and its `server.terminated` event comes in one transaction:
        after a crash the cloud learns of the termination from one or the other."""
        ev = self.events.make("server.terminated", rec, reason, data)
        with self._lock:
            self.store.delete(rec.id, event=ev, outbox_url=rec.callback_url)
            self._busy.pop(rec.id, None)
        _fault("terminate.forgotten")
        self.events.announce(ev, rec, queued=bool(rec.callback_url))

    def _keep_for_retry(self, rec: ServerRecord, reason: TerminationReason,
                        exc: Exception) -> None:
        """The sink is unreachable: stop the container but keep it (and its data)."""
        log.warning("migration of %s failed (%s); container kept", rec.id, exc)
        self.firewall.remove(rec.id, redirects=bool(rec.intercept))
        self.containers.stop(rec.container)
        self.firewall.unfence(rec.id)
        with self._lock:
            rec.state = "migration_pending"
            self.store.save(rec)
        self.events.emit("server.migration_failed", rec, reason, {"error": str(exc)})

    def retry_pending(self) -> list[str]:
        """Try again to merge back and destroy servers whose migration failed before."""
        done = []
        for rec in self.store.servers():
            if rec.state == "migration_pending":
                try:
                    self._terminate_one(rec.id, TerminationReason.MIGRATION_RETRY, {})
                    done.append(rec.id)
                except (MigrationPending, NotFound):
                    pass
        return done

    def discard_pending(self, save_dir: Path) -> dict[str, Path]:
        """Operator's last resort (`enorm down --force`): save each pending server's keys to
        a file under save_dir, then destroy it without merging. Returns id -> file."""
        saved = {}
        save_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for rec in self.store.servers():
            if rec.state != "migration_pending":
                continue
            path = save_dir / f"{rec.id}-{int(time.time())}.json"
            if self.containers.exists(rec.container):
                self.containers.start(rec.container)
                keys = migration.save_keys(rec, path)
                self.containers.destroy(rec.container)
            else:
                keys = 0
            self.firewall.remove(rec.id, redirects=bool(rec.intercept))
            self._forget(rec, TerminationReason.DISCARDED_BY_OPERATOR,
                         {"keys_migrated": 0, "keys_saved": keys, "saved_to": str(path)})
            saved[rec.id] = path
        return saved

    # -- restart -------------------------------------------------------------------------
    def reconcile(self) -> dict:
        """Make containers and rules agree with the store, after a crash or a reboot.

        launching -> undone (the cloud never got a 201); terminating -> finished;
        running with a stopped container -> started again, limits re-applied; running
        with its container gone -> dropped, with an event; containers and rules that no
        record owns -> removed.
        """
        report: dict = {"undone": [], "finished": [], "restarted": [], "lost": [],
                        "orphans": [], "errors": {}}
        records = {s.id: s for s in self.store.servers()}
        # Every container that may run gets its guard before anything starts it.
        self.firewall.reconcile_guards({r.id: _port(r) for r in records.values()})
        for rec in list(records.values()):
            try:
                self._reconcile_one(rec, records, report)
            except Exception as exc:  # one broken server must not stop the node
                log.exception("reconcile of %s", rec.id)
                report["errors"][rec.id] = f"{type(exc).__name__}: {exc}"
        owned = {r.container for r in records.values()}
        for name in self.containers.names():
            if name not in owned:
                self.containers.destroy(name)
                report["orphans"].append(name)
        running = [r for r in records.values() if r.state == "running"]
        report["rules"] = self.firewall.reconcile(
            {r.id: _forwards(r) for r in running},
            {r.id: _redirects(r, self.store.users(r.id)) for r in running if r.redirecting})
        report["guards"] = self.firewall.reconcile_guards(
            {r.id: _port(r) for r in records.values()})
        return report

    def _reconcile_one(self, rec: ServerRecord, records: dict[str, ServerRecord],
                       report: dict) -> None:
        if rec.state == "launching":
            self._undo_launch(rec)
            report["undone"].append(rec.id)
            del records[rec.id]
        elif rec.state == "terminating":
            try:
                self._terminate_one(rec.id, TerminationReason.RECONCILE, {})
                report["finished"].append(rec.id)
                del records[rec.id]
            except MigrationPending:
                pass
        elif rec.state == "running":
            if not self.containers.exists(rec.container):
                self.containers.destroy(rec.container)  # its id range and mounts
                self._forget(rec, TerminationReason.CONTAINER_LOST, {"keys_migrated": 0})
                report["lost"].append(rec.id)
                del records[rec.id]
                return
            if not self.containers.running(rec.container):
                self.containers.start(rec.container)
                report["restarted"].append(rec.id)
            self.containers.set_limits(rec.container, rec.limits)

    def shutdown_node(self) -> TerminateResult:
        """Terminate every server (data merged back), e.g. when decommissioning."""
        result = TerminateResult(terminated=[])
        for s in self.store.servers():
            try:
                r = self.terminate(s.id, reason=TerminationReason.NODE_SHUTDOWN)
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
