"""The image's needs against the node's unit (policy), and reading them from a cgroup."""

from __future__ import annotations

from pathlib import Path

from enorm import sizing


def test_a_unit_below_the_needs_plus_headroom_is_refused_naming_the_field() -> None:
    needs = sizing.Needs(memory_mb=40.0, peak_mb=52.0, start_s=0.2)
    assert sizing.unit_problem(50, needs, "base") is None  # 40 * 1.25 = 50
    problem = sizing.unit_problem(49, needs, "base")
    assert problem is not None
    assert problem.startswith("unit.memory_mb: 49 MB is less than the base image base")
    assert "40 MB measured, 50 MB with 25% headroom" in problem


def test_needs_from_v1_and_v2_statistics() -> None:
    mb = 1 << 20
    v2 = {"anon": 3 * mb, "kernel": mb, "file_mapped": 2 * mb, "file": 40 * mb}
    assert sizing.from_cgroup(v2, 9 * mb, 0.1234) == sizing.Needs(6.0, 9.0, 0.123)
    v1 = {"rss": 3 * mb, "kernel": mb, "mapped_file": 2 * mb, "cache": 40 * mb}
    assert sizing.from_cgroup(v1, 50 * mb, 1.0) == sizing.Needs(6.0, 50.0, 1.0)


def test_needs_are_kept_beside_the_image_and_a_broken_file_is_measured_again(
        tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    assert sizing.load(tmp_path, "base") is None
    needs = sizing.Needs(5.0, 6.1, 0.12)
    sizing.save(tmp_path, "base", needs)
    assert sizing.load(tmp_path, "base") == needs
    assert [p.name for p in (tmp_path / "base").iterdir()] == [sizing.NEEDS_FILE]
    sizing.path(tmp_path, "base").write_text('{"memory_mb": "lots"')
    assert sizing.load(tmp_path, "base") is None
