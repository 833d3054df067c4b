"""A network namespace joined to the edge node's host by one veth link, with the link's
delay (an NFQUEUE delayer per direction, on the receiving side) and bandwidth (TBF on
each end).

The host side of the link is the edge node: the namespace's default route goes through
it. Everything made here is named by the caller's prefix and removed by `close`, which
is safe to call twice and after a half-built start."""

from __future__ import annotations

import ipaddress
import subprocess
import time
from pathlib import Path

from . import delayer
from .profiles import Link


def sh(*args: str, check: bool = True, ns: str | None = None) -> subprocess.CompletedProcess:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")
    return r


def stop(proc: subprocess.Popen) -> str:
    """Stop a process this testbed started (a delayer), killing it if it lingers;
    returns what it printed after its start (a delayer: its lateness)."""
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    return proc.stdout.read().decode(errors="replace") if proc.stdout else ""


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
        # up (ns -> host, delayed in the host), down (delayed in the namespace); the
        # host's queue numbers must differ between links, hence a base per namespace
        self.queues = (queue_base + 1, queue_base + 2)
        self.delayers: list[subprocess.Popen] = []
        self.link: Link | None = None
        self.lateness: list[dict | None] = []  # per delayer, from the last `unshape`

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

    def shape(self, link: Link, impl: str | None = None) -> None:
        """Delay + jitter each way, rate by TBF. Each direction is delayed where its
        packets arrive (PREROUTING of the receiving side: the host for `up`, the namespace
        for `down`), never on OUTPUT: a packet held there still counts against its
        sending socket, and TCP Small Queues then lets a connection have only a couple of
        packets below it, so a held link passed about 0.1 MB/s at 85 ms instead of a
        real path's rate. `impl`: the delayer's implementation (delayer.IMPLS)."""
        self.unshape()
        self.link = link
        up, down = self.queues
        spec = f"{link.delay_ms}:{link.jitter_ms}"
        sh("iptables", "-t", "mangle", "-A", "PREROUTING", "-i", self.ns_if, "-j", "NFQUEUE",
           "--queue-num", str(down), ns=self.name)
        sh(*self._host_rule("-A", up))
        for ns, q in ((self.name, down), (None, up)):
            self.delayers.append(delayer.start([f"{q}:{spec}"], ns=ns, impl=impl))
        for dev, rate, ns in ((self.ns_if, link.up_mbit, self.name),
                              (self.host_if, link.down_mbit, None)):
            if rate:
                sh("tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{rate}mbit",
                   "burst", "64kb", "latency", "200ms", ns=ns)

    def _host_rule(self, op: str, queue: int) -> list[str]:
        return ["iptables", "-t", "mangle", op, "PREROUTING", "-i", self.host_if, "-j",
                "NFQUEUE", "--queue-num", str(queue)]

    def unshape(self) -> None:
        self.lateness = [delayer.lateness(stop(proc)) for proc in self.delayers]
        self.delayers.clear()
        sh("iptables", "-t", "mangle", "-F", check=False, ns=self.name)
        while sh(*self._host_rule("-D", self.queues[0]), check=False).returncode == 0:
            pass  # every copy of our rule on the host, and only ours
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
