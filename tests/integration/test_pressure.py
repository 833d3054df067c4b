"""Fast protection of the basic service on a real node: a memory load on the host grows
past the tenants' share and the watcher evicts the lowest-priority tenant within seconds,
long before the (hour-long) auto-scaling round."""

from __future__ import annotations

import subprocess
import sys
import time

import lxc
import psutil
import pytest
from test_edge_node import handshake

pytestmark = pytest.mark.system

UNIT_MB = 300
HOG = r"""
import mmap, sys
blocks = []
for line in sys.stdin:
    while len(blocks) < int(line):
        m = mmap.mmap(-1, 1 << 20)
        m.write(b"\x01" * (1 << 20))
        blocks.append(m)
    print(len(blocks), flush=True)
"""



def defined(name: str) -> bool:
    """Whether the container exists; one being destroyed right now (its config half
    gone, which liblxc reports as an error) counts as gone."""
    try:
        return lxc.Container(name).defined
    except RuntimeError:
        return False

def test_memory_pressure_evicts_the_lowest_priority_tenant_within_seconds(edge_node):
    vm = psutil.virtual_memory()
    used_mb = (vm.total - vm.available) >> 20
    # Room for the basic service as it is now plus 1,200 MB: two tenants of 300 MB leave
    # 600 MB. The load below grows by 50 MB every 0.25 s until the node evicts: a fixed
    # load was not enough, because this VM's "used" figure hides up to ~450 MB of a new
    # allocation for a while after other runs (seen in the node's own measurements).
    node = edge_node(basic_service="measured", memory_mb=used_mb + 1200,
                     unit={"cores": 0.25, "memory_mb": UNIT_MB}, autoscale_interval_s=3600,
                     pressure_interval_s=0.2, pressure_headroom_mb=0)
    low = handshake(node, "cloud-a", priority=1).json()
    high = handshake(node, "cloud-b", priority=9).json()
    hog = subprocess.Popen([sys.executable, "-c", HOG], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)  # the watcher has seen the tenants running
        assert lxc.Container(low["container"]).running
        for mb in range(400, 1601, 50):
            hog.stdin.write(f"{mb}\n")
            hog.stdin.flush()
            hog.stdout.readline()
            time.sleep(0.25)
            if not defined(low["container"]):
                break
        # Each step is seen within one 0.2 s look; the eviction leaves the load at most
        # a couple of steps (100 MB) past the tenants' share, which the low one's 300 MB
        # cover, so the high one stays.
        assert not defined(low["container"]), "the low tenant was not evicted"
    finally:
        hog.kill()
        hog.wait(10)
    events = node.client("cloud-a").get(node.url + "/v1/events", timeout=5).json()
    term = [e for e in events if e["type"] == "server.terminated"]
    assert [e["server_id"] for e in term] == [low["server_id"]]
    assert term[0]["reason"] == "basic_service_pressure"
    assert term[0]["data"]["left_mb"] < 0
    # The more important tenant stays: evicting the low one covered the shortfall.
    assert lxc.Container(high["container"]).running
