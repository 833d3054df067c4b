"""What a crash leaves behind is found and removed: by the next start (reconciliation)
and by `enorm down`, whatever state each piece is in; and after a kill at any step of a
launch or a termination, `enorm down` leaves nothing of the node's on the machine (its
containers, their directories, mounts, loop devices and id claims, its chains, bridge
guards, bridge and store), checked by `nodes.traces`, which does not use the node's code."""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import threading
from pathlib import Path

import lxc
import pytest
import redis
import requests
from nodes import BASE, EdgeNode, traces
from test_datasync import fill_users
from test_edge_node import handshake

from enorm import config, datasync, disk, faults, idmap
from enorm.containers import Containers
from enorm.protocol import Resources
from games.pokemon import keys

pytestmark = pytest.mark.system
OF_CONTAINERS = {"directories", "mounts", "idmap_points", "loop_devices", "id_claims"}


def _parts(node: EdgeNode) -> tuple[config.NodeConfig, Containers]:
    cfg = config.load(node.config_path)
    return cfg, Containers(cfg.lxc_path, cfg.container_prefix, cfg.base_container,
                           ids=cfg.id_range, disk_mb=cfg.disk_mb)


def leave_partial_states(node: EdgeNode) -> dict[str, str]:
    """Leave, beside the node, one container name in each state a crash can leave;
    returns name -> the state."""
    cfg, containers = _parts(node)
    lxc_path = Path(cfg.lxc_path)
    name = {s: f"{cfg.container_prefix}{secrets.token_hex(4)}" for s in (
        "hook only", "orphan running", "idmapped base without directory",
        "loop device of a deleted image", "id claim only", "mounted layer without config")}

    # The case: LXC removed the config, a kill came before the directory.
    d = lxc_path / name["hook only"]
    d.mkdir()
    (d / "enorm-unmount").write_text(idmap.unmount_hook(d / "rootfs"))

    # A container no record owns, running, with its layer, idmapped base and overlay
    # mounted and an id range claimed.
    containers.create(name["orphan running"], address=str(cfg.subnet[250]),
                      prefixlen=cfg.subnet.prefixlen, gateway=str(cfg.gateway),
                      bridge=cfg.bridge, limits=Resources(cores=0.25, memory_mb=64),
                      authorized_key="", redis_password="x")
    containers.start(name["orphan running"])

    # The idmapped base of a container whose directory is gone.
    with idmap.user_namespace(cfg.id_range.host_base(cfg.id_range.slots - 1)) as ns:
        idmap.idmapped_bind(lxc_path / BASE / "rootfs",
                            idmap.MOUNTS / name["idmapped base without directory"], ns)

    # A loop device whose image (and directory) was deleted while it was attached.
    d = lxc_path / name["loop device of a deleted image"]
    d.mkdir()
    disk.make_image(d / "overlay.img", 16)
    subprocess.run(["losetup", "-f", d / "overlay.img"], check=True)
    subprocess.run(["rm", "-rf", d], check=True)

    # An id claim with no container.
    containers.slots.claim(name["id claim only"], alive=lambda _: True)

    # A writable layer mounted in a directory without a config.
    d = lxc_path / name["mounted layer without config"]
    d.mkdir()
    disk.make_image(d / "overlay.img", 16)
    disk.mount_image(d / "overlay.img", d / "overlay")
    (d / "overlay" / "delta").mkdir()

    found = traces(node.name, node.settings)
    for n in name.values():  # each is there, as the states say
        assert any(n in x for k in OF_CONTAINERS for x in found.get(k, [])), (n, found)
    assert lxc.Container(name["orphan running"], str(lxc_path)).running
    return {n: s for s, n in name.items()}


def reconciled(node: EdgeNode) -> dict:
    """The reconciliation report of the node's last start, from its log."""
    log = (node.dir / "daemon.log").read_text()
    return json.loads(re.findall(r"reconciled (\{.*\})", log)[-1])


def test_the_next_start_and_down_remove_every_partial_state(edge_node):
    node = edge_node()
    states = leave_partial_states(node)
    node.kill()
    node.start()
    report = reconciled(node)
    assert sorted(report["orphans"]) == sorted(states), report
    assert report["errors"] == {}
    left = {k: x for k, v in traces(node.name, node.settings).items() if k in OF_CONTAINERS
            if (x := [i for i in v if "layer-pool" not in i])}  # the node's own, made ahead
    assert left == {}, left
    assert handshake(node).status_code == 201  # the node works on

    states = leave_partial_states(node)
    node.stop()
    down = node.cli("down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert f"removed what was left of {len(states)} containers" in down.stdout
    assert traces(node.name, node.settings) == {}


# Each step of a launch and of a termination that a kill can cut (enorm.faults).
LAUNCH = ["create.cloned", "create.claimed", "create.mounted"]
TERMINATION = ["terminate.started", "terminate.merged", "terminate.stopped",
               "terminate.forgotten"]
# ... and of its release, after the answer (enorm.release).
RELEASE = ["destroy.stopped", "destroy.unmounted", "destroy.deleted", "terminate.released"]


@pytest.mark.parametrize("point", LAUNCH + TERMINATION + RELEASE)
def test_down_after_a_kill_at_any_step_leaves_nothing(edge_node, redis_server, monkeypatch,
                                                      point):
    sink = redis_server()
    cloud = datasync.connect(sink.url)
    fill_users(cloud, ["u1"])
    node = edge_node(start=False)
    monkeypatch.setenv("ENORM_FAULT", point)
    node.start()
    monkeypatch.delenv("ENORM_FAULT")
    op = {"Authorization": f"Bearer {node.settings['operator_token']}"}
    if point in LAUNCH:
        with pytest.raises(requests.RequestException):
            handshake(node, data_sink={"url": sink.url})
    else:
        body = handshake(node, users=[{"id": "u1", "address": "10.90.0.2"}],
                         data_sink={"url": sink.url}).json()
        edge = redis.Redis(host=body["address"], port=6379, password=body["redis_password"])
        datasync.copy_users(cloud, edge, ["u1"], manifest=datasync.manifest_key(body["server_id"]))
        edge.hset(keys.user("u1"), "xp", 777)
        try:  # answered before a release's step, unanswered before the others
            r = requests.delete(f"{node.url}/v1/servers/{body['server_id']}", headers=op,
                                timeout=60)
            assert point in RELEASE and r.status_code == 200, (point, r.status_code)
        except requests.RequestException:
            pass
    assert node.proc is not None and node.proc.wait(30) == faults.EXIT_CODE  # at `point`
    assert traces(node.name, node.settings)  # something to take down
    down = node.cli("down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert traces(node.name, node.settings) == {}
    if point not in LAUNCH:  # the data came home, whichever step the kill cut
        assert cloud.hget(keys.user("u1"), "xp") == b"777"


def test_a_loop_device_that_clears_itself_is_waited_for_not_detached(tmp_path, monkeypatch):
    """A writable layer's loop device (`mount -o loop`: autoclear) goes at its last
    unmount, a moment later: detaching it raced with the kernel (the soak: freed, bound
    by another container's mount, `losetup -d` failed with ENXIO and the termination
    with it). It is waited for; one bound without autoclear is detached."""
    top = tmp_path / "enorm-tloop-c1"
    top.mkdir()
    for f in ("a.img", "b.img"):
        disk.make_image(top / f, 16)
    disk.mount_image(top / "a.img", top / "a")
    subprocess.run(["losetup", "-f", top / "b.img"], check=True)
    bound = {b.name: d for d, b in disk.loop_devices().items() if b.parent == top}
    detached: list[str] = []
    real_run = subprocess.run
    monkeypatch.setattr(disk.subprocess, "run",
                        lambda cmd, **kw: detached.append(cmd[-1]) or real_run(cmd, **kw))
    try:
        assert disk.release_loops(str(top), wait_s=0.2) == [bound["a.img"]]  # mounted
        threading.Timer(0.3, idmap.unmount, [top / "a"]).start()
        assert disk.release_loops(str(top), wait_s=10) == []
        assert bound["a.img"] not in detached and bound["b.img"] in detached
    finally:
        idmap.unmount(top / "a")
        disk.release_loops(str(top), wait_s=2)


def test_a_failed_removal_is_retried_and_frees_the_unit_without_a_restart(
        edge_node, redis_server, monkeypatch):
    """A termination whose container removal raises (here three times, `ENORM_FAIL`, as a
    refused unmount would) still answers 200 once the data is merged and the container
    killed: the removal is the release's, after the answer. The release keeps the
    server's address and ports held while the worker retries it (0.5, 1, 2 s), and the
    first try that succeeds frees them and leaves no trace, in the same process."""
    sink = redis_server()
    cloud = datasync.connect(sink.url)
    fill_users(cloud, ["u1"])
    node = edge_node(start=False)
    monkeypatch.setenv("ENORM_FAIL", "destroy.unmounted*3")  # then waits 0.5 + 1 + 2 s
    node.start()
    monkeypatch.delenv("ENORM_FAIL")
    pid = node.proc.pid
    op = node.client("cloud-a")
    admin = {"Authorization": f"Bearer {node.settings['operator_token']}"}

    def metric(name: str) -> float:
        text = op.get(f"{node.url}/metrics", headers=admin, timeout=10).text
        return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))

    free = op.get(f"{node.url}/v1/node", timeout=10).json()["ports_free"]
    body = handshake(node, users=[{"id": "u1", "address": "10.90.0.2"}],
                     data_sink={"url": sink.url}).json()
    sid, container = body["server_id"], f"enorm-{node.name}-{body['server_id']}"
    edge = redis.Redis(host=body["address"], port=6379, password=body["redis_password"])
    datasync.copy_users(cloud, edge, ["u1"], manifest=datasync.manifest_key(sid))
    edge.hset(keys.user("u1"), "xp", 778)

    r = op.delete(f"{node.url}/v1/servers/{sid}", timeout=60)
    assert r.status_code == 200 and r.json()["terminated"] == [sid], r.text
    assert r.json()["keys_migrated"] >= 1 and cloud.hget(keys.user("u1"), "xp") == b"778"
    assert op.get(f"{node.url}/v1/servers/{sid}", timeout=10).status_code == 404
    offer = op.get(f"{node.url}/v1/node", timeout=10).json()
    assert offer["allocated"]["cores"] == 0  # killed: its CPU and memory are free
    # The release fails and is retried: until then its address and ports stay held.
    assert metric("enorm_releases_pending") == 1 and offer["ports_free"] < free, offer

    node.released(timeout=60)
    assert op.get(f"{node.url}/v1/node", timeout=10).json()["ports_free"] == free
    assert metric("enorm_release_retries_total") == 3
    left = traces(node.name, node.settings)
    assert not any(container in x for k in OF_CONTAINERS for x in left.get(k, [])), left
    ends = [e for e in op.get(f"{node.url}/v1/events", params={"server": sid},
                              timeout=10).json() if e["type"] == "server.terminated"]
    assert len(ends) == 1, ends
    assert node.proc.pid == pid and node.proc.poll() is None  # no restart
    assert handshake(node).status_code == 201  # the node works on
