"""iptables port forwards into the containers: the only module that calls iptables.

Layout per node (nat table unless noted), so that one node's rules never touch another's:
- chain ENORM-<NODE>: one DNAT rule per forwarded port, commented `enorm:<node>:<server>`;
  jumped to from PREROUTING (traffic from outside) and OUTPUT (clients on this host).
- chain ENORM-<NODE>-P (POSTROUTING): MASQUERADE of 127.0.0.0/8 -> the subnet, so that
  a client on 127.0.0.1 gets its answers back through the DNAT.
- chain ENORM-<NODE>-F (filter FORWARD): containers answer but start nothing outside the
  host: tenants cannot send traffic off the board.
Changes go through `iptables-restore --noflush`, one atomic batch per operation.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
import subprocess
from dataclasses import dataclass

_COMMENT = re.compile(r'--comment "?enorm:(?P<node>[a-z0-9]+):(?P<sid>[a-z0-9]+)"?')


class FirewallError(RuntimeError):
    """iptables refused a change; the message has its error."""


@dataclass(frozen=True)
class Forward:
    """One forwarded port: host port -> container address and port."""

    host_port: int
    address: str
    port: int


def _iptables(*args: str) -> str:
    proc = subprocess.run(["iptables", "-w", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise FirewallError(f"iptables {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def _restore(batches: dict[str, list[str]]) -> None:
    text = ""
    for table, lines in batches.items():
        if lines:
            text += f"*{table}\n" + "\n".join(lines) + "\nCOMMIT\n"
    if not text:
        return
    proc = subprocess.run(
        ["iptables-restore", "-w", "--noflush"], input=text, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise FirewallError(f"iptables-restore: {proc.stderr.strip()}\n{text}")


class Firewall:
    """The forwards of one edge node."""

    def __init__(self, node: str, subnet: ipaddress.IPv4Network) -> None:
        self.node = node
        self.subnet = str(subnet)
        self.chain = f"ENORM-{node.upper()}"
        self.post = f"{self.chain}-P"
        self.fwd = f"{self.chain}-F"

    def _tag(self, sid: str) -> str:
        return f"enorm:{self.node}:{sid}"

    def _chain_exists(self, table: str, chain: str) -> bool:
        return (
            subprocess.run(
                ["iptables", "-w", "-t", table, "-n", "-L", chain], capture_output=True
            ).returncode
            == 0
        )

    def setup(self) -> None:
        """Create the node's chains and jumps (idempotent)."""
        nat: list[str] = []
        flt: list[str] = []
        node_tag = f'-m comment --comment "enorm:{self.node}"'
        for table, chain, lines in ((
            "nat", self.chain, nat), ("nat", self.post, nat), ("filter", self.fwd, flt)):
            if not self._chain_exists(table, chain):
                lines.append(f":{chain} - [0:0]")
        jumps = [
            ("nat", "PREROUTING", f"-m addrtype --dst-type LOCAL {node_tag} -j {self.chain}"),
            ("nat", "OUTPUT", f"-m addrtype --dst-type LOCAL {node_tag} -j {self.chain}"),
            ("nat", "POSTROUTING", f"{node_tag} -j {self.post}"),
            ("filter", "FORWARD", f"{node_tag} -j {self.fwd}"),
        ]
        existing = {t: _jumps(_iptables("-t", t, "-S")) for t in ("nat", "filter")}
        for table, parent, rule in jumps:
            if (parent, rule.rsplit("-j ", 1)[1]) not in existing[table]:
                (nat if table == "nat" else flt).append(f"-A {parent} {rule}")
        _restore({"nat": nat, "filter": flt})
        # The chains' fixed content, replaced whole (flush + refill in one batch).
        _restore(
            {
                "nat": [
                    f"-F {self.post}",
                    f"-A {self.post} -s 127.0.0.0/8 -d {self.subnet} {node_tag} -j MASQUERADE",
                ],
                "filter": [
                    f"-F {self.fwd}",
                    f"-A {self.fwd} -d {self.subnet} {node_tag} -j ACCEPT",
                    f"-A {self.fwd} -s {self.subnet} -m conntrack --ctstate ESTABLISHED,RELATED"
                    f" {node_tag} -j ACCEPT",
                    f"-A {self.fwd} -s {self.subnet} {node_tag} -j DROP",
                ],
            }
        )

    def _rule(self, sid: str, f: Forward) -> str:
        return (
            f"-p tcp -m tcp --dport {f.host_port} -m comment --comment \"{self._tag(sid)}\" "
            f"-j DNAT --to-destination {f.address}:{f.port}"
        )

    def rules(self) -> dict[str, list[str]]:
        """The node's DNAT rules now, by server id (as `iptables -S` prints them)."""
        out: dict[str, list[str]] = {}
        for line in _iptables("-t", "nat", "-S", self.chain).splitlines():
            m = _COMMENT.search(line)
            if line.startswith("-A ") and m and m["node"] == self.node:
                out.setdefault(m["sid"], []).append(line[len(f"-A {self.chain} "):])
        return out

    def add(self, sid: str, forwards: list[Forward]) -> None:
        """Forward the server's ports; rules already there are not added twice."""
        present = set(self.rules().get(sid, []))
        lines = [f"-A {self.chain} {self._rule(sid, f)}" for f in forwards]
        lines = [ln for ln in lines if ln[len(f"-A {self.chain} "):] not in present]
        _restore({"nat": lines})

    def remove(self, sid: str) -> int:
        """Remove every rule tagged with the server id; returns how many there were."""
        lines = [f"-D {self.chain} {r}" for r in self.rules().get(sid, [])]
        _restore({"nat": lines})
        return len(lines)

    def reconcile(self, expected: dict[str, list[Forward]]) -> dict[str, int]:
        """Make the rules equal `expected`: drop other servers' rules, add missing ones."""
        current = self.rules()
        removed = added = 0
        lines: list[str] = []
        for sid, rules in current.items():
            want = {self._rule(sid, f) for f in expected.get(sid, [])}
            for r in rules:
                if r not in want:
                    lines.append(f"-D {self.chain} {r}")
                    removed += 1
        for sid, forwards in expected.items():
            have = set(current.get(sid, []))
            for f in forwards:
                r = self._rule(sid, f)
                if r not in have:
                    lines.append(f"-A {self.chain} {r}")
                    added += 1
        _restore({"nat": lines})
        return {"removed": removed, "added": added}

    def teardown(self) -> None:
        """Remove the node's chains and jumps entirely (node decommissioned, tests)."""
        for table, parent, chain in (
            ("nat", "PREROUTING", self.chain),
            ("nat", "OUTPUT", self.chain),
            ("nat", "POSTROUTING", self.post),
            ("filter", "FORWARD", self.fwd),
        ):
            for line in _iptables("-t", table, "-S", parent).splitlines():
                if line.endswith(f"-j {chain}"):
                    _iptables("-t", table, "-D", *shlex.split(line)[1:])
        for table, chain in (("nat", self.chain), ("nat", self.post), ("filter", self.fwd)):
            if self._chain_exists(table, chain):
                _iptables("-t", table, "-F", chain)
                _iptables("-t", table, "-X", chain)


def _jumps(listing: str) -> set[tuple[str, str]]:
    """(parent chain, target) of every rule in an `iptables -S` listing."""
    out = set()
    for line in listing.splitlines():
        if line.startswith("-A ") and " -j " in line:
            out.add((line.split()[1], line.rsplit("-j ", 1)[1]))
    return out
