"""The node's bridge, its subnet guard, and the pools of host ports and container addresses.

Pools are pure: they pick from what the store says is taken, so the choice survives a
restart and two servers never share a port or an address. The bridge functions are the
only place that runs `ip` and `sysctl`.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterable

GUARD_METRIC = 4000


class NetworkError(RuntimeError):
    """The bridge or a route could not be set up; the message says which command failed."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise NetworkError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def _sysctl(key: str, value: str) -> None:
    path = "/proc/sys/" + key.replace(".", "/")
    with open(path) as f:
        if f.read().strip() == value:
            return
    with open(path, "w") as f:
        f.write(value)


def ensure_bridge(bridge: str, subnet: ipaddress.IPv4Network) -> None:
    """Create the bridge with the subnet's first address (idempotent), and guard the subnet.

    The guard is an `unreachable` route of high metric: if the bridge ever disappears,
    traffic to the subnet fails on this machine instead of following the default route.
    """
    gateway = next(subnet.hosts())
    if _ip("link", "show", "dev", bridge, check=False).returncode != 0:
        _ip("link", "add", bridge, "type", "bridge")
    mac = bridge_mac(bridge)
    if mac not in _ip("link", "show", "dev", bridge).stdout:
        _ip("link", "set", bridge, "address", mac)
    cidr = f"{gateway}/{subnet.prefixlen}"
    if cidr not in _ip("-4", "addr", "show", "dev", bridge).stdout:
        _ip("addr", "add", cidr, "dev", bridge)
    _ip("link", "set", bridge, "up")
    ensure_guard(subnet)
    _sysctl("net.ipv4.ip_forward", "1")
    # DNAT from 127.0.0.1 into a container routes loopback-sourced packets out of the
    # bridge and their answers in: allowed on this bridge only. It would also let a
    # container reach 127.0.0.1 through its gateway; the firewall's INPUT guard drops that.
    _sysctl(f"net.ipv4.conf.{bridge}.route_localnet", "1")


def ensure_guard(subnet: ipaddress.IPv4Network) -> None:
    _ip("route", "replace", "unreachable", str(subnet), "metric", str(GUARD_METRIC))


def remove_bridge(bridge: str) -> None:
    """Delete a bridge this node created; absent is fine.

    The subnet's guard route stays: a late packet to a container address (a user, a
    retry, a stale DNS entry) must fail here, not follow the default route off the board.
    """
    _ip("link", "del", bridge, check=False)


def delete_link(name: str) -> None:
    """Delete a network interface; absent is fine."""
    _ip("link", "del", name, check=False)


def bridge_mac(bridge: str) -> str:
    """The bridge's own MAC, fixed. Left to the kernel, a bridge takes the lowest MAC of
    its ports and changes it as containers come and go, which flushes the host's
    neighbour table and makes every container's cached gateway MAC stale."""
    h = hashlib.sha256(bridge.encode()).digest()
    return f"02:65:6e:{h[0]:02x}:{h[1]:02x}:fe"  # container MACs end in :01


def pin_neighbour(address: str, mac: str, bridge: str) -> None:
    """Tell the host the container's MAC before it starts.

    Addresses are reused (lowest free first) while each server has its own MAC. The
    host's neighbour entry left by the previous holder of the address can stay
    "reachable" for up to ~45 s, and until then the new container's SYNs go to a MAC
    nobody has: a handshake right after a termination failed with "sshd not up after
    20 s" about one time in five."""
    pin_neighbour_begin(address, mac, bridge)()


def pin_neighbour_begin(address: str, mac: str, bridge: str) -> Callable[[], None]:
    """`pin_neighbour` in a child process, so that it overlaps the container's create;
    the returned function waits for it (NetworkError if it failed)."""
    args = ["neigh", "replace", address, "lladdr", mac, "dev", bridge, "nud", "reachable"]
    proc = subprocess.Popen(["ip", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)

    def finish() -> None:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise NetworkError(f"ip {' '.join(args)}: {err.strip()}")
    return finish


def neighbour(address: str) -> str:
    """The host's neighbour entry for an address, as `ip neigh` prints it ("none")."""
    return _ip("neigh", "show", address, check=False).stdout.strip() or "none"


def master(ifname: str) -> str:
    """The bridge a link is a port of ("none"; "gone" when the link is)."""
    try:
        return os.path.basename(os.readlink(f"/sys/class/net/{ifname}/master"))
    except FileNotFoundError:
        return "none" if os.path.exists(f"/sys/class/net/{ifname}") else "gone"


def host_veth(server_id: str) -> str:
    """The host-side name of a server's veth (fixed, so its guard exists before it does)."""
    return f"en{server_id}"[:15]


def mac_address(server_id: str) -> str:
    """A server's MAC on the bridge: locally administered, derived from its id."""
    b = bytes.fromhex(server_id[:8].rjust(8, "0"))
    return "02:" + ":".join(f"{x:02x}" for x in b) + ":01"


def wait_tcp(host: str, port: int, timeout: float = 10.0, interval: float = 0.005) -> float:
    """Block until host:port accepts a TCP connection; returns the seconds it took."""
    t0 = time.monotonic()
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return time.monotonic() - t0
        except OSError:
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"nothing accepts on {host}:{port} after {timeout}s") from None
            time.sleep(interval)


def port_is_bindable(port: int) -> bool:
    """True when no other process on the host listens on this TCP port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def pick_ports(
    port_range: tuple[int, int],
    taken: Iterable[int],
    count: int,
    usable: Callable[[int], bool] = port_is_bindable,
) -> list[int] | None:
    """`count` free host ports from the range, lowest first; None if there are not enough."""
    taken = set(taken)
    chosen: list[int] = []
    for port in range(port_range[0], port_range[1] + 1):
        if port in taken or not usable(port):
            continue
        chosen.append(port)
        if len(chosen) == count:
            return chosen
    return None if count else []


def free_port_count(port_range: tuple[int, int], taken: Iterable[int]) -> int:
    return port_range[1] - port_range[0] + 1 - len(set(taken))


def pick_address(
    subnet: ipaddress.IPv4Network, taken: Iterable[str]
) -> ipaddress.IPv4Address | None:
    """The lowest container address not taken; the first host is the bridge's gateway."""
    taken = set(taken)
    hosts = subnet.hosts()
    next(hosts)  # the gateway
    for addr in hosts:
        if str(addr) not in taken:
            return addr
    return None
