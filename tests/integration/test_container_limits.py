"""Limits a tenant cannot exceed, tried from inside: a fork storm and a memory storm run
for real in one tenant's container (over its SSH access, as its root) while the daemon
and another tenant's container keep answering."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import lxc
import pytest
import requests
from nodes import eventually
from test_edge_node import handshake, ssh

from enorm.containers import cgroup_version, cpu_list, parse_cpu_list

pytestmark = pytest.mark.system

PIDS_MAX = 96
DISK_MB = 96
FORK_STORM = ("import os\n"
              "while True:\n"
              "    try:\n"
              "        os.fork()\n"
              "    except OSError:\n"
              "        pass\n")


def run(client, command: str, timeout: float = 60) -> tuple[int, str]:
    _, out, err = client.exec_command(command, timeout=timeout)
    code = out.channel.recv_exit_status()
    return code, out.read().decode() + err.read().decode()


def daemon_answers(node, seconds: float) -> float:
    """The slowest `GET /v1/node` over `seconds`."""
    s = node.client()
    worst = 0.0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t = time.perf_counter()
        assert s.get(node.url + "/v1/node", timeout=10).ok
        worst = max(worst, time.perf_counter() - t)
        time.sleep(0.1)
    return worst


def other_tenant_answers(node, port: int) -> bool:
    c = ssh(node, port)
    try:
        return run(c, "echo alive", timeout=20) == (0, "alive\n")
    finally:
        c.close()


def test_storms_stay_inside_the_tenants_container(edge_node):
    node = edge_node(pids_max=PIDS_MAX)
    a, b = handshake(node, "cloud-a").json(), handshake(node, "cloud-b").json()
    baseline = daemon_answers(node, 1.0)
    storm = ssh(node, a["access"]["port"])
    try:
        # Fork storm, bounded in time from outside by the container's end below.
        storm.exec_command(f"nohup python3 -c '{FORK_STORM}' >/dev/null 2>&1 &")
        time.sleep(3)
        cg = lxc.Container(a["container"])
        assert int(cg.get_cgroup_item("pids.current")) <= PIDS_MAX
        assert int(cg.get_cgroup_item("pids.max")) == PIDS_MAX
        assert daemon_answers(node, 3.0) < max(2.0, 10 * baseline)
        assert other_tenant_answers(node, b["access"]["port"])
    finally:
        storm.close()
    # The storm is stopped by the tenant's own limit, not by the host: the node ends it
    # with the container.
    r = node.client("cloud-a").delete(f"{node.url}/v1/servers/{a['server_id']}", timeout=60)
    assert r.status_code == 200, r.text

    # Memory storm in a fresh container: the kernel kills it inside its own cgroup.
    r = handshake(node, "cloud-a")
    assert r.status_code == 201, r.text
    a = r.json()
    hog = ssh(node, a["access"]["port"])
    try:
        _, out = run(hog, "python3 -c 'b = b\"x\" * (1 << 30)'; echo rc=$?", timeout=60)
        assert "rc=137" in out  # SIGKILL from the OOM killer, seen by the tenant's shell
        item = "memory.oom_control" if cgroup_version() == 1 else "memory.events"
        assert re.search(r"oom_kill [1-9]", lxc.Container(a["container"]).get_cgroup_item(item))
        assert run(hog, "echo still here") == (0, "still here\n")  # its sshd survived
    finally:
        hog.close()
    assert daemon_answers(node, 1.0) < max(2.0, 10 * baseline)
    assert other_tenant_answers(node, b["access"]["port"])
    assert requests.get(node.url + "/healthz", timeout=5).ok


@pytest.mark.parametrize("unprivileged", [True, False], ids=["unprivileged", "privileged"])
def test_a_tenant_fills_its_own_disk_not_the_boards(edge_node, unprivileged):
    """`dd` until the disk is full, as the tenant's root: ENOSPC at the node's size for
    the writable layer, the board's file system barely touched, the neighbours fine."""
    node = edge_node(disk_mb=DISK_MB, unprivileged=unprivileged)
    a, b = handshake(node, "cloud-a").json(), handshake(node, "cloud-b").json()
    image = Path(lxc.Container(a["container"]).get_config_path()) / a["container"] / "overlay.img"
    board_free = shutil.disk_usage(image.parent).free
    c = ssh(node, a["access"]["port"])
    try:
        # The tenant's df shows its own size: the overlay reports its upper file system.
        _, df = run(c, "df -m --output=size / | tail -1")
        assert DISK_MB * 0.85 < int(df) <= DISK_MB
        code, out = run(c, f"dd if=/dev/zero of=/root/fill bs=1M count={4 * DISK_MB} 2>&1")
        assert code != 0 and "No space left on device" in out
        assert run(c, "sync")[0] == 0
        assert daemon_answers(node, 1.0) < 2.0
        assert other_tenant_answers(node, b["access"]["port"])
        # What the board gave: at most the layer's size (the image is sparse).
        assert image.stat().st_blocks * 512 <= (DISK_MB + 8) << 20
        assert board_free - shutil.disk_usage(image.parent).free <= (DISK_MB + 64) << 20
        # Its own space back once it deletes what it wrote.
        assert run(c, "rm /root/fill && echo again > /root/x && cat /root/x") == (0, "again\n")
    finally:
        c.close()
    r = node.client("cloud-a").delete(f"{node.url}/v1/servers/{a['server_id']}", timeout=60)
    assert r.status_code == 200, r.text
    assert eventually(lambda: not image.exists())  # released after the answer
    assert eventually(lambda: image.parent.name not in subprocess.run(
        ["losetup", "-a"], capture_output=True, text=True).stdout)


def test_limits_changed_behind_the_nodes_back_are_restored_by_the_next_round(edge_node):
    node = edge_node()
    a = handshake(node, "cloud-a").json()
    c = lxc.Container(a["container"])
    quota = "cpu.cfs_quota_us" if cgroup_version() == 1 else "cpu.max"
    before = {k: c.get_cgroup_item(k) for k in (quota, "pids.max", "cpuset.cpus")}
    assert len(parse_cpu_list(before["cpuset.cpus"])) == 1  # the unit's one core
    every_cpu = cpu_list(sorted(os.sched_getaffinity(0)))
    # What a tenant with the cgroup hierarchy mounted writable would do.
    assert c.set_cgroup_item(quota, "-1" if cgroup_version() == 1 else "max 100000")
    assert c.set_cgroup_item("pids.max", "max")
    assert c.set_cgroup_item("cpuset.cpus", every_cpu)
    op = {"Authorization": f"Bearer {node.settings['operator_token']}"}
    r = requests.post(node.url + "/v1/autoscale", headers=op, timeout=120)
    assert r.ok, r.text
    assert {k: c.get_cgroup_item(k) for k in before} == before
    events = node.client("cloud-a").get(node.url + "/v1/events", timeout=5).json()
    restored = [e for e in events if e["type"] == "server.limits_restored"]
    assert len(restored) == 1 and restored[0]["server_id"] == a["server_id"]
    assert restored[0]["data"]["found"] == {
        quota: "-1" if cgroup_version() == 1 else "max 100000", "pids.max": "max",
        "cpuset.cpus": every_cpu}
    # A round with nothing changed restores nothing.
    assert requests.post(node.url + "/v1/autoscale", headers=op, timeout=120).ok
    events = node.client("cloud-a").get(node.url + "/v1/events", timeout=5).json()
    assert len([e for e in events if e["type"] == "server.limits_restored"]) == 1
