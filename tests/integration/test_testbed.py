"""The three-tier testbed for real: namespaces, the NFQUEUE delayer, a real `enorm serve`
as the users' first hop, the cloud tier in its namespace, and a teardown that leaves
nothing behind. Holds the machine-wide bench lock: the testbed's names are fixed."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

from bench.latency import measure
from bench.load import Load
from bench.testbed import WAN, Testbed, probe
from bench.testbed.netns import sh

ROOT = Path(__file__).resolve().parents[2]


def leftovers() -> list[str]:
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return ([ln for ln in links.splitlines() if ": enbd" in ln]
            + [ln for ln in netns.splitlines() if ln.startswith("enbd")]
            + [str(p) for p in Path("/sys/fs/cgroup/cpu").glob("enbd-*")]
            + [str(p) for p in Path("/sys/fs/cgroup/cpuacct").glob("enbd-*")])


def queue_and_socket_drops(ns: str) -> dict[str, str]:
    """The kernel's own counts of where probes can be lost: NFQUEUE queues (dropped,
    user_dropped) and UDP receive buffers, on the host and in the namespace."""
    out = {}
    for where, pre in (("host", []), (ns, ["ip", "netns", "exec", ns])):
        cmd = pre + ["sh", "-c", "cat /proc/net/netfilter/nfnetlink_queue; "
                     "grep Udp: /proc/net/snmp | tail -1"]
        out[where] = subprocess.run(cmd, capture_output=True, text=True).stdout.strip()
    return out


def test_testbed_delays_routes_and_tears_down(bench_lock):
    assert leftovers() == []
    with Testbed(users_per_node=2, unit_cores=0.5) as bed:  # room for two servers
        # the cloud tier is held to one core
        assert (bed.cgroup / "cpu.cfs_quota_us").read_text().strip() == "100000"
        # the delayer: probe RTT over the near-cloud WAN link vs the configured one,
        # at 500 packets/s each way
        bed.wan("near")
        ns = bed.cloud_ns
        echo = ns.popen(sys.executable, "-m", "bench.testbed.probe", "serve", ns.ip, "7",
                        stdout=subprocess.PIPE, cwd=ROOT)
        # up to three runs of a second: a host that stalls the probe's or the echo's
        # process for a moment (seen once on CI: 431 of 500 back) is not the link
        runs = []
        try:
            echo.stdout.readline()
            while len(runs) < 3 and not (runs and runs[-1]["received"] >= 495):
                runs.append(probe.summary(probe.rtts(ns.ip, 7, 500, 0.002), 500)
                            | {"kernel": queue_and_socket_drops(ns.name)})
        finally:
            echo.kill()
            echo.wait()
        rtt = WAN["near"].rtt_ms
        s = runs[-1]
        assert s["received"] >= 495, runs
        assert rtt - 2 * WAN["near"].jitter_ms <= s["p50_ms"] <= rtt + 5, runs
        # a user behind the edge node: offloaded by the cloud manager, then served by
        # the edge server; its traffic to the cloud crosses the WAN link
        bed.access("wifi")
        src = bed.edges[0].users.addrs[0]
        before = bed.wan_counters()
        load = Load(bed.edges[0].users.name, bed.cloud_url, [src], 1.0, "aggressive")
        (uid,) = load.start()
        assert bed.wan_counters()["rx_bytes"] > before["rx_bytes"]  # login went to the cloud
        dep = bed.offload([(uid, src)])
        res = load.run()
        assert res["errors"] == 0 and res["requests"] > 0
        assert res["servers"] == [dep["url"]]
        assert dep["url"].startswith(f"http://{bed.edges[0].users.host_ip}:")
        assert bed.withdraw(dep["server_id"])["state"] == "withdrawn"
        # JMeter's aggressive plan from the users' namespace, each player from its own
        # address: on the edge server the cloud sees (almost) nothing of it, on the
        # near cloud every request crosses the WAN link
        players = bed.players(2, prefix="t-bed")
        assert [p.src for p in players] == bed.edges[0].users.addrs[:2]
        edge = measure(bed, "edge", players, 2.0, "aggressive", servers=2)
        near = measure(bed, "near", players, 2.0, "aggressive")
        for r in (edge, near):
            assert r["errors"] == 0 and r["requests"] > 10, r
            # what the testbed's own parts cost, beside what it measured
            spent = r["cost"]
            assert spent["requests"] >= r["requests"] and spent["packets"] > 2 * r["requests"]
            assert spent["cpu_s"]["generator"] > 0 and spent["cpu_s"]["delayers"] > 0, spent
            assert 0 < spent["testbed_share"] < 1 and spent["delayer_us_per_packet"] > 0
        assert edge["cost"]["cpu_s"]["edge"] > 0  # the edge servers' containers
        assert near["cost"]["cpu_s"]["cloud"] > near["cost"]["cpu_s"]["edge"]
        assert near["cloud_requests"] >= near["requests"] > 0
        assert edge["cloud_requests"] < near["cloud_requests"] / 4
        assert edge["wan_bytes"] < near["wan_bytes"] / 4
    assert leftovers() == []


def test_users_keep_playing_on_the_edge_while_the_cloud_link_is_cut(bench_lock):
    """Edge autonomy: the WAN link goes down during play and the node's daemon is
    restarted while the cloud is out of reach; the user, playing on the edge server all
    along, sees no error, and once the link is back the withdrawal merges the data."""
    assert leftovers() == []
    with Testbed(users_per_node=1, unit_cores=0.5) as bed:
        bed.access("wifi")
        bed.wan("near")
        src = bed.edges[0].users.addrs[0]
        load = Load(bed.edges[0].users.name, bed.cloud_url, [src], 12.0, "aggressive")
        (uid,) = load.start()
        dep = bed.offload([(uid, src)])
        node, wan = bed.edges[0].node, bed.cloud_ns.host_if
        seen: dict = {}

        def cut_restart_restore() -> None:
            time.sleep(2.0)
            sh("ip", "link", "set", wan, "down")
            try:
                seen["cloud_reachable"] = subprocess.run(
                    ["ip", "netns", "exec", bed.edges[0].users.name, sys.executable, "-c",
                     "import socket,sys; socket.create_connection((sys.argv[1], 8000), 1)",
                     bed.cloud_ns.ip], capture_output=True).returncode == 0
                node.proc.kill()  # the board reboots its daemon while the cloud is away
                node.proc.wait(10)
                node.proc = None
                node.start()
                seen["servers"] = [s["id"] for s in requests.get(
                    node.url + "/v1/servers", timeout=5,
                    headers={"Authorization": f"Bearer {bed.token}"}).json()]
                time.sleep(3.0)
            finally:
                sh("ip", "link", "set", wan, "up")

        cutter = threading.Thread(target=cut_restart_restore)
        cutter.start()
        res = load.run()
        cutter.join()
        assert seen["cloud_reachable"] is False  # the cut was real
        assert seen["servers"] == [dep["server_id"]]  # back with its server, cloud away
        assert res["errors"] == 0 and res["requests"] > 50, res
        assert res["servers"] == [dep["url"]]  # on the edge all along
        done = bed.withdraw(dep["server_id"])
        assert done["state"] == "withdrawn" and done["confirmed"] is True
        assert done["keys_migrated"] > 0
    assert leftovers() == []
