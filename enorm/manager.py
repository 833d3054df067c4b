"""The Edge Manager: admission (the node manager) and launch (the server manager).

A setup request, top down (`EdgeManager.handshake`):

    admit (`resources.admit`: resources, priority, ports; the owner's pending servers;
    host ports and an address picked) -> the record made from the request
    (`ServerRecord.admitted`) and saved as `launching` -> pre-empted tenants terminated ->
    launch (bridge guard, neighbour entry, container created and started, forwards,
    sshd up) -> `running`, `server.launched` -> the answer (`ServerRecord.response`)

Each step is recorded before it is taken, so that a restart can undo a launch a killed
daemon left half done (`reconcile`). The manager also changes what a running server has:
its limits (the auto-scaler's `scale`, and `enforce_limits` at each round) and its
transparent redirection. Its other jobs live in their own rooms and are injected:
termination (`termination.Terminator`), handover between nodes (`handover.Handovers`),
reconciliation at start (`reconcile`); what the node holds is read off the `Node`.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Literal

from enorm import network, resources, sizing
from enorm.containers import LimitRefused
from enorm.node import Node, forwards, port_of, redirects
from enorm.protocol import (
    RefusalReason,
    Resources,
    ScaleReason,
    SetupRequest,
    SetupResponse,
    TerminateResult,
    TerminationReason,
)
from enorm.store import ServerRecord
from enorm.termination import Terminator

log = logging.getLogger(__name__)


class AdmissionRefused(Exception):
    """Admission, or a change of a server's limits, said no (409); `reason` is
    machine-readable, `field` the request's field where one is to blame."""

    def __init__(self, reason: RefusalReason, detail: str, free: Resources | None = None,
                 field: str | None = None) -> None:  # fmt: skip
        super().__init__(detail)
        self.reason, self.detail, self.free, self.field = reason, detail, free, field


class LaunchFailed(Exception):
    """The server was admitted but its container did not come up (503, typed); the node
    has undone the launch, so the cloud may retry here or go elsewhere."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class CannotRedirect(Exception):
    """Transparent redirection asked of a server that has none, or is not running."""

    def __init__(self, reason: Literal["no_intercept", "not_running"], detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


class EdgeManager:
    def __init__(self, node: Node, ends: Terminator) -> None:
        self.node = node
        self.ends = ends

    # -- Procedure 2: handshake ----------------------------------------------------------
    def handshake(self, req: SetupRequest, owner: str) -> SetupResponse:
        """Admit (resources, priority, ports), then launch the container and forward ports."""
        rec, evict = self._admit(req, owner)
        # Pre-emption: until the evicted tenants are gone the node is briefly over its
        # allocation on paper; meanwhile every other handshake sees less free, not more.
        for sid in evict:
            self.ends.terminate(sid, TerminationReason.PREEMPTED, {"by_priority": req.priority})
        try:
            self._launch(rec)
        except Exception as exc:
            log.exception("launch of %s failed", rec.id)
            undo_launch(self.node, rec)
            raise LaunchFailed(f"{type(exc).__name__}: {exc}") from exc
        rec.state = "running"
        self.node.store.save(rec)
        self.node.events.emit("server.launched", rec, "handshake",
                              {"limits": rec.limits.model_dump()}, notify=False)
        return rec.response(self.node.config.public_host)

    def _admit(self, req: SetupRequest, owner: str) -> tuple[ServerRecord, list[str]]:
        """The admission decision and, when it admits, the record saved as `launching`
        (with the ids of the tenants to pre-empt), all under the node's lock."""
        node, cfg = self.node, self.node.config
        with node.lock:
            servers = node.store.servers()
            taken = node.taken_ports(servers)
            free = node.free(servers)
            decision = resources.admit(
                unit=node.unit,
                free=free,
                priority=req.priority,
                min_priority=cfg.min_priority,
                ports_needed=1 + len(req.ports),
                ports_free=network.free_port_count(cfg.port_range, taken),
                tenants=[resources.Tenant(s.id, s.priority, s.limits, s.created_at)
                         for s in servers if s.state in ("launching", "running")],
                policy=cfg.admission,
            )
            shown = free.resources()
            if not decision.admit:
                raise AdmissionRefused(decision.reason or "insufficient_resources",
                                       decision.detail, shown)
            pending = sum(s.owner == owner and s.state == "migration_pending" for s in servers)
            if pending >= cfg.max_pending_per_owner:
                raise AdmissionRefused("migrations_pending",
                                       f"{pending} servers of {owner} wait for their sink "
                                       f"(at most {cfg.max_pending_per_owner})", shown)
            ports = network.pick_ports(cfg.port_range, taken, 1 + len(req.ports))
            if ports is None:  # counted free, but another process holds some of them
                raise AdmissionRefused("ports_unavailable",
                                       f"fewer than {1 + len(req.ports)} bindable host ports "
                                       f"in {cfg.port_range}", shown)
            address = network.pick_address(cfg.subnet, node.taken_addresses(servers))
            if address is None:
                raise AdmissionRefused("insufficient_resources",
                                       f"no free address left in {cfg.subnet}", shown)
            sid = secrets.token_hex(4)
            rec = ServerRecord.admitted(
                req, sid=sid, owner=owner, container=f"{cfg.container_prefix}{sid}",
                address=str(address), host_ports=ports, limits=node.unit,
                created_at=time.time())
            node.store.save(rec, users=req.users)
            return rec, list(decision.evict)

    def _launch(self, rec: ServerRecord) -> None:
        node, cfg = self.node, self.node.config
        port = port_of(rec)
        # The guard and the neighbour entry are written by child processes beside the
        # clone (the id is new: nothing to read first); both are in place before the start.
        guarded = node.firewall.guard_begin(rec.id, port)
        pinned = network.pin_neighbour_begin(rec.address, port.mac, cfg.bridge)
        try:
            try:
                node.containers.create(
                    rec.container,
                    address=rec.address,
                    prefixlen=cfg.subnet.prefixlen,
                    gateway=str(cfg.gateway),
                    bridge=cfg.bridge,
                    limits=rec.limits,
                    authorized_key=rec.ssh_public_key,
                    redis_password=rec.redis_password,
                    veth=port.veth,
                    mac=port.mac,
                )
            finally:
                try:
                    guarded()
                finally:
                    pinned()
            node.containers.start(rec.container)
            node.firewall.add(rec.id, forwards(rec), new=True)
            node.containers.wait_ssh(rec.address, timeout=cfg.launch_timeout_s,
                                     name=rec.container)
        finally:
            node.containers.started(rec.container)  # the layer pool refills after it

    # -- what a running server has: its limits and its redirection -----------------------
    def scale(self, server_id: str, limits: Resources, reason: ScaleReason,
              numbers: dict) -> bool:  # fmt: skip
        """Give a running server new limits: checked before anything is written (its
        state, the room on the node, what the image needs), then written all or nothing
        (AdmissionRefused for each). The limits it has already: nothing done, no event
        (False)."""
        node = self.node
        with node.lock:
            rec = node.get(server_id)
            if rec.state != "running":
                raise AdmissionRefused("not_running", f"server {server_id} is {rec.state}",
                                       field="id")
            if limits == rec.limits:
                return False
            free = node.free()
            growth = (resources.Amount.of(limits) - resources.Amount.of(rec.limits)).at_least_zero()
            if not resources.fits(growth, free):
                field = "cores" if growth.cores > free.cores + resources.EPS else "memory_mb"
                raise AdmissionRefused("insufficient_resources", f"{server_id}: no room to "
                                       f"grow its {field} (free: {free.resources()})",
                                       free.resources(), field)
            needs = (sizing.load(node.config.lxc_path, node.config.base_container)
                     if limits.memory_mb < rec.limits.memory_mb else None)  # shrinking only
            if needs is not None and limits.memory_mb < sizing.least_memory_mb(needs):
                raise AdmissionRefused("below_needs", f"{limits.memory_mb} MB is less than "
                                       f"the base image needs ({sizing.least_memory_mb(needs)}"
                                       " MB)", field="memory_mb")
            try:
                node.containers.set_limits(rec.container, limits, was=rec.limits)
            except LimitRefused as exc:  # the kernel's own no (memory in use): undone
                raise AdmissionRefused("memory_in_use" if exc.memory else "insufficient_resources",
                                       str(exc), field="memory_mb" if exc.memory else "cores"
                                       ) from exc
            old = rec.limits
            rec.limits = limits
            node.store.save(rec)
        node.events.emit("server.scaled", rec, reason,
                         {**numbers, "from": old.model_dump(), "to": limits.model_dump()})
        return True

    def terminate(self, server_id: str, reason: TerminationReason, numbers: dict | None = None,
                  owner: str | None = None, cloud_wins: bool = False) -> TerminateResult:
        """Procedure 4, by the Terminator: the one entry for the auto-scaler and the API."""
        return self.ends.terminate(server_id, reason, numbers, owner, cloud_wins)

    def enforce_limits(self) -> dict[str, dict[str, str]]:
        """Put back the limits of every running server whose kernel values differ from the
        store's (a tenant or a stray tool wrote them); each case is a
        `server.limits_restored` event. Runs at the start of every auto-scaling round."""
        node = self.node
        restored: dict[str, dict[str, str]] = {}
        for rec in node.store.servers():
            if rec.state != "running":
                continue
            with node.lock:
                try:
                    changed = node.containers.restore(rec.container, rec.limits)
                except Exception as exc:  # gone meanwhile, or the kernel said no
                    log.warning("limits of %s not restored: %s", rec.id, exc)
                    continue
            if changed:
                restored[rec.id] = changed
                node.events.emit("server.limits_restored", rec, "changed_outside_enorm",
                                 {"found": changed, "limits": rec.limits.model_dump()},
                                 notify=False)
        return restored

    def set_redirect(self, sid: str, on: bool, owner: str | None = None) -> int:
        """Switch the server's transparent redirection on (the cloud manager, once its
        server answers) or off (first step of a withdrawal); returns the rules in place."""
        node = self.node
        with node.lock:
            rec = node.get(sid, owner)
            if not rec.intercept:
                raise CannotRedirect("no_intercept",
                                     f"server {sid}: its setup request named no intercept")
            if on and rec.state != "running":
                raise CannotRedirect("not_running", f"server {sid} is {rec.state}")
            rec.redirecting = on
            node.store.save(rec)
        if on:
            rules = redirects(rec, node.store.users(rec.id))
            node.firewall.redirect(rec.id, rules)
            return len(rules)
        node.firewall.unredirect(rec.id)
        return 0


def undo_launch(node: Node, rec: ServerRecord) -> None:
    """A launch that failed (or that a crash cut off: `reconcile`) leaves nothing behind:
    no forwards, no container, no guard, no record."""
    log.warning("launch of %s failed; undoing", rec.id)
    try:
        node.firewall.remove(rec.id, redirects=bool(rec.intercept))
    finally:
        try:
            node.containers.destroy(rec.container)
            node.firewall.unguard(rec.id)
        finally:
            with node.lock:
                node.store.delete(rec.id)
