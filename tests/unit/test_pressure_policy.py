"""The pressure watcher's policy: who goes when the basic service runs short."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from enorm.pressure import evictions, psi_some_avg10
from enorm.protocol import Resources
from enorm.resources import Amount


@dataclass
class S:
    id: str
    priority: int
    created_at: float
    limits: Resources
    state: str = "running"


def srv(id_: str, prio: int, created: float, mb: int, state: str = "running") -> S:
    return S(id_, prio, created, Resources(cores=0.25, memory_mb=mb), state)


def test_lowest_priority_first_newest_first_until_covered() -> None:
    servers = [srv("a", 5, 1.0, 200), srv("b", 1, 1.0, 200), srv("c", 1, 2.0, 200),
               srv("d", 9, 0.0, 200)]
    assert evictions(servers, 150) == ["c"]
    assert evictions(servers, 201) == ["c", "b"]
    assert evictions(servers, 10_000) == ["c", "b", "a", "d"]


def test_nothing_short_nothing_evicted_and_only_running_ones() -> None:
    servers = [srv("a", 1, 1.0, 200, state="migration_pending"), srv("b", 2, 1.0, 100)]
    assert evictions(servers, 0) == []
    assert evictions(servers, -50) == []
    assert evictions(servers, 50) == ["b"]


def test_psi_parsing(tmp_path: Path) -> None:
    p = tmp_path / "memory"
    p.write_text("some avg10=12.50 avg60=3.00 avg300=0.50 total=123\n"
                 "full avg10=1.00 avg60=0.00 avg300=0.00 total=45\n")
    assert psi_some_avg10(p) == 12.5
    assert psi_some_avg10(tmp_path / "missing") is None


def test_a_container_launching_or_ending_is_not_counted_as_the_basic_service(
        monkeypatch) -> None:
    """One look of the watcher on a node with a tenant being withdrawn: its container
    still holds 150 MB that its limits count as allocated; counted as the board's own
    use as well, the look saw a shortfall and ended the other tenant."""
    from types import SimpleNamespace

    from enorm import control_loop, resources

    mb = 1 << 20
    monkeypatch.setattr(control_loop.psutil, "virtual_memory", lambda: SimpleNamespace(
        total=1000 * mb, available=(1000 - 650) * mb))  # 650 MB in use on the machine
    servers = [srv("ending", 1, 1.0, 200, state="terminating"),
               srv("kept", 5, 2.0, 200), srv("new", 5, 3.0, 200, state="launching"),
               srv("parked", 1, 0.5, 200, state="migration_pending")]
    for s in servers:
        s.container = f"c-{s.id}"
    use = {"c-ending": 150, "c-kept": 120, "c-new": 30}  # the parked one is stopped

    def usage(name: str):
        if name not in use:
            raise RuntimeError(f"{name} is not running")
        return SimpleNamespace(memory_bytes=use[name] * mb)

    alloc = resources.Allocator(capacity=Resources(cores=4, memory_mb=1000),
                                reserve=Resources(cores=0, memory_mb=100),
                                headroom=Resources(cores=0, memory_mb=40))
    node = SimpleNamespace(
        store=SimpleNamespace(servers=lambda: servers),
        containers=SimpleNamespace(usage=usage), allocator=alloc,
        free=lambda: alloc.free(resources.total(
            s.limits for s in servers if s.state != "migration_pending")))
    ended: list[str] = []
    mgr = SimpleNamespace(node=node, terminate=lambda sid, **kw: ended.append(sid))
    assert control_loop.basic_memory_mb(node) == 650 - 150 - 120 - 30
    # 1000 - 350 - 600 allocated = 50 MB left, the headroom 40: nobody goes
    assert control_loop.protect_basic_service(mgr) == []
    assert ended == [] and alloc.basic.memory_mb == 350


def test_the_rounds_basic_service_figure_subtracts_every_container(
        monkeypatch, tmp_path: Path) -> None:
    """The auto-scaling round's figure of the board's own use (basic_service = measured)
    is the machine's use minus every container there is: a tenant launching or being
    terminated holds memory its limits already count as allocated."""
    from types import SimpleNamespace

    from enorm import control_loop, resources

    servers = [srv("ending", 1, 1.0, 200, state="terminating"),
               srv("kept", 5, 2.0, 200), srv("new", 5, 3.0, 200, state="launching")]
    for s in servers:
        s.container = f"c-{s.id}"
        s.latency_objective_ms, s.users, s.override, s.termination = 100.0, 0, None, None
        s.owner, s.app = "cloud-1", "game"
    use = {"c-ending": 150, "c-kept": 120, "c-new": 30}

    def usage(name: str):
        return SimpleNamespace(cpu_ns=0, memory_bytes=use[name] << 20)

    alloc = resources.Allocator(capacity=Resources(cores=4, memory_mb=1000),
                                reserve=Resources(cores=0, memory_mb=100))
    cfg = SimpleNamespace(probe="none", probe_port=7, probe_timeout_s=0.2,
                          loss_penalty_ms=800.0, probe_source="", statistic="p50",
                          basic_service="measured")
    node = SimpleNamespace(
        config=cfg, allocator=alloc, unit=Resources(cores=1, memory_mb=200),
        store=SimpleNamespace(servers=lambda: servers,
                              user_addresses=lambda ids: {i: [] for i in ids}),
        containers=SimpleNamespace(usage=usage, delta_dir=lambda name: tmp_path / name),
        firewall=SimpleNamespace(counters=lambda: {}),
        free=lambda ss=None: Amount(1.0, 100.0))
    mgr = SimpleNamespace(node=node, enforce_limits=lambda: None)
    obs = control_loop.Observer(mgr)
    monkeypatch.setattr(obs.host, "sample", lambda: (1.0, 650.0))  # 650 MB in use
    snap = obs.snapshot()
    assert alloc.basic.memory_mb == 650 - 150 - 120 - 30
    assert [s.id for s in snap.servers] == ["kept"]  # only running ones are scaled


@pytest.mark.parametrize("interval_s, admitted", [(2.0, 6), (0.0, 7)])
def test_a_unit_is_not_admitted_into_the_headroom_its_watcher_keeps(
        monkeypatch, tmp_path: Path, interval_s, admitted) -> None:
    """The 1 GB board (957 MB, the board's own use 320 MB, units of 80 MB, a headroom of
    96 MB): the node admitted units until 17 MB were free, and its watcher, at its next
    look, ended the newest one (3 of 8 servers in the run of 2026-12-07). With the watcher
    on, the headroom is held back from what is free: 6 are admitted and none is ended.
    Without it, nothing is held back."""
    from types import SimpleNamespace

    from enorm import config, control_loop, node, resources

    f = tmp_path / "node.toml"
    f.write_text(f"cores = 4.0\nmemory_mb = 957\nreserve_memory_mb = 192\n"
                 f"unit = {{ cores = 0.25, memory_mb = 80 }}\n"
                 f"pressure_interval_s = {interval_s}\npressure_headroom_mb = 96\n")
    alloc = node.allocator(config.load(f))
    alloc.basic = Resources(cores=0, memory_mb=320)
    servers: list[S] = []
    while resources.admit(unit=Resources(cores=0.25, memory_mb=80),
                          free=alloc.free(resources.total(s.limits for s in servers)),
                          priority=5, min_priority=0, ports_needed=1, ports_free=99,
                          tenants=[]).admit:
        servers.append(srv(f"s{len(servers)}", 5, float(len(servers)), 80))
        servers[-1].container = f"c-{servers[-1].id}"
    assert len(servers) == admitted
    if not interval_s:
        return
    mb = 1 << 20  # the machine: the board's 320 MB and what the servers use (10 MB each)
    monkeypatch.setattr(control_loop.psutil, "virtual_memory", lambda: SimpleNamespace(
        total=957 * mb, available=(957 - 320 - 10 * len(servers)) * mb))
    ended: list[str] = []
    n = SimpleNamespace(
        store=SimpleNamespace(servers=lambda: servers), allocator=alloc,
        containers=SimpleNamespace(usage=lambda name: SimpleNamespace(memory_bytes=10 * mb)),
        free=lambda: alloc.free(resources.total(s.limits for s in servers)))
    mgr = SimpleNamespace(node=n, terminate=lambda sid, **kw: ended.append(sid))
    assert control_loop.protect_basic_service(mgr) == [] and ended == []
    # the board's own use grows by 80 MB (61 were free): the newest of the lowest goes
    monkeypatch.setattr(control_loop.psutil, "virtual_memory", lambda: SimpleNamespace(
        total=957 * mb, available=(957 - 400 - 10 * len(servers)) * mb))
    assert control_loop.protect_basic_service(mgr) == ["s5"]
