"""One edge node: its parts, wired from the config, and the lookups every job shares.

The Edge Manager's jobs each take a `Node`: admission and launch (`manager`),
termination (`termination`), handover between nodes (`handover`), reconciliation at
start (`reconcile`); the control loop, the API, the metrics and the dashboard read it.
What the node holds is answered here and nowhere else: a server by id (its owner's
only), the servers, the resources allocated and free, the host ports taken, the offer.
`Node.lock` guards every change of allocations, ports and addresses.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from functools import cached_property

from enorm import network, resources, sizing
from enorm.config import ConfigError, NodeConfig
from enorm.containers import Containers
from enorm.events import Events
from enorm.firewall import Firewall, Forward, Port, Redirect
from enorm.protocol import NodeOffer, Resources, ServerInfo, User
from enorm.release import Releases
from enorm.store import ServerRecord, Store

SSH_PORT = 22


class NotFound(KeyError):
    pass


class Forbidden(PermissionError):
    pass


@dataclass
class Node:
    """The parts one Edge Manager drives (built by `build`, replaced in tests)."""

    config: NodeConfig
    store: Store
    containers: Containers
    firewall: Firewall
    allocator: resources.Allocator
    events: Events
    # Guards admission and every change of allocations, ports and addresses.
    lock: threading.RLock = field(default_factory=threading.RLock)
    # Terminated servers whose plumbing is still being undone (their address and ports).
    releases: Releases = field(default_factory=Releases)

    @cached_property
    def unit(self) -> Resources:
        """The unit as the plain wire type."""
        return Resources(**self.config.unit.model_dump())

    def get(self, sid: str, owner: str | None = None) -> ServerRecord:
        """A server's record; another owner's is Forbidden (the API answers 404 alike)."""
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

    def allocated(self, servers: list[ServerRecord] | None = None) -> resources.Amount:
        """Cores and memory held by servers (a stopped, migration-pending one holds none)."""
        servers = self.store.servers() if servers is None else servers
        return resources.total(s.limits for s in servers if s.state != "migration_pending")

    def free(self, servers: list[ServerRecord] | None = None) -> resources.Amount:
        """The node's one figure of free resources; negative where the basic service has
        grown into the allocations."""
        return self.allocator.free(self.allocated(servers))

    def taken_ports(self, servers: list[ServerRecord]) -> set[int]:
        """Host ports in use. A migration-pending server holds none: its forwards are gone
        and the retry reaches its Redis over the bridge, so a tenant whose sink is down
        cannot exhaust the port range. A terminated server's are held until its
        forwards are gone (`releases`)."""
        return {p for s in servers if s.state != "migration_pending"
                for p in (s.access_port, *s.ports.values())} | self.releases.ports()

    def taken_addresses(self, servers: list[ServerRecord]) -> set[str]:
        """Container addresses in use, a terminated server's until it is released."""
        return {s.address for s in servers} | self.releases.addresses()

    def offer(self) -> NodeOffer:
        servers = self.store.servers()
        cfg = self.config
        return NodeOffer(
            name=cfg.name,
            capacity=self.allocator.capacity,
            reserved=self.allocator.reserve,
            basic_service=self.allocator.basic,
            allocated=self.allocated(servers).resources(),
            free=self.free(servers).resources(),
            unit=self.unit,
            servers=len(servers),
            admission=cfg.admission,
            ports_free=network.free_port_count(cfg.port_range, self.taken_ports(servers)),
            autoscale_interval_s=cfg.autoscale_interval_s,
            load=round(os.getloadavg()[0] / max(1, len(os.sched_getaffinity(0))), 3),
            min_priority=cfg.min_priority,
        )


def build(config: NodeConfig, store: Store) -> Node:
    assert config.cores is not None and config.memory_mb is not None
    return Node(
        config=config,
        store=store,
        containers=Containers(config.lxc_path, config.container_prefix, config.base_container,
                              pids_max=config.pids_max, ids=config.id_range,
                              disk_mb=config.disk_mb, layer_pool=config.layer_pool),
        firewall=Firewall(config.name, config.subnet, config.bridge, config.container_egress),
        allocator=allocator(config),
        events=Events(store, timeout=config.callback_timeout_s,
                      give_up_s=config.callback_give_up_s),
    )


def allocator(config: NodeConfig) -> resources.Allocator:
    """The node's resources; the pressure watcher's headroom is held back where it runs
    (else a unit admitted into it was the one the watcher ended seconds later: 3 of 8
    servers on the 1 GB board, run of 2026-12-07)."""
    assert config.cores is not None and config.memory_mb is not None
    watched = config.pressure_interval_s > 0
    return resources.Allocator(
        capacity=Resources(cores=config.cores, memory_mb=config.memory_mb),
        reserve=Resources(cores=config.reserve_cores, memory_mb=config.reserve_memory_mb),
        headroom=Resources(cores=0, memory_mb=config.pressure_headroom_mb if watched else 0),
    )


def check_unit(cfg: NodeConfig, needs: sizing.Needs | None = None) -> None:
    """Refuse a unit the base image cannot start in (ConfigError naming the field). With
    `needs` None, only against a figure already measured: the daemon asks before it
    touches anything (its store, the bridge)."""
    needs = needs or sizing.load(cfg.lxc_path, cfg.base_container)
    problem = needs and sizing.unit_problem(cfg.unit.memory_mb, needs, cfg.base_container)
    if problem:
        raise ConfigError(problem)


# -- a server's plumbing, derived from its record ------------------------------------------
def port_of(rec: ServerRecord) -> Port:
    """Its bridge port: veth, MAC and address (the guard pins them together)."""
    return Port(network.host_veth(rec.id), network.mac_address(rec.id), rec.address)


def forwards(rec: ServerRecord) -> list[Forward]:
    """Its host ports: the access port to sshd (its packets are not the users'), then
    each application port."""
    fw = [Forward(rec.access_port, rec.address, SSH_PORT, counted=False)]
    fw += [Forward(hp, rec.address, cp) for cp, hp in sorted(rec.ports.items())]
    return fw


def redirects(rec: ServerRecord, users: list[User]) -> list[Redirect]:
    """The transparent redirects of a server: each served user x each intercepted
    destination (IPv4 users only: the rules are iptables')."""
    return [Redirect(str(u.address), str(x.address), x.port, rec.address, x.to_port)
            for x in rec.intercept for u in users if u.address.version == 4]
