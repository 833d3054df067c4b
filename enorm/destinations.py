"""Egress policy: where a cloud manager may make the node connect (no SSRF).

A setup request names two places the node will connect to on the tenant's behalf: its
`callback_url` (events) and its `data_sink` (the merge back); a direct handover names a
third, the other node's API (`to_url`). The operator lists, per cloud manager, which
destinations those may name; anything else is refused with the field named
before any connection or name lookup. Loopback and unix sockets pass only when an entry
names them itself, and the node's own store and API never pass.

Entries (strings in the node config):
  "10.0.0.0/8"            any port of a network      "10.1.2.3:6379"     one address and port
  "10.0.0.0/8:6379"       one port of a network      "[fd00::1]:6379"    IPv6 with a port
  "cloud.example:6379"    a host name, by name only  "unix:/run/cloud.sock"  one socket path
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from urllib.parse import urlsplit

IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address
_LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
DEFAULT_PORTS = {"http": 80, "https": 443, "redis": 6379, "rediss": 6379}


class Refused(ValueError):
    """A destination the policy does not allow; `field` is the request field."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(reason)
        self.field = field


@dataclass(frozen=True)
class Allowed:
    """One allow-list entry: a network, a host name or a socket path, with a port or any."""

    net: IPNet | None = None
    name: str | None = None
    path: str | None = None
    port: int | None = None

    @classmethod
    def parse(cls, entry: str) -> Allowed:
        """Read one entry; raises ValueError saying what is wrong with it."""
        if entry.startswith("unix:"):
            path = entry.removeprefix("unix:")
            if not path.startswith("/"):
                raise ValueError(f"{entry!r}: a unix socket needs an absolute path")
            return cls(path=os.path.normpath(path))
        host, port = entry, None
        if entry.startswith("["):
            host, _, rest = entry[1:].partition("]")
            port = _port(entry, rest.removeprefix(":")) if rest else None
        elif entry.count(":") == 1:
            host, _, p = entry.partition(":")
            port = _port(entry, p)
        try:
            return cls(net=ipaddress.ip_network(host, strict=False), port=port)
        except ValueError:
            pass
        if port is None or not host or "/" in host:
            raise ValueError(f"{entry!r}: a host name needs a port (name:port)") from None
        return cls(name=host.lower(), port=port)

    def admits(self, host: IPAddr | str, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        if isinstance(host, str):
            return self.name == host.lower()
        if self.net is None or host.version != self.net.version or host not in self.net:
            return False
        # A broad network (0.0.0.0/0) does not open loopback: only an entry within it does.
        return not _is_loopback(host) or any(self.net.subnet_of(lo) for lo in _LOOPBACK
                                              if lo.version == self.net.version)


def _port(entry: str, text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"{entry!r}: the port must be within 1-65535")
    return int(text)


def _is_loopback(ip: IPAddr) -> bool:
    return ip.is_loopback or ip.is_unspecified  # 0.0.0.0 reaches the host itself


def _address(host: str) -> IPAddr | str:
    """An IP literal as an address (IPv4-mapped IPv6 unwrapped), or the name as it is."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class Policy:
    """The operator's allow-lists, per cloud manager ("*": every cloud manager)."""

    def __init__(self, allowed: dict[str, list[str]], *, own_sockets: list[str],
                 own_ports: list[tuple[str, int]]) -> None:
        self.allowed = {owner: [Allowed.parse(e) for e in entries]
                        for owner, entries in allowed.items()}
        self.own_sockets = {os.path.realpath(p) for p in own_sockets}
        self.own_ports = {(_address(h), p) for h, p in own_ports}

    def _entries(self, owner: str) -> list[Allowed]:
        return self.allowed.get(owner, []) + self.allowed.get("*", [])

    def check_url(self, owner: str, field: str, url: str) -> None:
        """Raise Refused unless `url` names a destination `owner` may use."""
        try:
            parts = urlsplit(url)
        except ValueError as exc:  # e.g. "redis://[": an unclosed IPv6 literal
            raise Refused(field, f"not a URL: {exc}") from None
        if parts.scheme == "unix":
            path = os.path.normpath(parts.path or "/")
            if os.path.realpath(path) in self.own_sockets:
                raise Refused(field, "the node's own store is not a destination")
            if not any(a.path == path for a in self._entries(owner)):
                raise Refused(field, f"unix socket {path} is not in the operator's "
                                     f"destinations for {owner}")
            return
        try:
            port = parts.port or DEFAULT_PORTS.get(parts.scheme)
        except ValueError:
            raise Refused(field, "the port is not a number within 0-65535") from None
        if not parts.hostname or port is None:
            raise Refused(field, "must name a host (an IP address) and a port")
        host = _address(parts.hostname)
        if (host, port) in self.own_ports or (
                not isinstance(host, str) and _is_loopback(host)
                and any(not isinstance(h, str) and _is_loopback(h) and p == port
                        for h, p in self.own_ports)):
            raise Refused(field, "the node's own services are not a destination")
        if not any(a.admits(host, port) for a in self._entries(owner)):
            what = "host name" if isinstance(host, str) else "address"
            raise Refused(field, f"{what} {parts.hostname} port {port} is not in the "
                                 f"operator's destinations for {owner}")
