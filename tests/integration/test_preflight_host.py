"""Preflight on this machine, and a node that refuses to start on a board without the
memory controller (the Raspberry Pi OS fixture stands in for the board's /proc and /sys)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from nodes import VENV_BIN, make_node

pytestmark = pytest.mark.system

RPI = Path(__file__).resolve().parent.parent / "fixtures" / "preflight" / "rpi-nomem"


def test_doctor_passes_here_and_probes_the_kernel() -> None:
    r = subprocess.run([str(VENV_BIN / "enorm"), "doctor", "--json"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    found = {f["check"]: f for f in json.loads(r.stdout)}
    assert all(f["ok"] for f in found.values())
    write = [f for c, f in found.items() if c.startswith("write ")]
    assert len(write) == 2 and all("read" in f["detail"] for f in write)
    assert not list(Path("/sys/fs/cgroup").glob("*/enorm-preflight-*"))  # scratch removed
    # Unprivileged containers (the default): the range is registered, and an idmapped
    # mount made here shows root's directory as the range's first id.
    assert "root:1200000000:16777216" in found["id range"]["detail"]
    assert found["idmapped mounts"]["detail"] == "root's directory seen as uid 1200000000"
    assert found["lxcfs"]["detail"] == "serving /var/lib/lxcfs"
    assert found["disk quota"]["detail"] == "an 8 MB layer refused 16 MB"
    table = subprocess.run([str(VENV_BIN / "enorm"), "doctor"], capture_output=True,
                           text=True, timeout=60)
    assert table.returncode == 0 and table.stdout.startswith("check\tok\tdetail\tfix\n")


def test_serve_refuses_a_board_without_the_memory_controller(tmp_path: Path) -> None:
    node = make_node(tmp_path / "rpi")
    env = {**os.environ, "ENORM_PREFLIGHT_ROOT": str(RPI)}
    r = subprocess.run([str(VENV_BIN / "enorm"), "serve", "-c", str(node.config_path)],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2  # not restarted by systemd (RestartPreventExitStatus=2)
    assert "cgroup memory: disabled by the kernel command line" in r.stderr
    assert "cgroup_enable=memory cgroup_memory=1" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    # It refused before touching anything: no bridge, no state.
    assert subprocess.run(["ip", "link", "show", node.settings["bridge"]],
                          capture_output=True).returncode != 0
    doctor = subprocess.run([str(VENV_BIN / "enorm"), "doctor"], capture_output=True,
                            text=True, timeout=60, env=env)
    assert doctor.returncode == 1 and "NO" in doctor.stdout.split("cgroup memory")[1][:20]
