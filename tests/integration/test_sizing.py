"""The node measures its base image once and refuses a unit the image cannot start in.

Each test has a base container of its own (`own_base`: the machine's rootfs, its own
config and `enorm-needs.json`), so that the figures it removes or makes up never reach
the other nodes on the machine."""

from __future__ import annotations

import subprocess

import lxc
import psutil
import pytest
from nodes import BASE, LXC_PATH, VENV_BIN, make_node, traces
from test_edge_node import handshake

from enorm import sizing

pytestmark = pytest.mark.system


def test_the_image_is_measured_once_with_a_probe_that_leaves_nothing(own_base, edge_node):
    machine = sizing.path(LXC_PATH, BASE)
    machine_before = machine.read_bytes() if machine.exists() else None
    lxc_path = own_base(needs=None)
    node = edge_node(lxc_path=str(lxc_path))
    needs = sizing.load(lxc_path, BASE)
    assert needs is not None
    # sshd, Redis and the init of the Debian image: a few MB held, started in seconds.
    assert 1 < needs.memory_mb <= needs.peak_mb < 256 and 0 < needs.start_s < 20
    ours = [c for c in lxc.list_containers(config_path=str(lxc_path))
            if c.startswith(f"enorm-{node.name}-")]
    assert ours == []  # the probe is gone
    guards = subprocess.run(["ebtables-save"], capture_output=True, text=True).stdout
    assert f"ENORM-{node.name.upper()}-" not in guards
    assert handshake(node).status_code == 201
    # Measured once: the next node reads the figure.
    before = sizing.path(lxc_path, BASE).stat().st_mtime_ns
    edge_node(lxc_path=str(lxc_path))
    assert sizing.path(lxc_path, BASE).stat().st_mtime_ns == before
    # The machine's figure, which every other node reads, was not touched.
    assert (machine.read_bytes() if machine.exists() else None) == machine_before


def test_a_unit_smaller_than_the_image_needs_is_refused_before_anything(own_base, tmp_path):
    # What a heavier image (a game server with its runtime) would have measured.
    lxc_path = own_base(needs=sizing.Needs(memory_mb=100.0, peak_mb=140.0, start_s=1.0))
    node = make_node(tmp_path / "small", unit={"cores": 0.25, "memory_mb": 64},
                     lxc_path=str(lxc_path))
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
    # `enorm down` needs no unit that fits: it takes down whatever is there.
    down = node.cli("down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert "Traceback" not in down.stdout + down.stderr
    assert traces(node.name, node.settings) == {}
    node.down()  # gives its number back
    # A unit that holds it starts.
    big = make_node(tmp_path / "big", unit={"cores": 0.25, "memory_mb": 128},
                    lxc_path=str(lxc_path))
    try:
        big.start()
    finally:
        big.down()
