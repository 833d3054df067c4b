"""Reconciliation at start: the node's containers and rules made to agree with its store.

`start` brings up the bridge and the node's chains, reconciles, and refuses a unit the
base image cannot start in (measured once per image by `measure_image`). The store is
the truth: each step of a launch or a termination was recorded before it was taken, so
whatever a killed daemon left half done is finished or undone here (`reconcile`).
"""

from __future__ import annotations

import logging
import secrets
import time

from enorm import migration, network, sizing
from enorm.config import ConfigError
from enorm.firewall import Port
from enorm.manager import undo_launch
from enorm.node import Node, check_unit, forwards, port_of, redirects
from enorm.protocol import Resources, TerminationReason
from enorm.store import ServerRecord
from enorm.termination import DestroyPending, MigrationPending, Terminator

log = logging.getLogger(__name__)


def start(node: Node, ends: Terminator, sized: bool = True) -> dict:
    """Bring up the bridge and chains, reconcile the store with reality, and (`sized`)
    refuse a unit the image cannot start in. `enorm down` opens the node unsized: it
    starts nothing, so neither the unit nor the image matters to it."""
    cfg = node.config
    known = sizing.load(cfg.lxc_path, cfg.base_container) if sized else None
    if known is not None:
        check_unit(cfg, known)
    network.ensure_bridge(cfg.bridge, cfg.subnet)
    node.firewall.setup()
    report = reconcile(node, ends)
    if sized:
        needs = known or measure_image(node)
        check_unit(cfg, needs)
        report["image_needs"] = needs.as_dict()
    return report


def measure_image(node: Node) -> sizing.Needs:
    """Measure what the base image needs to start (`start` does, once per image: a probe
    container, destroyed after; a crash leaves an orphan that `reconcile` removes) and
    keep the figure beside the image."""
    cfg, containers, firewall = node.config, node.containers, node.firewall
    sid = secrets.token_hex(4)
    name = f"{cfg.container_prefix}{sid}"
    with node.lock:
        address = network.pick_address(cfg.subnet, {s.address for s in node.store.servers()})
    if address is None:
        raise ConfigError(f"subnet {cfg.subnet}: no address left to measure the image")
    port = Port(network.host_veth(sid), network.mac_address(sid), str(address))
    room = Resources(cores=max(1.0, node.unit.cores), memory_mb=max(1024, node.unit.memory_mb))
    try:
        firewall.guard(sid, port)
        network.pin_neighbour(port.address, port.mac, cfg.bridge)
        containers.create(
            name, address=port.address, prefixlen=cfg.subnet.prefixlen,
            gateway=str(cfg.gateway), bridge=cfg.bridge, limits=room,
            authorized_key="", redis_password=secrets.token_hex(16),
            veth=port.veth, mac=port.mac)
        t0 = time.monotonic()
        containers.start(name)
        containers.wait_ssh(port.address, timeout=max(60.0, cfg.launch_timeout_s))
        started = time.monotonic() - t0
        network.wait_tcp(port.address, migration.CONTAINER_REDIS_PORT, timeout=30.0)
        time.sleep(0.5)  # settled: what it holds now, not what it is still reading in
        stat, peak = containers.memory_stat(name)
    finally:
        try:
            containers.destroy(name)
        finally:
            firewall.unguard(sid)
    needs = sizing.from_cgroup(stat, peak, started)
    sizing.save(cfg.lxc_path, cfg.base_container, needs)
    log.info("base image %s needs %s", cfg.base_container, needs)
    return needs


def reconcile(node: Node, ends: Terminator) -> dict:
    """Make containers and rules agree with the store, after a crash or a reboot.

    launching -> undone (the cloud never got a 201); terminating -> finished (or its
    container's removal retried in the background, `retrying`);
    running with a stopped container -> started again, limits re-applied; running
    with its container gone -> dropped, with an event; containers and rules that no
    record owns -> removed, and with them anything left of a container of the node's
    in any state (`Containers.leftovers`: a directory without a config, a mount, a
    loop device, an id claim).
    """
    report: dict = {"undone": [], "finished": [], "restarted": [], "lost": [],
                    "retrying": [], "orphans": [], "errors": {}}
    records = {s.id: s for s in node.store.servers()}
    every = dict(records)
    # Every container that may run gets its guard before anything starts it.
    node.firewall.reconcile_guards({r.id: port_of(r) for r in records.values()})
    for rec in list(records.values()):
        try:
            _reconcile_one(node, ends, rec, records, report)
        except Exception as exc:  # one broken server must not stop the node
            log.exception("reconcile of %s", rec.id)
            report["errors"][rec.id] = f"{type(exc).__name__}: {exc}"
    report["orphans"] = sweep(node, {r.container for r in records.values()}
                              | {every[i].container for i in report["retrying"]},
                              report["errors"])
    running = [r for r in records.values() if r.state == "running"]
    report["rules"] = node.firewall.reconcile(
        {r.id: forwards(r) for r in running},
        {r.id: redirects(r, node.store.users(r.id)) for r in running if r.redirecting})
    report["guards"] = node.firewall.reconcile_guards(
        {r.id: port_of(r) for r in records.values()})
    return report


def sweep(node: Node, owned: set[str], errors: dict[str, str]) -> list[str]:
    """Remove everything left of the node's containers that no record owns; returns
    their names (one that cannot be removed is named in `errors`, and the others go on)."""
    removed = []
    for name in node.containers.leftovers():
        if name in owned:
            continue
        try:
            node.containers.destroy(name)
            removed.append(name)
        except Exception as exc:
            log.exception("removing what is left of %s", name)
            errors[name] = f"{type(exc).__name__}: {exc}"
    return removed


def _reconcile_one(node: Node, ends: Terminator, rec: ServerRecord,
                   records: dict[str, ServerRecord], report: dict) -> None:
    containers = node.containers
    if rec.state == "launching":
        undo_launch(node, rec)
        report["undone"].append(rec.id)
        del records[rec.id]
    elif rec.state == "terminating":
        try:
            ends.end(rec.id, TerminationReason.RECONCILE, {})
            report["finished"].append(rec.id)
            del records[rec.id]
        except MigrationPending:
            pass
        except DestroyPending:  # its removal is retried in the background: hands off
            report["retrying"].append(rec.id)
            del records[rec.id]
    elif rec.state == "running":
        if not containers.exists(rec.container):
            containers.destroy(rec.container)  # its id range and mounts
            ends.forget(rec, TerminationReason.CONTAINER_LOST, {"keys_migrated": 0})
            report["lost"].append(rec.id)
            del records[rec.id]
            return
        if not containers.running(rec.container):
            containers.start(rec.container)
            report["restarted"].append(rec.id)
        containers.set_limits(rec.container, rec.limits)
