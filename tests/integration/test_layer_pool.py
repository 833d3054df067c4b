"""Writable layers made ahead of the handshakes (`enorm.disk.LayerPool`), on real loop
devices and ext4: a handshake takes a ready one (sized, mounted, its own image), a burst
beyond the pool makes its own on the handshake's path, the pool refills off it, and what
it holds is removed by the next start after a kill and by `enorm down`."""

from __future__ import annotations

import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from nodes import LXC_PATH, eventually, traces
from test_edge_node import handshake

pytestmark = pytest.mark.system
DISK_MB = 64


def metric(node, name: str) -> float:
    op = {"Authorization": f"Bearer {node.settings['operator_token']}"}
    text = requests.get(node.url + "/metrics", headers=op, timeout=10).text
    return float(re.search(rf"^{re.escape(name)} (\S+)$", text, re.M).group(1))


def pool_layers(node) -> set[str]:
    """The pool's layers as the mount table shows them (made and mounted)."""
    top = f"{LXC_PATH}/enorm-{node.name}-layer-pool/"
    with open("/proc/self/mountinfo") as f:
        return {p.split("/")[-2] for ln in f if (p := ln.split()[4]).startswith(top)}


def test_handshakes_take_layers_made_ahead_and_a_burst_makes_its_own(edge_node):
    node = edge_node(disk_mb=DISK_MB, layer_pool=2)
    assert eventually(lambda: metric(node, "enorm_layer_pool_ready") == 2, 30)
    before = {r: metric(node, f'enorm_layer_pool_takes_total{{result="{r}"}}')
              for r in ("hit", "miss")}
    ahead = pool_layers(node)
    assert len(ahead) == 2

    # A burst of four at once: two take what is ready, the others make their own
    # (or take one the refill made meanwhile).
    with ThreadPoolExecutor(4) as ex:
        answers = list(ex.map(lambda _: handshake(node), range(4)))
    assert [r.status_code for r in answers] == [201] * 4, [r.text for r in answers]
    hits = metric(node, 'enorm_layer_pool_takes_total{result="hit"}') - before["hit"]
    misses = metric(node, 'enorm_layer_pool_takes_total{result="miss"}') - before["miss"]
    assert hits >= 2 and hits + misses == 4, (hits, misses)
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    for body in (r.json() for r in answers):
        image = Path(LXC_PATH) / body["container"] / "overlay.img"
        assert image.stat().st_size == DISK_MB << 20  # its own, of the node's size
        assert f"{image})" in loops  # bound to a loop device under the container's name
        out = subprocess.run(["findmnt", "-n", "-o", "SOURCE,SIZE",
                              str(image.parent / "overlay")],
                             capture_output=True, text=True, check=True).stdout
        assert out.startswith("/dev/loop"), out
    assert not ahead & pool_layers(node)  # the two taken left the pool
    assert eventually(lambda: metric(node, "enorm_layer_pool_ready") == 2, 30)  # refilled

    # A kill leaves the pool mounted; the next start removes it and makes it afresh.
    left = pool_layers(node)
    node.kill()
    assert left and left <= pool_layers(node)
    node.start()
    assert eventually(lambda: len(pool_layers(node)) == 2, 30)
    assert not left & pool_layers(node)
    assert handshake(node).status_code == 201
    # `enorm down` (the fixture's, which checks with `traces`) removes the rest.
    assert any("layer-pool" in x for v in traces(node.name, node.settings).values() for x in v)
