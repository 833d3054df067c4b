"""The node measures its base image once and refuses a unit the image cannot start in."""

from __future__ import annotations

import subprocess
from pathlib import Path

import lxc
import psutil
import pytest
from nodes import VENV_BIN, make_node
from test_edge_node import handshake

from enorm import sizing

pytestmark = pytest.mark.system

LXC = Path("/var/lib/lxc")
BASE = "enorm-base-debian"


@pytest.fixture
def needs_file():
    """The machine's measured figure, put back after the test."""
    p = sizing.path(LXC, BASE)
    saved = p.read_bytes() if p.exists() else None
    yield p
    if saved is None:
        p.unlink(missing_ok=True)
    else:
        p.write_bytes(saved)


def test_the_image_is_measured_once_with_a_probe_that_leaves_nothing(edge_node, needs_file):
    needs_file.unlink(missing_ok=True)
    node = edge_node()
    needs = sizing.load(LXC, BASE)
    assert needs is not None
    # sshd, Redis and the init of the Debian image: a few MB held, started in seconds.
    assert 1 < needs.memory_mb <= needs.peak_mb < 256 and 0 < needs.start_s < 20
    ours = [c for c in lxc.list_containers() if c.startswith(f"enorm-{node.name}-")]
    assert ours == []  # the probe is gone
    guards = subprocess.run(["ebtables-save"], capture_output=True, text=True).stdout
    assert f"ENORM-{node.name.upper()}-" not in guards
    assert handshake(node).status_code == 201
    # Measured once: the next node reads the figure.
    before = needs_file.stat().st_mtime_ns
    edge_node()
    assert needs_file.stat().st_mtime_ns == before


def test_a_unit_smaller_than_the_image_needs_is_refused_before_anything(tmp_path, needs_file):
    # What a heavier image (a game server with its runtime) would have measured.
    sizing.save(LXC, BASE, sizing.Needs(memory_mb=100.0, peak_mb=140.0, start_s=1.0))
    node = make_node(tmp_path / "small", unit={"cores": 0.25, "memory_mb": 64})
    r = subprocess.run([str(VENV_BIN / "enorm"), "serve", "-c", str(node.config_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "unit.memory_mb: 64 MB is less than the base image enorm-base-debian" in r.stderr
    assert "100 MB measured, 125 MB with 25% headroom" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    # Refused before anything was touched: no bridge, no store Redis.
    assert subprocess.run(["ip", "link", "show", node.settings["bridge"]],
                          capture_output=True).returncode != 0
    assert not [p for p in psutil.process_iter(["cmdline"])
                if str(node.dir) in " ".join(p.info["cmdline"] or [])]
    # A unit that holds it starts.
    big = make_node(tmp_path / "big", unit={"cores": 0.25, "memory_mb": 128})
    try:
        big.start()
    finally:
        big.down()
