"""The pressure watcher's policy: who goes when the basic service runs short."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from enorm.pressure import evictions, psi_some_avg10
from enorm.protocol import Resources


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
