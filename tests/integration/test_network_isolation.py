"""A closed host, tenants apart, no spoofing, a guard that stays: attacked from inside.

Each test logs in to a real container over its SSH access port as the tenant's root (as
a tenant would) and runs tests/integration/probe.py there: plain connects, hand-built
IPv4/TCP SYNs on a packet socket, ARP claims and foreign source addresses. Listeners on
the host count what reached them; a packet socket on the bridge sees what got past the
bridge's guard.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from nodes import EdgeNode, make_node, user_namespace
from test_edge_node import handshake, ssh

from enorm import network

pytestmark = pytest.mark.system

PROBE = Path(__file__).with_name("probe.py")


class Listener:
    """A TCP listener on the host that counts the connections it accepted."""

    def __init__(self, host: str, port: int = 0) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


class Sniffer:
    """Every frame that reached the host's side of the bridge while it ran."""

    def __init__(self, ifname: str) -> None:
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        self.sock.bind((ifname, 0))
        self.sock.settimeout(0.1)
        self.frames: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.frames.append(self.sock.recv(4096))
            except TimeoutError:
                continue

    def stop(self) -> list[bytes]:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()
        return self.frames


class Tenant:
    """A tenant's root shell in its container, over the SSH access port."""

    def __init__(self, node: EdgeNode, body: dict) -> None:
        self.body = body
        self.sid, self.address = body["server_id"], body["address"]
        self.ssh = ssh(node, body["access"]["port"])
        self.mac = self.run("cat /sys/class/net/eth0/address").strip()
        with self.ssh.open_sftp() as sftp:
            sftp.put(str(PROBE), "/root/probe.py")

    def run(self, cmd: str, timeout: float = 30) -> str:
        _, out, err = self.ssh.exec_command(cmd, timeout=timeout)
        text = out.read().decode()
        assert out.channel.recv_exit_status() == 0, f"{cmd}: {err.read().decode()}"
        return text

    def probe(self, *actions: list) -> list[str]:
        return json.loads(self.run(f"python3 /root/probe.py '{json.dumps(list(actions))}'"))


@contextlib.contextmanager
def tenants(node: EdgeNode, *owners: str) -> Iterator[list[Tenant]]:
    made: list[Tenant] = []
    try:
        for owner in owners:
            r = handshake(node, owner)
            assert r.status_code == 201, r.text
            made.append(Tenant(node, r.json()))
        yield made
    finally:
        for t in made:
            t.ssh.close()


def gateway(node: EdgeNode) -> str:
    return str(next(ipaddress.IPv4Network(node.settings["subnet"]).hosts()))


def bridge_mac(node: EdgeNode) -> str:
    return Path(f"/sys/class/net/{node.settings['bridge']}/address").read_text().strip()


def test_host_is_closed_to_containers(redis_server, edge_node):
    """Nothing on the host answers a container: not 127.0.0.1 (the API, the node's Redis,
    any local service) routed through the gateway, not the bridge address, not 0.0.0.0;
    only the operator's `container_egress` destination does (the control). Nor does
    127.0.0.1 answer a neighbour on another link."""
    store = redis_server()  # the node's own Redis, on 127.0.0.1 only
    allowed = Listener("0.0.0.0")
    node = edge_node(start=False)
    gw = gateway(node)
    node.settings.update(store_url=store.url, container_egress=[f"{gw}/32:{allowed.port}"])
    node.write_config()
    node.start()
    api = node.settings["listen_port"]
    local, on_bridge, anywhere = Listener("127.0.0.1"), Listener(gw), Listener("0.0.0.0")
    try:
        with tenants(node, "cloud-a") as (a,):
            gw_mac = bridge_mac(node)

            def syn(dst: str, port: int) -> list:
                return ["syn", "eth0", a.mac, gw_mac, a.address, dst, port]

            attempts = {
                "bridge address": (gw, on_bridge.port),
                "0.0.0.0 service": (gw, anywhere.port),
                "API on 127.0.0.1": ("127.0.0.1", api),
                "node's Redis on 127.0.0.1": ("127.0.0.1", store.port),
                "service on 127.0.0.1": ("127.0.0.1", local.port),
                "allowed": (gw, allowed.port),
            }
            # Raw frames to the gateway's MAC, whatever the destination address.
            raw = dict(zip(attempts, a.probe(*(syn(*d) for d in attempts.values())),
                           strict=True))
            # Plain connects; 127.0.0.1 is routed out through the gateway (CVE-2020-8558).
            a.run("sysctl -qw net.ipv4.conf.all.route_localnet=1 "
                  "net.ipv4.conf.eth0.route_localnet=1; "
                  "ip route del table local 127.0.0.0/8 dev lo; "
                  "ip route del table local 127.0.0.1 dev lo; "
                  f"ip route add 127.0.0.1/32 via {gw} dev eth0 src {a.address}")
            plain = dict(zip(attempts, a.probe(*(["connect", *d] for d in attempts.values())),
                             strict=True))
        # A neighbour on the users' link routes 127.0.0.1 through the board (its link
        # accepts 127.0.0.0/8: route_localnet, as some other software sets it).
        n = node.name[1:]
        with user_namespace(int(n)) as (ns, ns_ip, host_ip):
            Path(f"/proc/sys/net/ipv4/conf/entuh{n}/route_localnet").write_text("1")
            subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw",  # answers from 127/8
                            "net.ipv4.conf.all.route_localnet=1",
                            f"net.ipv4.conf.entun{n}.route_localnet=1"], check=True)
            macs = [subprocess.run(["ip", "netns", "exec", ns, "cat",
                                    f"/sys/class/net/entun{n}/address"],
                                   capture_output=True, text=True).stdout.strip(),
                    Path(f"/sys/class/net/entuh{n}/address").read_text().strip()]

            def from_neighbour(*dsts: tuple[str, int]) -> list[str]:
                return json.loads(subprocess.run(
                    ["ip", "netns", "exec", ns, sys.executable, str(PROBE), json.dumps(
                        [["syn", f"entun{n}", *macs, ns_ip, *d] for d in dsts])],
                    check=True, capture_output=True, text=True, timeout=30).stdout)

            # Control (also waits for the new link): the host's 0.0.0.0 service answers
            # (a SYN-ACK only: the handshake never completes, nothing is accepted).
            deadline = time.monotonic() + 10
            while from_neighbour((host_ip, anywhere.port)) != ["answer"]:
                assert time.monotonic() < deadline, "the neighbour's link never worked"
            neighbour = from_neighbour(*(("127.0.0.1", p) for p in (local.port, api, store.port)))
        assert neighbour == ["silent"] * 3
        assert raw.pop("allowed") == "answer" and plain.pop("allowed") == "open"
        assert set(raw.values()) == {"silent"}, raw
        assert set(plain.values()) == {"silent"}, plain
        assert (local.accepted, on_bridge.accepted, anywhere.accepted) == (0, 0, 0)
        assert allowed.accepted >= 1
        # This host's own clients still reach the API on 127.0.0.1 (forwarded ports: see
        # test_no_spoofing_on_the_bridge and test_edge_node).
        assert requests.get(node.url + "/healthz", timeout=5).ok
    finally:
        for li in (allowed, local, on_bridge, anywhere):
            li.close()


def test_an_allowed_destination_beyond_the_board_answers(edge_node):
    """`container_egress` to a server beyond the board whose network knows no route to
    the node's subnet (a cloud server upstream of a board's LAN; QEMU's user network in
    the board lab, which found it): the connection leaves with the board's address and
    its answers come back. Without the node's MASQUERADE it timed out."""
    node = edge_node(start=False)
    n = node.name[1:]
    with user_namespace(int(n)) as (ns, ns_ip, host_ip):
        subprocess.run(["ip", "-n", ns, "route", "del", "default"], check=True)
        server = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c",
             "import socket, sys; s = socket.socket(); "
             f"s.bind(('{ns_ip}', 0)); s.listen(1); print(s.getsockname()[1], flush=True); "
             "c, peer = s.accept(); c.sendall(b'hi'); print(peer[0], flush=True)"],
            stdout=subprocess.PIPE, text=True)
        try:
            port = int(server.stdout.readline())  # type: ignore[union-attr]
            node.settings.update(container_egress=[f"{ns_ip}/32:{port}"])
            node.write_config()
            node.start()
            with tenants(node, "cloud-a") as (a,):
                got = a.run("python3 -c \"import socket; s = socket.create_connection("
                            f"('{ns_ip}', {port}), timeout=5); print(s.recv(2).decode())\"")
                assert got.strip() == "hi"
                assert a.probe(["connect", ns_ip, port + 1]) == ["silent"]  # only the port
            assert server.stdout.readline().strip() == host_ip  # type: ignore[union-attr]
        finally:
            server.kill()
            server.wait()


def test_containers_cannot_reach_each_other(edge_node):
    """Another tenant's container, another server of the same tenant, another node's
    container: no plain connect, no raw SYN (to its MAC or routed through the gateway),
    not through the other's forwarded port on the host either."""
    node = edge_node()
    other_node = edge_node()
    with tenants(node, "cloud-a", "cloud-b", "cloud-a") as (a, b, sibling), \
            tenants(other_node, "cloud-b") as (far,):
        gw, gw_mac = gateway(node), bridge_mac(node)
        b.run("enorm-app start -- python3 -m http.server 8080 --directory /tmp")
        network.wait_tcp("127.0.0.1", b.body["ports"]["8080"])  # up, seen from the host
        targets = {
            "other tenant sshd": (b.address, 22, b.mac),
            "other tenant app": (b.address, 8080, b.mac),
            "other tenant Redis": (b.address, 6379, b.mac),
            "same tenant's other server": (sibling.address, 22, sibling.mac),
            "container of another node": (far.address, 22, gw_mac),
        }
        actions = []
        for dst, port, dst_mac in targets.values():
            actions += [["connect", dst, port],
                        ["syn", "eth0", a.mac, dst_mac, a.address, dst, port],
                        ["syn", "eth0", a.mac, gw_mac, a.address, dst, port]]
        # Through the host's user-facing ports of the other server (hairpin).
        actions += [["connect", gw, b.body["ports"]["8080"]],
                    ["connect", gw, b.body["access"]["port"]]]
        results = a.probe(*actions)
    assert set(results) == {"silent"}, dict(zip(map(json.dumps, actions), results, strict=True))


def test_no_spoofing_on_the_bridge(edge_node):
    """A container sends only from its own MAC and address: another container's address
    taken and claimed by ARP, frames from the other's MAC, a foreign source address or
    IPv6 never get past the bridge, and the users of B's forwarded port keep reaching B."""
    node = edge_node()
    br = node.settings["bridge"]
    with tenants(node, "cloud-a", "cloud-b") as (a, b):
        for t in (a, b):
            t.run(f"echo {t.sid} > /tmp/who && "
                  "enorm-app start -- python3 -m http.server 8080 --directory /tmp")
        b_port = b.body["ports"]["8080"]
        network.wait_tcp("127.0.0.1", b_port)
        gw, gw_mac = gateway(node), bridge_mac(node)
        sniffer = Sniffer(br)
        try:
            # A takes B's address (its kernel now answers ARP for it) and claims it.
            a.run(f"ip addr add {b.address}/24 dev eth0")
            subprocess.run(["ip", "neigh", "del", b.address, "dev", br], capture_output=True)
            attack = threading.Thread(target=a.probe, args=(
                ["arp", "eth0", a.mac, b.address, 40],  # B's address, A's MAC, for 2 s
                ["arp", "eth0", b.mac, b.address, 40],  # B's address and MAC
                ["syn", "eth0", a.mac, gw_mac, b.address, gw, 22],
                ["syn", "eth0", b.mac, gw_mac, b.address, gw, 22],
                ["syn", "eth0", a.mac, gw_mac, "10.66.0.9", gw, 22],
                ["ipv6", "eth0", a.mac]))
            attack.start()
            served = []  # the users of B's forwarded port, while A claims B's address
            while attack.is_alive() or not served:
                served.append(requests.get(f"http://127.0.0.1:{b_port}/who",
                                           timeout=5).text.strip())
                time.sleep(0.1)
            attack.join()
        finally:
            frames = sniffer.stop()
    assert set(served) == {b.sid}, served
    neigh = subprocess.run(["ip", "neigh", "show", b.address, "dev", br],
                           capture_output=True, text=True).stdout
    assert b.mac in neigh and a.mac not in neigh, neigh
    fdb = subprocess.run(["bridge", "fdb", "show", "br", br], capture_output=True,
                         text=True).stdout.splitlines()
    a_dev = {ln.split(" dev ")[1].split()[0] for ln in fdb if ln.startswith(a.mac)}
    b_dev = {ln.split(" dev ")[1].split()[0] for ln in fdb if ln.startswith(b.mac)}
    assert a_dev and b_dev and not a_dev & b_dev, fdb  # B's MAC stays on B's port
    # What reached the host's side of the bridge: none of A's claims or forged packets.
    a_mac, b_ip = bytes.fromhex(a.mac.replace(":", "")), socket.inet_aton(b.address)
    arp = [f for f in frames if f[12:14] == b"\x08\x06"]
    ipv4 = [f for f in frames if f[12:14] == b"\x08\x00"]
    assert not [f for f in arp if f[6:12] == a_mac and f[28:32] == b_ip]
    assert not [f for f in arp if f[28:32] == f[38:42] == b_ip]  # gratuitous, for B
    assert not [f for f in ipv4 if f[26:30] == b_ip and f[23] == 6 and f[36:38] == b"\x00\x16"]
    assert not [f for f in ipv4 if f[26:30] == socket.inet_aton("10.66.0.9")]
    assert not [f for f in frames if f[12:14] == b"\x86\xdd" and f[6:12] == a_mac]
    assert len(arp) + len(ipv4) > 0  # the sniffer saw the legitimate traffic


def test_subnet_guard_stays_after_down(tmp_path):
    node = make_node(tmp_path / "node")
    subnet = node.settings["subnet"]
    node.start()
    try:
        r = handshake(node)
        assert r.status_code == 201, r.text
        addr = r.json()["address"]
    finally:
        node.down()
    routes = subprocess.run(["ip", "-4", "route", "show", "table", "main", "type",
                             "unreachable", subnet], capture_output=True, text=True).stdout
    assert "metric 4000" in routes, routes
    got = subprocess.run(["ip", "route", "get", addr], capture_output=True, text=True)
    assert got.returncode != 0 and "No route to host" in got.stderr, got


def test_a_handshakes_guard_written_without_reading_is_the_same_guard():
    """A handshake writes its new id's guard in a child process without reading the
    tables: the same lines `guard` writes, a chain of that name left behind (a stray
    rule in it) is emptied, not added to, and a failed write is made good by `guard`."""
    from enorm import firewall
    from enorm.firewall import Firewall, Port

    fw = Firewall("tfwb", "10.89.251.0/24", "entbfwb")
    port = Port("enfwbab12", "02:ab:12:00:00:02", "10.89.251.2")
    try:
        fw.guard("ab12", port)
        by_guard = sorted(fw.guards()["ab12"])
        fw.unguard("ab12")
        fw.guard_begin("ab12", port)()
        assert sorted(fw.guards()["ab12"]) == by_guard and len(by_guard) == 6
        fw.unguard("ab12")
        chain = "ENORM-TFWB-AB12"
        subprocess.run(["ebtables", "-t", "nat", "-N", chain], check=True)
        subprocess.run(["ebtables", "-t", "nat", "-A", chain, "-j", "ACCEPT"], check=True)
        fw.guard_begin("ab12", port)()
        assert sorted(fw.guards()["ab12"]) == by_guard
        assert "-j ACCEPT" not in subprocess.run(["ebtables", "-t", "nat", "-L", chain],
                                                 capture_output=True, text=True).stdout
        fw.unguard("ab12")
        # A write that fails (nf_tables changed by another process meanwhile, as the soak
        # saw) falls back to reading and comparing: the guard is whole all the same.
        real = firewall._restore_begin
        firewall._restore_begin = lambda batches, cmd: subprocess.Popen(["false"])
        try:
            fw.guard_begin("ab12", port)()
        finally:
            firewall._restore_begin = real
        assert sorted(fw.guards()["ab12"]) == by_guard
    finally:
        fw.reconcile_guards({})
    assert "ENORM-TFWB" not in subprocess.run(["ebtables-save"], capture_output=True,
                                              text=True).stdout


def test_a_neighbour_pinned_beside_the_create_is_pinned_or_says_why():
    """The handshake pins the container's MAC in a child process; waiting for it gives
    the entry, or an error naming the command when `ip` refused."""
    subprocess.run(["ip", "link", "add", "entbnb0", "type", "bridge"], check=True)
    try:
        subprocess.run(["ip", "link", "set", "entbnb0", "up"], check=True)
        network.pin_neighbour_begin("10.89.252.7", "02:ab:12:00:00:07", "entbnb0")()
        assert "02:ab:12:00:00:07" in network.neighbour("10.89.252.7")
        with pytest.raises(network.NetworkError, match="ip neigh replace 10.89.252.8.*"
                                                       "entbnb-none"):
            network.pin_neighbour_begin("10.89.252.8", "02:ab:12:00:00:08", "entbnb-none")()
    finally:
        subprocess.run(["ip", "link", "del", "entbnb0"], check=True)


def test_a_guard_lifted_beside_lxcs_delete_leaves_nothing_even_if_changed_by_hand():
    """A termination lifts a container's bridge guard by its known lines in a child
    process (overlapping LXC's delete); when the tables are not as the node left them,
    it falls back to reading and comparing, and still leaves nothing."""
    from enorm.firewall import Firewall, Port

    fw = Firewall("tfwg", "10.89.250.0/24", "entbfwg")
    port = Port("enfwgab12", "02:ab:12:00:00:01", "10.89.250.2")
    try:
        fw.guard("ab12", port)
        assert len(fw.guards()["ab12"]) == 6
        fw.unguard_begin("ab12", port)()
        assert "ab12" not in fw.guards()
        fw.guard("ab12", port)
        subprocess.run(["ebtables", "-t", "filter", "-D", "FORWARD", "-i", port.veth, "-j",
                        "DROP"], check=True)  # somebody removed one of its rules
        fw.unguard_begin("ab12", port)()
        assert "ab12" not in fw.guards()
        assert "ENORM-TFWG" not in subprocess.run(["ebtables-save"], capture_output=True,
                                                  text=True).stdout
    finally:
        fw.reconcile_guards({})
