"""An edge server of a Raspberry Pi 4's architecture (arm64) on this amd64 machine: a real
node with `image = "debian-arm64"` admits it, the cloud manager deploys the game's edge
server into it over SSH, the users play on it, an auto-scaling round gives it a unit more
and the termination merges its data back. Every arm64 binary in the container (init,
sshd, Redis, python3) runs under qemu-user through binfmt_misc (`make test` runs
`scripts/setup.sh --foreign arm64`), so each stage is timed and printed.

The image is built only here, once per machine (`enorm image build debian --arch arm64`,
a debootstrap under emulation: 2.3 minutes on an idle machine, 7 on a loaded one; then
cached under /var/cache/enorm, a second build takes about a second), so that `make demo`
on a fresh machine does not pay for it.

`ENORM_FOREIGN_ARCH=armhf` runs the same tests for 32-bit Raspberry Pi OS boards (armhf,
through qemu-arm). Not in `make test`: a cold armhf build took 29 minutes on this loaded
machine.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lxc
import pytest
import requests
from nodes import VENV_BIN, destroyed
from test_cycle import assert_merged, edge_values_before_end, offloaded_play
from test_nearby import nearby_cycle
from world import LONDON, as_users, cloud_world, make_users, play, shared, snapshot

from enorm import images
from enorm.containers import cgroup_version

pytestmark = [pytest.mark.system, pytest.mark.timeout(900)]

ARCH = os.environ.get("ENORM_FOREIGN_ARCH", "arm64")
IMAGE = f"debian-{ARCH}"
LXC_PATH = Path("/var/lib/lxc")
# The ELF machine of its binaries, and what `uname -m` says inside (qemu-user's).
MACHINE = {"arm64": (0xB7, "aarch64"), "armhf": (0x28, "armv7l")}[ARCH]
# Emulated, everything starts slower: python3 alone takes about 1 s, the game's edge server
# (Flask, redis-py) several; sshd's first start makes a host key. So the timeouts that
# wait for the container to come up are raised for this node only: `launch_timeout_s`
# (sshd up, 20 s by default), the node's start (it measures its image once with a probe
# container) and the cloud manager's wait for the app (30 s by default).
LAUNCH_TIMEOUT_S = 180.0
NODE_START_S = 300.0
READY_TIMEOUT_S = 180.0
# The unit holds the emulator's own memory (qemu-user's translated code) beside each
# process's: the image's sshd and Redis measured 42 MB emulated against 5 MB native, and
# the node refuses a unit below that plus 25%; the game's server comes on top.
UNIT = {"cores": 1.0, "memory_mb": 384}


@pytest.fixture(scope="session")
def foreign_image() -> str:
    """Build (or reuse, in seconds) the base container, as an operator would."""
    t0 = time.monotonic()
    r = subprocess.run([str(VENV_BIN / "enorm"), "image", "build", "debian", "--arch", ARCH],
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout + r.stderr[-4000:]
    built = r.stdout.split()[0]
    print(f"\n{ARCH} image {built}: {time.monotonic() - t0:.1f} s "
          f"({'cached' if 'reusing' in r.stderr else 'built'})")
    return built


def elf_machine(path: Path) -> int:
    """e_machine of an ELF file (offset 18, little-endian)."""
    with path.open("rb") as f:
        head = f.read(20)
    assert head[:4] == b"\x7fELF", path
    return int.from_bytes(head[18:20], "little")


def limits(box: lxc.Container) -> tuple[int, int]:
    """(CPU quota per 100 ms period in us, memory limit in bytes) as the kernel has them."""
    if cgroup_version() == 1:
        return (int(box.get_cgroup_item("cpu.cfs_quota_us")),
                int(box.get_cgroup_item("memory.limit_in_bytes")))
    return int(box.get_cgroup_item("cpu.max").split()[0]), int(box.get_cgroup_item("memory.max"))


class Stages:
    """Each stage's wall time, printed at the end (also when the test fails)."""

    def __init__(self) -> None:
        self.times: list[tuple[str, float]] = []

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.times.append((name, time.monotonic() - t0))

    def print(self) -> None:
        print(f"\n{ARCH} cycle under qemu-user:")
        for name, s in self.times:
            print(f"  {name:<44} {s:7.2f} s")


def test_an_arm64_server_plays_scales_and_merges_back(edge_node, redis_server, foreign_image):
    assert foreign_image == images.resolve(IMAGE).container == f"enorm-base-debian-{ARCH}"
    rootfs = LXC_PATH / foreign_image / "rootfs"
    assert elf_machine(rootfs / "usr/bin/python3") == MACHINE[0]
    assert f"lxc.arch = {ARCH}" in (LXC_PATH / foreign_image / "config").read_text()
    stage = Stages()
    try:
        run_cycle(stage, edge_node, redis_server)
    finally:
        stage.print()


def run_cycle(stage: Stages, edge_node, redis_server) -> None:
    with stage("node up (measures a new image once)"):
        node = edge_node(start=False, image=IMAGE, unit=UNIT, launch_timeout_s=LAUNCH_TIMEOUT_S,
                         autoscale_interval_s=3600)
        node.start(timeout=NODE_START_S)
    op = requests.Session()
    op.headers["Authorization"] = f"Bearer {node.settings['operator_token']}"
    with cloud_world(redis_server().url, [node]) as cloud:
        cloud.manager.ready_timeout = READY_TIMEOUT_S
        # Every request of the emulated server takes longer than 1 ms: the round must add
        # a unit for the latency (P5.7), as on a board too slow for its objective.
        cloud.manager.latency_objective_ms = 1.0
        clients = make_users(cloud, 20)
        for c in clients:
            play(c, LONDON, catches=1)
        offload = clients[:10]
        cloud_before, cloud_before_shared = snapshot(cloud.redis, None), shared(cloud.redis)

        with stage("offload (handshake, SSH deploy, data, ready)"):
            dep = cloud.manager.offload(as_users(offload))
        # the cloud manager's own split: handshake = container up and sshd answering
        stage.times += [(f"  {part}", dep.timings[part])
                        for part in ("handshake", "ssh", "upload_start", "data", "ready")]
        assert dep.copy.verified and dep.copy.keys >= len(offload)
        # the tenant's server runs arm64 code: the kernel and python3 say so inside, and
        # the image brings the game's libraries and a production WSGI server
        _, out, _ = dep.session.run(
            "uname -m; python3 -c 'import platform, flask, redis, waitress; "
            "print(platform.machine())'", timeout=120)
        assert out.split() == [MACHINE[1], MACHINE[1]]

        with stage("play (10 users on the edge)"):
            offloaded_play(cloud, dep, offload)

        with stage("auto-scaling round (+1 unit)"):
            r = op.post(f"{node.url}/v1/autoscale", timeout=300)
        assert r.status_code == 200 and r.json()["error"] is None, r.text
        acts = [a for a in r.json()["plan"] if a["server_id"] == dep.server_id]
        assert [(a["action"], a["reason"]) for a in acts] == [
            ("ScaleUp", "latency_above_objective")], acts
        box = lxc.Container(dep.setup.container, str(LXC_PATH))
        assert limits(box) == (2 * 100_000, 2 * UNIT["memory_mb"] << 20)  # two units
        for c in offload[:3]:  # still serving, with its new limits
            play(c, LONDON, catches=1)
            assert c.server == dep.url

        edge_users, edge_shared = edge_values_before_end(dep)
        with stage("terminate + merge back"):
            cloud.manager.withdraw(dep)
        assert dep.state == "withdrawn" and dep.confirmed
        assert dep.keys_migrated >= len(edge_users)
        assert_merged(cloud, edge_users, edge_shared, cloud_before_shared, cloud_before)
        assert destroyed(box.name)
        assert op.get(f"{node.url}/v1/servers", timeout=5).json() == []


def test_nearby_on_arm64_plays_every_type_and_merges_back(edge_node, redis_server,
                                                          foreign_image):
    """The second app, whose edge server is waitress and writes no request log, through
    its whole cycle (tests/e2e/test_nearby.py) in an arm64 container."""
    node = edge_node(start=False, image=IMAGE, unit=UNIT, launch_timeout_s=LAUNCH_TIMEOUT_S,
                     autoscale_interval_s=3600)
    node.start(timeout=NODE_START_S)

    def emulated(dep) -> None:
        _, out, _ = dep.session.run("uname -m; cat /proc/$(cat /run/enorm-app.starts)/cmdline",
                                    timeout=60)
        machine, cmdline = out.split("\n", 1)
        assert machine == MACHINE[1] and "games.nearby.edge" in cmdline

    t0 = time.monotonic()
    nearby_cycle(node, redis_server().url, ready_timeout=READY_TIMEOUT_S, on_edge=emulated)
    print(f"\nnearby on {ARCH} under qemu-user: {time.monotonic() - t0:.1f} s")
