"""A network namespace joined to the edge node's host by one veth link, with the link's
delay (NFQUEUE delayer inside the namespace) and bandwidth (TBF on each end).

The host side of the link is the edge node: the namespace's default route goes through
it. Everything made here is named by the caller's prefix and removed by `close`, which
is safe to call twice and after a half-built start."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
import time
from pathlib import Path

from .profiles import Link


def sh(*args: str, check: bool = True, ns: str | None = None) -> subprocess.CompletedProcess:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")
    return r


class Namespace:
    """`name` namespace, veth `<name>h` (host) <-> `<name>n` (namespace) on `net`:
    host gets the first address, the namespace the next `n_addrs` ones."""

    def __init__(self, name: str, net: str, n_addrs: int = 1, queue_base: int = 0):
        self.name, self.net = name, ipaddress.ip_network(net)
        self.host_if, self.ns_if = f"{name}h", f"{name}n"
        hosts = list(self.net.hosts())
        if n_addrs > len(hosts) - 1:
            raise ValueError(f"net {net}: room for {len(hosts) - 1} addresses, not {n_addrs}")
        self.host_ip = str(hosts[0])
        self.addrs = [str(a) for a in hosts[1:1 + n_addrs]]
        self.queues = (queue_base + 1, queue_base + 2)  # up (ns -> host), down
        self.delayer: subprocess.Popen | None = None
        self.link: Link | None = None

    @property
    def ip(self) -> str:
        return self.addrs[0]

    def open(self) -> Namespace:
        sh("ip", "route", "replace", "unreachable", str(self.net), "metric", "4000")
        sh("ip", "netns", "add", self.name)
        sh("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if,
           "netns", self.name)
        sh("ip", "addr", "add", f"{self.host_ip}/{self.net.prefixlen}", "dev", self.host_if)
        sh("ip", "link", "set", self.host_if, "up")
        for a in self.addrs:
            sh("ip", "addr", "add", f"{a}/{self.net.prefixlen}", "dev", self.ns_if, ns=self.name)
        sh("ip", "link", "set", self.ns_if, "up", ns=self.name)
        sh("ip", "link", "set", "lo", "up", ns=self.name)
        sh("ip", "route", "add", "default", "via", self.host_ip, ns=self.name)
        return self

    def shape(self, link: Link) -> None:
        """Delay + jitter each way (NFQUEUE inside the namespace), rate by TBF."""
        self.unshape()
        self.link = link
        up, down = self.queues
        for chain, flag, q in (("OUTPUT", "-o", up), ("PREROUTING", "-i", down)):
            sh("iptables", "-t", "mangle", "-A", chain, flag, self.ns_if, "-j", "NFQUEUE",
               "--queue-num", str(q), ns=self.name)
        self.delayer = subprocess.Popen(
            ["ip", "netns", "exec", self.name, sys.executable, "-m", "bench.testbed.delayer",
             "--queue", f"{up}:{link.delay_ms}:{link.jitter_ms}",
             "--queue", f"{down}:{link.delay_ms}:{link.jitter_ms}"],
            stdout=subprocess.PIPE, cwd=Path(__file__).resolve().parents[2])
        if self.delayer.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"delayer of {self.name} did not start")
        for dev, rate, ns in ((self.ns_if, link.up_mbit, self.name),
                              (self.host_if, link.down_mbit, None)):
            if rate:
                sh("tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{rate}mbit",
                   "burst", "64kb", "latency", "200ms", ns=ns)

    def unshape(self) -> None:
        if self.delayer is not None:
            self.delayer.terminate()
            try:
                self.delayer.wait(5)
            except subprocess.TimeoutExpired:
                self.delayer.kill()
                self.delayer.wait(5)
            self.delayer = None
        sh("iptables", "-t", "mangle", "-F", check=False, ns=self.name)
        sh("tc", "qdisc", "del", "dev", self.ns_if, "root", check=False, ns=self.name)
        sh("tc", "qdisc", "del", "dev", self.host_if, "root", check=False)
        self.link = None

    def counters(self) -> dict[str, int]:
        """Bytes and packets on the host end of the link (rx: from the namespace)."""
        base = Path("/sys/class/net") / self.host_if / "statistics"
        return {k: int((base / k).read_text()) for k in
                ("rx_bytes", "tx_bytes", "rx_packets", "tx_packets")}

    def popen(self, *args: str, **kw) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.name, *args], **kw)

    def close(self) -> None:
        self.unshape()
        sh("ip", "link", "del", self.host_if, check=False)
        sh("ip", "netns", "del", self.name, check=False)
        # give the kernel a moment to drop the namespace before the guard goes
        time.sleep(0.05)
        sh("ip", "route", "del", "unreachable", str(self.net), "metric", "4000", check=False)
