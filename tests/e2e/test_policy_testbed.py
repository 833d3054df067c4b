"""The policy loop on the testbed, a short trace: two playing users behind real delayed
links, placed by the nodes' own probes (no location given), walk from one node's area
to the other's while they play; the policy follows them once, and none of their
requests fails. (The long trace, with a node going down, is bench/mobility.py.)"""

from __future__ import annotations

import time

import pytest
import requests

from bench.load import Load
from bench.testbed import WAN, Testbed
from enorm import datasync

pytestmark = [pytest.mark.system, pytest.mark.timeout(300)]

NEAR, FAR = 1.0, 17.0  # one way, on top of the Wi-Fi access link
POLICY = {"interval_s": 0.5, "dwell_s": 1.0, "withdraw_dwell_s": 1.0, "offload_gain_ms": 5.0,
          "withdraw_gain_ms": 2.0, "handover_gain_ms": 4.0, "enabled": True}


def events_until(bed: Testbed, n: int, timeout: float = 60) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        evs = requests.get(bed.cloud_url + "/bench/policy", timeout=30).json()
        if len(evs) >= n:
            return evs
        assert time.monotonic() < deadline, evs
        time.sleep(0.2)


def test_the_policy_follows_two_users_walking_between_two_testbed_nodes(bench_lock):
    with Testbed(nodes=2, users_per_node=2, unit_cores=0.5) as bed:
        bed.access("wifi")
        bed.wan("far")
        bed.distances({0: NEAR, 1: FAR})
        addrs = bed.edges[0].users.addrs
        load = Load(bed.edges[0].users.name, bed.cloud_url, addrs, 9.0, "paced", trace="who")
        uids = load.start()
        cloud = datasync.connect(f"redis://{bed.cloud_ns.ip}:6379/0")
        before = {k for u in uids for k in cloud.scan_iter(f"*{{{u}}}*")}
        cloud_ms = bed.edges[0].users.link.rtt_ms + WAN["far"].rtt_ms
        requests.post(bed.cloud_url + "/bench/policy", timeout=60, json={
            "settings": {**POLICY, "cloud_ms": cloud_ms},
            "groups": {"walkers": [[u, a] for u, a in zip(uids, addrs, strict=True)]},
        }).raise_for_status()
        t0 = load.go()

        (off,) = events_until(bed, 1)
        assert (off["kind"], off["reason"], off["node"], off["ok"]) == (
            "offload", "edge_pays", "bed0", True)
        # what bed0's own probe measured through the delayers: 2 x (2 + 1) ms, not bed1's 38
        assert 5 <= off["figures"]["node_ms"] < 20, off

        bed.move({0: FAR, 1: NEAR})  # they walk into bed1's area
        t_walk = time.time()
        hand = events_until(bed, 2)[1]
        assert (hand["kind"], hand["reason"], hand["node"], hand["to"], hand["ok"]) == (
            "handover", "better_node", "bed0", "bed1", True)
        assert hand["figures"]["gain_ms"] == pytest.approx(2 * (FAR - NEAR), abs=10)
        assert hand["at"] - t_walk < 1.0 + 2 * 0.5 + hand["seconds"] + 3  # the bound

        out = load.run()
        assert out["errors"] == 0 and out["requests"] > 20, out
        # each user: the cloud, then bed0, then bed1 -- one handover for one crossing
        for who in range(2):
            seq = [s for _, _, w, s in out["trace"] if w == who]
            hops = [s for i, s in enumerate(seq) if i == 0 or seq[i - 1] != s]
            assert [h.split("//")[1].split(":")[0] for h in hops] == [
                bed.cloud_ns.ip, bed.edges[0].users.host_ip, bed.edges[1].users.host_ip], hops
        assert len(events_until(bed, 2)) == 2  # nothing else decided
        assert out["trace"][0][0] >= t0 - 1

        (left,) = requests.post(bed.cloud_url + "/bench/policy/stop", timeout=120).json()
        assert left["state"] == "withdrawn"
        after = {k for u in uids for k in cloud.scan_iter(f"*{{{u}}}*")}
        assert before <= after  # no key of theirs lost through the three moves
        cloud.close()
