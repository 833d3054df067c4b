"""The three-tier testbed: users -> edge node (their first hop) -> cloud, on one machine.

    with Testbed(nodes=1) as bed:
        bed.access("4g"); bed.wan("far")
        dep = bed.offload(users)  # the cloud manager deploys the edge server

Layout for edge node i (`bed<i>`): the host's root namespace is the edge node (real
`enorm serve`, bridge `enbd<i>`, subnet 10.86.<10+i>.0/24 (10.86.0.0/24 is
bench.autoscaling's), API on port 18700+i, container ports 28700+100i..+99); its users
live in namespace `enbdu<i>` (198.18.<i>.0/24, one address per user, default route via
the node). The cloud namespace `enbdc` (10.86.255.0/30)
holds the cloud game server, its Redis and the cloud manager, held to one core. A user
going to the cloud crosses the access link and then the WAN link, as on a real path.
Node i reaches users at `198.18.<i>.1` and its probes leave from there, so `distances`
can put the nodes at different distances from one namespace's users (by that address).
Everything is removed by `close`, also after a failure, SIGTERM or interpreter exit.
"""

from __future__ import annotations

import atexit
import contextlib
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import requests

from bench.jmeter import Player
from games.local import LocalEdgeNode

from . import cost, delayer, profiles
from .netns import Namespace, sh, stop

PREFIX = "enbd"
CLOUD_NET = "10.86.255.0/30"
CLOUD_PORT = 8000
API_PORT = 18700
DISTANCE_QUEUES = 8700  # + 40 * users namespace + 2 * node (+1: the host's direction)
CGROUP_CPU = Path("/sys/fs/cgroup/cpu")


@dataclass
class EdgeBed:
    index: int
    node: LocalEdgeNode
    users: Namespace

    @property
    def name(self) -> str:
        return f"bed{self.index}"


@dataclass
class Distance:
    """One direction of one users namespace's path to node `node`: its delayer."""

    node: int
    queue: int
    where: str | None  # the namespace whose PREROUTING holds the rule (None: the host)
    rule: list[str]
    proc: subprocess.Popen


class Testbed:
    __test__ = False  # not a pytest class
    def __init__(self, nodes: int = 1, users_per_node: int = 64, node_cores: float = 1.0,
                 node_memory_mb: int = 1024, unit_cores: float = 1.0, unit_memory_mb: int = 200,
                 cloud_cores: float = 1.0, **node_settings):  # fmt: skip
        if not 1 <= nodes <= 20:
            raise ValueError(f"nodes: 1..20, not {nodes}")
        self.n_nodes, self.users_per_node = nodes, users_per_node
        self.node_kw = dict(cores=node_cores, memory_mb=node_memory_mb, reserve_cores=0.0,
                            reserve_memory_mb=0, basic_service="reserve",
                            unit={"cores": unit_cores, "memory_mb": unit_memory_mb},
                            **node_settings)  # fmt: skip
        self.cloud_cores = cloud_cores
        self.token = "enbd-cloud-token"
        self.edges: list[EdgeBed] = []
        self.cloud_ns: Namespace | None = None
        self.cloud_proc = None
        self.cgroup = CGROUP_CPU / f"{PREFIX}-cloud"
        self._closed = False
        self._distance: dict[int, list[Distance]] = {}  # users namespace -> its delayers

    # -- build / tear down -------------------------------------------------------------
    def __enter__(self) -> Testbed:
        atexit.register(self.close)
        self._old_term = signal.signal(signal.SIGTERM, self._on_term)
        try:
            self.build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _on_term(self, *_):
        self.close()
        sys.exit(143)

    def build(self) -> None:
        self.cloud_ns = Namespace(f"{PREFIX}c", CLOUD_NET, queue_base=8600).open()
        for i in range(self.n_nodes):
            users = Namespace(f"{PREFIX}u{i}", f"198.18.{i}.0/24", n_addrs=self.users_per_node,
                              queue_base=8610 + 2 * i)
            self.edges.append(EdgeBed(i, None, users))  # type: ignore[arg-type]
            users.open()
            bed = self.edges[-1]
            bed.node = LocalEdgeNode(
                name=f"bed{i}", listen_host=self.cloud_ns.host_ip, listen_port=API_PORT + i,
                public_host=users.host_ip, bridge=f"{PREFIX}{i}", subnet=f"10.86.{10 + i}.0/24",
                port_range=[28700 + 100 * i, 28799 + 100 * i], tokens={self.token: "cloud"},
                # The cloud's Redis and callback are in the cloud namespace; the edge
                # servers push region codes to the cloud game server there.
                destinations={"*": [CLOUD_NET]},
                container_egress=[f"{self.cloud_ns.ip}:{CLOUD_PORT}"],
                probe_source=users.host_ip,
                **self.node_kw)  # fmt: skip
            sh("ip", "route", "replace", "unreachable", f"10.86.{10 + i}.0/24", "metric", "4000")
            bed.node.start()
        self._start_cloud()

    def _start_cloud(self) -> None:
        self.cgroup.mkdir(exist_ok=True)
        period = 100_000
        (self.cgroup / "cpu.cfs_period_us").write_text(str(period))
        (self.cgroup / "cpu.cfs_quota_us").write_text(str(int(period * self.cloud_cores)))
        edge_url = ",".join(f"http://{self.cloud_ns.host_ip}:{API_PORT + b.index}"
                            for b in self.edges)
        self.cloud_proc = self.cloud_ns.popen(
            sys.executable, "-m", "bench.testbed.cloud", self.cloud_ns.ip, str(CLOUD_PORT),
            edge_url, self.token,
            stdout=subprocess.PIPE, cwd=Path(__file__).resolve().parents[2])  # fmt: skip
        # `ip netns exec` execs python in the same pid; /sys inside is the namespace's own
        (self.cgroup / "cgroup.procs").write_text(str(self.cloud_proc.pid))
        cost.CLOUD.open().add(self.cloud_proc.pid)
        if self.cloud_proc.stdout.readline().strip() != b"ready":
            raise RuntimeError("cloud tier did not start")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        errors = []
        self._undistance()
        for bed in self.edges:
            self.up(bed.index)
        # The nodes go first: `enorm down` merges what a run left deployed (one killed
        # half-way) back into the cloud's Redis, which must still be there.
        for bed in self.edges:
            if bed.node is not None:
                try:
                    bed.node.close()
                except Exception as exc:  # noqa: BLE001 (the rest must still go)
                    errors.append(exc)
        if self.cloud_proc is not None and self.cloud_proc.poll() is None:
            self.cloud_proc.terminate()
            try:
                self.cloud_proc.wait(20)
            except Exception:  # noqa: BLE001
                self.cloud_proc.kill()
        for bed in self.edges:
            bed.users.close()
            sh("ip", "route", "del", "unreachable", f"10.86.{10 + bed.index}.0/24", "metric",
               "4000", check=False)
        if self.cloud_ns is not None:
            self.cloud_ns.close()
        with contextlib.suppress(OSError):
            self.cgroup.rmdir()
        for group in (cost.GENERATOR, cost.DELAYERS, cost.CLOUD):
            group.close()
        atexit.unregister(self.close)
        if getattr(self, "_old_term", None) is not None:
            signal.signal(signal.SIGTERM, self._old_term)
        if errors:
            raise errors[0]

    # -- use ---------------------------------------------------------------------------
    @property
    def cloud_url(self) -> str:
        return f"http://{self.cloud_ns.ip}:{CLOUD_PORT}"

    def access(self, profile: str | profiles.Link) -> None:
        link = profiles.ACCESS[profile] if isinstance(profile, str) else profile
        for bed in self.edges:
            bed.users.shape(link)

    def wan(self, profile: str | profiles.Link) -> None:
        self.cloud_ns.shape(profiles.WAN[profile] if isinstance(profile, str) else profile)

    def distances(self, extra_ms: dict[int, float], users: int = 0) -> None:
        """Put node k `extra_ms[k]` further (one way, on top of the access link) from
        users namespace `users`: its traffic to and from node k's address (its servers'
        and its probes') gets its own delayer each way. Each namespace has its own
        (another namespace's stay); `move` changes them while traffic flows. Call after
        `access`, which resets the namespace's rules."""
        self._undistance(users)
        ns = self.edges[users].users
        link = ns.link or profiles.Link("none", delay_ms=0.0, jitter_ms=0.0)
        out = self._distance[users] = []
        for k, extra in sorted(extra_ms.items()):
            addr = self.edges[k].users.host_ip
            spec = f"{link.delay_ms + extra}:{link.jitter_ms}"
            base = DISTANCE_QUEUES + 40 * users + 2 * k  # unique per host and namespace
            for where, rule, q in (
                (ns.name, ["-i", ns.ns_if, "-s", addr], base),
                (None, ["-i", ns.host_if, "-d", addr], base + 1),
            ):
                rule = ["PREROUTING", *rule, "-j", "NFQUEUE", "--queue-num", str(q)]
                out.append(Distance(k, q, where, rule,
                                    delayer.start([f"{q}:{spec}"], ns=where, control=True)))
                # before the access link's own rule: a packet is queued once
                sh("iptables", "-t", "mangle", "-I", *rule, ns=where)

    def move(self, extra_ms: dict[int, float], users: int = 0) -> None:
        """New distances for the nodes `distances` placed from namespace `users` (users
        walking), taken at once by the running delayers: no rule changes, no gap."""
        link = self.edges[users].users.link or profiles.Link("none", 0.0, 0.0)
        for d in self._distance.get(users, []):
            if d.node in extra_ms:
                delayer.set_delay(d.proc, d.queue, link.delay_ms + extra_ms[d.node],
                                  link.jitter_ms)

    def _undistance(self, users: int | None = None) -> None:
        for ns in [users] if users is not None else list(self._distance):
            for d in self._distance.pop(ns, []):
                sh("iptables", "-t", "mangle", "-D", *d.rule, check=False, ns=d.where)
                stop(d.proc)

    def down(self, k: int) -> None:
        """Node k goes down as seen from outside: its API (the cloud's calls, the
        heartbeats) and everything to its users-facing address (its servers, their SSH)
        is refused (TCP reset, as from a host that lost its service) until `up`."""
        for rule in self._down_rules(k):
            if sh("iptables", "-C", *rule, check=False).returncode != 0:
                sh("iptables", "-I", *rule)

    def up(self, k: int) -> None:
        for rule in self._down_rules(k):
            while sh("iptables", "-D", *rule, check=False).returncode == 0:
                pass

    def _down_rules(self, k: int) -> list[list[str]]:
        addr, reset = self.edges[k].users.host_ip, ["-j", "REJECT", "--reject-with", "tcp-reset"]
        return [["INPUT", "-p", "tcp", "--dport", str(API_PORT + k), *reset],
                ["INPUT", "-p", "tcp", "-d", addr, *reset],
                ["FORWARD", "-p", "tcp", "-m", "conntrack", "--ctorigdst", addr, *reset]]

    def players(self, n: int, prefix: str = "bed", node: int = 0,
                timeout: float = 900) -> list[Player]:  # fmt: skip
        """n players made by the cloud (the same ones again for the same prefix), each
        given a source address of node `node`'s users namespace (in turn, when there are
        more players than addresses)."""
        r = requests.post(self.cloud_url + "/bench/players", json={"n": n, "prefix": prefix},
                          timeout=timeout)
        r.raise_for_status()
        addrs = self.edges[node].users.addrs
        return [Player(uid, token, lat, lng, addrs[i % len(addrs)])
                for i, (uid, token, lat, lng) in enumerate(r.json())]

    def offload(self, users: list[tuple[str, str]], timeout: float = 120,
                placement: str | None = None, exclude: list[str] | None = None) -> dict:
        """The cloud manager (in the cloud) offloads `users` [(id, address)]: bed0 first,
        the next node if it refuses (the manager's failover order), or by `placement`
        ("first" / "scored", kept for the next calls), never on a node in `exclude`."""
        r = requests.post(self.cloud_url + "/bench/offload", timeout=timeout, json={
            "users": users, "placement": placement, "exclude": exclude or []})
        r.raise_for_status()
        return r.json()

    def handover(self, server_id: str, to: str | None = None, path: str | None = None,
                 timeout: float = 120) -> dict:  # fmt: skip
        """The cloud manager moves a server's users to a new server on node `to` (or
        where its placement puts them), start-first; `path`: direct (node to node, the
        default) or cloud."""
        r = requests.post(self.cloud_url + "/bench/handover",
                          json={"server_id": server_id, "to": to, "path": path},
                          timeout=timeout)
        r.raise_for_status()
        return r.json()

    def withdraw(self, server_id: str, timeout: float = 120) -> dict:
        r = requests.post(self.cloud_url + "/bench/withdraw", json={"server_id": server_id},
                          timeout=timeout)
        r.raise_for_status()
        return r.json()

    def cost_sample(self) -> cost.Sample:
        """Every part's CPU now (cost.py), with the packets the delayers have seen: each
        shaped link's packets both ways (each is delayed once, on its receiving side)."""
        links = [b.users for b in self.edges] + [self.cloud_ns]
        packets = sum(c["rx_packets"] + c["tx_packets"] for c in
                      (ns.counters() for ns in links if ns.link is not None))  # fmt: skip
        return cost.sample([b.node.proc.pid for b in self.edges if b.node.proc is not None],
                           [b.node.config.container_prefix for b in self.edges], packets)

    def wan_counters(self) -> dict[str, int]:
        """Bytes/packets on the WAN link's host end (rx: cloud -> edge)."""
        return self.cloud_ns.counters()
