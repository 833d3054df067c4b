"""Unprivileged containers, tried from inside as the tenant's root: its root is an id
range of its own on the host (never another tenant's), and what a privileged root could
do to the board (device nodes, kernel settings, its own cgroup limits) is refused."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import lxc
import psutil
import pytest
from test_container_limits import run
from test_edge_node import handshake, ssh

from enorm import idmap
from enorm.config import NodeConfig

pytestmark = pytest.mark.system

LXC = Path("/var/lib/lxc")
RANGE = NodeConfig().id_range
assert RANGE is not None


def uid_map(client) -> tuple[int, int, int]:
    code, out = run(client, "cat /proc/self/uid_map")
    assert code == 0, out
    inside, host, count = map(int, out.split())
    return inside, host, count


def test_root_inside_is_an_id_range_of_its_own(edge_node):
    node = edge_node()
    a, b = handshake(node, "cloud-a").json(), handshake(node, "cloud-b").json()
    ca, cb = ssh(node, a["access"]["port"]), ssh(node, b["access"]["port"])
    try:
        ia, ha, na = uid_map(ca)
        ib, hb, nb = uid_map(cb)
        assert (ia, na) == (ib, nb) == (0, idmap.RANGE)
        for h in (ha, hb):
            assert RANGE.start <= h and h + idmap.RANGE <= RANGE.start + RANGE.count
        assert abs(ha - hb) >= idmap.RANGE  # the two ranges do not overlap

        # On the host, the container's processes run as its range, not as root.
        init = lxc.Container(a["container"]).init_pid
        uids = {p.uids().real for p in psutil.Process(init).children(recursive=True)}
        assert uids == {ha}, uids
        assert psutil.Process(init).uids().real == ha

        # A file the tenant writes belongs to its range on the host too.
        assert run(ca, "echo x > /root/mine && ls -n /root/mine")[0] == 0
        delta = f"/var/lib/lxc/{a['container']}/overlay/delta/root/mine"
        assert os.stat(delta).st_uid == ha

        # What a privileged root could do to the board is refused.
        code, out = run(ca, "mknod /tmp/disk b 8 0; echo rc=$?")
        assert "rc=0" not in out and "Operation not permitted" in out, out
        code, out = run(ca, "echo 1 > /proc/sys/kernel/sysrq; echo rc=$?")
        assert "rc=0" not in out, out
        code, out = run(ca, "echo 1 > /proc/sysrq-trigger; echo rc=$?")
        assert "rc=0" not in out, out
        # Its own cgroup: mountable in its cgroup namespace, but the limits stay read-only.
        memory = lxc.Container(a["container"]).get_cgroup_item("memory.limit_in_bytes")
        code, out = run(ca, "mkdir -p /mnt/cg && mount -t cgroup -o memory none /mnt/cg "
                            "2>/dev/null || mount -t cgroup2 none /mnt/cg; "
                            "for f in memory.limit_in_bytes memory.max; do "
                            "[ -e /mnt/cg/$f ] && echo 999999999999 > /mnt/cg/$f; done; "
                            "echo done")
        assert "done" in out
        assert lxc.Container(a["container"]).get_cgroup_item("memory.limit_in_bytes") == memory
        # The base image is shared read-only: the tenant's write lands in its own layer.
        assert run(ca, "echo owned > /usr/bin/tenant-was-here")[0] == 0
        assert not os.path.exists("/var/lib/lxc/enorm-base-debian/rootfs/usr/bin/tenant-was-here")
        assert run(cb, "test -e /usr/bin/tenant-was-here")[0] != 0
    finally:
        ca.close()
        cb.close()

    # Terminated: its id range and its mounts go with it.
    r = node.client("cloud-a").delete(f"{node.url}/v1/servers/{a['server_id']}", timeout=60)
    assert r.status_code == 200, r.text
    node.released()  # what the termination undoes after its answer
    assert not idmap.mounted(idmap.MOUNTS / a["container"])
    claims = {p.read_text() for p in (LXC / ".enorm-idmap").iterdir()
              if p.name.isdigit()}
    assert a["container"] not in claims and b["container"] in claims


def test_a_restarted_board_mounts_the_rootfs_again(edge_node):
    """Mounts do not outlive a stop or a reboot: the node's restart brings the container
    back."""
    node = edge_node()
    a = handshake(node, "cloud-a").json()
    c = ssh(node, a["access"]["port"])
    try:
        assert run(c, "echo kept > /root/marker && sync") == (0, "")
        # the tenant's server, started as the deployer starts it (enorm-app)
        assert run(c, "mkdir -p /opt/enorm-app && printf '#!/bin/sh\\nexec sleep 7777\\n' "
                      "> /opt/enorm-app/run.sh && chmod 755 /opt/enorm-app/run.sh && "
                      "enorm-app start -- /opt/enorm-app/run.sh")[0] == 0
        assert run(c, "sleep 0.5; pgrep -fx 'sleep 7777'")[0] == 0
    finally:
        c.close()
    node.kill()
    name = a["container"]
    subprocess.run(["lxc-stop", "-k", "-n", name], check=True)
    mounts = [LXC / name / "rootfs", idmap.MOUNTS / name, LXC / name / "overlay"]
    # However it stopped, LXC's post-stop hook took the mounts away: a stopped
    # container is plain files (what a reboot leaves too).
    assert not any(idmap.mounted(m) for m in mounts)
    node.start()
    c = ssh(node, a["access"]["port"])
    try:
        assert uid_map(c)[1] >= RANGE.start
        assert run(c, "cat /root/marker") == (0, "kept\n")  # the sized layer came back
        # ... and the tenant's server with it (found on a board rebooted by the lab)
        assert run(c, "for i in $(seq 50); do pgrep -fx 'sleep 7777' && exit 0; "
                      "sleep 0.1; done; exit 1")[0] == 0
    finally:
        c.close()
    assert all(idmap.mounted(m) for m in mounts)


def test_the_request_log_is_read_as_the_tenants_not_the_hosts(edge_node):
    """The node reads each server's request log from the container's writable layer: a
    tenant that makes it a link to a host file, /dev/zero or a FIFO gets it refused, and
    the round neither blocks nor reads the host's file."""
    import time

    import requests

    node = edge_node(autoscale_interval_s=3600)
    op = {"Authorization": f"Bearer {node.settings['operator_token']}"}
    secret = Path(node.settings["state_dir"]).parent / "host-only.log"
    secret.write_text("".join(f"{time.time():.3f} /stolen 5\n" for _ in range(50)))
    a = handshake(node, "cloud-a").json()
    c = ssh(node, a["access"]["port"])
    try:
        for trap in (f"ln -s {secret} $L", "ln -s /dev/zero $L", "mkfifo $L",
                     f"ln -s {secret.parent} /var/log/enorm-app/d && ln -s d/{secret.name} $L"):
            code, out = run(c, "L=/var/log/enorm-app/requests.log; mkdir -p /var/log/enorm-app;"
                               f" rm -rf $L /var/log/enorm-app/d; {trap}; echo ok")
            assert "ok" in out, out
            t = time.perf_counter()
            r = requests.post(node.url + "/v1/autoscale", headers=op, timeout=60)
            took = time.perf_counter() - t
            assert r.status_code == 200, r.text
            seen = [s for s in r.json()["servers"] if s["id"] == a["server_id"]]
            assert seen and seen[0]["computing_ms"] is None, (trap, seen)
            assert took < 10, (trap, took)
        # The control: a plain log is read.
        run(c, "L=/var/log/enorm-app/requests.log; rm -rf $L /var/log/enorm-app/d; "
               "echo \"$(date +%s) /play 7\" > $L")
        r = requests.post(node.url + "/v1/autoscale", headers=op, timeout=60)
        seen = [s for s in r.json()["servers"] if s["id"] == a["server_id"]]
        assert seen[0]["computing_ms"] == 7.0, seen
    finally:
        c.close()


def test_a_container_sees_its_own_size_and_follows_a_resize(edge_node):
    """lxcfs and the cpuset: what a server sizes its pools from (memory, CPUs, `nproc`,
    the affinity mask) is its unit, not the board, and follows the node's scaling."""
    import requests

    node = edge_node(cores=2.0, unit={"cores": 0.25, "memory_mb": 64})
    a = handshake(node, "cloud-a").json()
    c = ssh(node, a["access"]["port"])
    view = ("head -1 /proc/meminfo; grep -c ^processor /proc/cpuinfo; "
            "cat /sys/devices/system/cpu/online; python3 -c 'import os; print(os.cpu_count())'; "
            "nproc; python3 -c 'import os; print(len(os.sched_getaffinity(0)))'")
    try:
        code, out = run(c, view)
        assert code == 0, out
        mem, cpus, online, count, nproc, affinity = out.split("\n")[:6]
        assert mem.split()[1] == str(64 * 1024), out  # kB
        assert (cpus, online, count) == ("1", "0", "1"), out
        assert (nproc, affinity) == ("1", "1"), out
        op = {"Authorization": f"Bearer {node.settings['operator_token']}"}
        r = requests.put(f"{node.url}/v1/servers/{a['server_id']}/limits", headers=op,
                         json={"cores": 2.0, "memory_mb": 128}, timeout=30)
        assert r.status_code == 200, r.text
        code, out = run(c, view)
        mem, cpus, online, count, nproc, affinity = out.split("\n")[:6]
        assert mem.split()[1] == str(128 * 1024), out
        assert (cpus, online, count) == ("2", "0-1", "2"), out
        assert (nproc, affinity) == ("2", "2"), out
    finally:
        c.close()
