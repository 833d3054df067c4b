"""Packet filters of one edge node: the only module that calls iptables and ebtables.

Layout per node, so that one node's rules never touch another's:
- nat chain ENORM-<NODE>: one DNAT rule per forwarded port, commented
  `enorm:<node>:<server>`; jumped to from PREROUTING (outside) and OUTPUT (this host).
- nat chain ENORM-<NODE>-X, jumped to from PREROUTING for any destination: transparent
  redirection, one DNAT rule per served user and intercepted destination
  (`-s <user> -d <cloud> --dport <port>` -> the container), tagged like the forwards.
- nat chain ENORM-<NODE>-P (POSTROUTING): MASQUERADE of 127.0.0.0/8 -> the subnet, so that
  a client on 127.0.0.1 gets its answers back through the DNAT; and of the subnet ->
  each `container_egress` destination beyond the board (out of another interface than
  the bridge): no router upstream knows the node's subnet, so a container's connection
  to a cloud server leaves with the board's address (found by the board lab: behind
  QEMU's user network, as on a board's LAN, the answers had nowhere to go).
- filter chain ENORM-<NODE>-I, jumped to first in INPUT: 127.0.0.0/8 from any interface
  but lo is dropped unless it answers this host's own connections (the CVE-2020-8558
  class: `route_localnet`, which the loopback DNAT needs on the bridge, would let it in);
  from the bridge, the host answers containers (replies of connections it made) but
  accepts no new connection, whatever address it is sent to (the bridge address, 0.0.0.0
  services), except the operator's `container_egress` destinations.
- filter chain ENORM-<NODE>-F, jumped to first in FORWARD for packets from the bridge
  (replies only, plus `container_egress`; so nothing between containers, of this node or
  another) and last for packets to it (forwarded ports only: conntrack state DNAT).
- filter chain ENORM-<NODE>-Z, jumped to first in FORWARD and OUTPUT (every packet: the
  later packets of a loopback client's DNATed connection were not seen there with the
  bridge as their way out; the chain is empty but during terminations): a terminating
  server's fence, one REJECT (TCP reset) per application port of its container, so that
  no user's request reaches it once its data is being merged (a connection opened before
  survives the DNAT rule's removal: conntrack keeps it).
- filter chain ENORM-<NODE>-A, jumped to first in FORWARD and OUTPUT for packets to the
  node's subnet: accounting, one rule per application port of each container (`-d
  <container> --dport <port>`, tagged, `-j RETURN`), whose packet counter is the node's
  own measure of a server's users (every packet, so a kept-alive connection counts; the
  access port's SSH does not). `counters` reads the whole chain in one call a round.
- ebtables (bridge family) nat chain ENORM-<NODE>-<SERVER> per container, keyed by its host
  veth: it may send only ARP and IPv4 from its own MAC and address (no spoofing, no ARP
  for another's address, no IPv6), and nothing it sends is bridged to another port.
- conntrack (through pyroute2's netlink socket): a server's forwards go with the
  connections they carried. Conntrack keeps a connection's NAT past its DNAT rule, so a
  client holding a keep-alive connection to a server that is gone would send into a
  container that no longer exists and wait for its timeout; forgotten, its next packet
  meets no forward and is reset, and the client connects again where it is sent.
iptables changes go through `iptables-restore --noflush`, ebtables changes through
`ebtables-restore --noflush`: one atomic batch per operation.
"""

from __future__ import annotations

import contextlib
import importlib.util
import ipaddress
import logging
import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import ModuleType

log = logging.getLogger(__name__)
# ebtables has no per-rule tags to delete by: its guards are read, compared and rewritten.
_GUARDS_LOCK = threading.Lock()
_GUARD_ATTEMPTS = 4
_COMMENT = re.compile(r'--comment "?enorm:(?P<node>[a-z0-9]+):(?P<sid>[a-z0-9]+)"?')
_DNAT_TO = re.compile(r"--to-destination (?P<address>[0-9.]+):(?P<port>[0-9]+)")
# A rule of `iptables -L -v -x -n`: its packet count first, its comment at the end.
_COUNTED = re.compile(r"^\s*(?P<packets>[0-9]+)\s.*/\* enorm:(?P<node>[a-z0-9]+):"
                      r"(?P<sid>[a-z0-9]+) \*/")


class FirewallError(RuntimeError):
    """iptables refused a change; the message has its error."""


@dataclass(frozen=True)
class Forward:
    """One forwarded port: host port -> container address and port. `counted`: its
    packets are the server's users' (an application port, not the access port's SSH)."""

    host_port: int
    address: str
    port: int
    counted: bool = True


@dataclass(frozen=True)
class Redirect:
    """A served user's connections to `address:port` -> the container's `to`."""

    user: str
    address: str
    port: int
    to_address: str
    to_port: int


@dataclass(frozen=True)
class Port:
    """A container's port on the bridge: host-side veth name, MAC and address."""

    veth: str
    mac: str
    address: str


@dataclass(frozen=True)
class Egress:
    """A TCP destination containers may open connections to (`ADDR[/N]:PORT`)."""

    net: ipaddress.IPv4Network
    port: int

    @classmethod
    def parse(cls, text: str) -> Egress:
        addr, sep, port = text.rpartition(":")
        if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"{text!r}: expected ADDR[/N]:PORT")
        return cls(ipaddress.IPv4Network(addr, strict=False), int(port))


def _iptables(*args: str) -> str:
    proc = subprocess.run(["iptables", "-w", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise FirewallError(f"iptables {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def _batch_text(batches: dict[str, list[str]]) -> str:
    return "".join(f"*{table}\n" + "\n".join(lines) + "\nCOMMIT\n"
                   for table, lines in batches.items() if lines)


def _restore_args(cmd: str) -> list[str]:
    return [cmd, "--noflush"] if cmd.startswith("ebtables") else [cmd, "-w", "--noflush"]


def _restore(batches: dict[str, list[str]], cmd: str = "iptables-restore") -> None:
    text = _batch_text(batches)
    if not text:
        return
    proc = subprocess.run(_restore_args(cmd), input=text, capture_output=True, text=True)
    if proc.returncode != 0:
        raise FirewallError(f"{cmd}: {proc.stderr.strip()}\n{text}")


def _restore_begin(batches: dict[str, list[str]], cmd: str) -> subprocess.Popen[str]:
    """`_restore` in a child process that the caller waits for (`Popen.wait`), so that
    the write overlaps the caller's next steps."""
    proc = subprocess.Popen(_restore_args(cmd), stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdin is not None
    proc.stdin.write(_batch_text(batches))
    proc.stdin.close()
    return proc


def _ebtables_save() -> list[str]:
    proc = subprocess.run(["ebtables-save"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise FirewallError(f"ebtables-save: {proc.stderr.strip()}")
    return proc.stdout.splitlines()


class Firewall:
    """The forwards and guards of one edge node."""

    def __init__(self, node: str, subnet: ipaddress.IPv4Network | str, bridge: str,
                 egress: Iterable[str] = ()) -> None:
        self.node = node
        self.subnet = str(subnet)
        self.bridge = bridge
        self.egress = [Egress.parse(e) for e in egress]
        self.chain = f"ENORM-{node.upper()}"
        self.post = f"{self.chain}-P"
        self.fwd = f"{self.chain}-F"
        self.inp = f"{self.chain}-I"
        self.xcpt = f"{self.chain}-X"
        self.fence_chain = f"{self.chain}-Z"
        self.acct = f"{self.chain}-A"

    def _tag(self, sid: str) -> str:
        return f"enorm:{self.node}:{sid}"

    def _chain_exists(self, table: str, chain: str) -> bool:
        return (
            subprocess.run(
                ["iptables", "-w", "-t", table, "-n", "-L", chain], capture_output=True
            ).returncode
            == 0
        )

    def _jumps(self) -> list[tuple[str, str]]:
        """(table, rule) of every jump into the node's chains; `-I` puts a guard first."""
        tag = f'-m comment --comment "enorm:{self.node}"'
        local, br = "-m addrtype --dst-type LOCAL", self.bridge
        return [
            ("nat", f"-A PREROUTING {local} {tag} -j {self.chain}"),
            ("nat", f"-A PREROUTING {tag} -j {self.xcpt}"),
            ("nat", f"-A OUTPUT {local} {tag} -j {self.chain}"),
            ("nat", f"-A POSTROUTING {tag} -j {self.post}"),
            ("filter", f"-I INPUT {tag} -j {self.inp}"),
            ("filter", f"-I FORWARD {tag} -j {self.fence_chain}"),
            ("filter", f"-I OUTPUT {tag} -j {self.fence_chain}"),
            ("filter", f"-I FORWARD -d {self.subnet} {tag} -j {self.acct}"),
            ("filter", f"-I OUTPUT -d {self.subnet} {tag} -j {self.acct}"),
            ("filter", f"-I FORWARD -i {br} {tag} -j {self.fwd}"),
            ("filter", f"-A FORWARD -o {br} {tag} -j {self.fwd}"),
        ]

    def _our_jumps(self, table: str) -> list[str]:
        """The node's jumps as `iptables -S` prints them (old layouts included)."""
        targets = {self.chain, self.post, self.fwd, self.inp, self.xcpt, self.fence_chain,
                   self.acct}
        return [ln for ln in _iptables("-t", table, "-S").splitlines()
                if ln.startswith("-A ") and ln.rsplit("-j ", 1)[-1] in targets]

    def setup(self) -> None:
        """Create the node's chains and (re)place their jumps and fixed content.

        One batch per table deletes the node's jumps and inserts them again, so the guards
        stay first in INPUT and FORWARD, and a node set up by an older layout is migrated.
        """
        tag = f'-m comment --comment "enorm:{self.node}"'
        batches: dict[str, list[str]] = {"nat": [], "filter": []}
        for table, chain in (("nat", self.chain), ("nat", self.post), ("nat", self.xcpt),
                             ("filter", self.fwd), ("filter", self.inp),
                             ("filter", self.fence_chain), ("filter", self.acct)):
            if not self._chain_exists(table, chain):
                batches[table].append(f":{chain} - [0:0]")
        for table in batches:
            batches[table] += ["-D" + ln[2:] for ln in self._our_jumps(table)]
        for table, rule in self._jumps():
            batches[table].append(rule)
        br, new = self.bridge, "-m conntrack --ctstate NEW"
        allow = [f"-d {e.net} -p tcp -m tcp --dport {e.port} {new}" for e in self.egress]
        from_bridge = [
            f"-i {br} -m conntrack --ctstate ESTABLISHED,RELATED {tag} -j ACCEPT",
            *(f"-i {br} {a} {tag} -j ACCEPT" for a in allow),
            f"-i {br} {tag} -j DROP",
        ]
        batches["nat"] += [
            f"-F {self.post}",
            f"-A {self.post} -s 127.0.0.0/8 -d {self.subnet} {tag} -j MASQUERADE",
            # (a destination on the board itself is delivered locally: no POSTROUTING)
            *(f"-A {self.post} -s {self.subnet} ! -o {br} -d {e.net} -p tcp -m tcp "
              f"--dport {e.port} {tag} -j MASQUERADE" for e in self.egress),
        ]
        batches["filter"] += [
            # a fence belongs to a termination under way: one resumed after a restart
            # puts it back
            f"-F {self.fence_chain}",
            f"-F {self.inp}",
            # Kubernetes' guard for the same hole: 127.0.0.0/8 arrives only on lo, or as
            # the answers of this host's own DNAT (whatever sets route_localnet where).
            f"-A {self.inp} -d 127.0.0.0/8 ! -i lo -m conntrack"
            f" ! --ctstate RELATED,ESTABLISHED,DNAT {tag} -j DROP",
            *(f"-A {self.inp} {r}" for r in from_bridge),
            f"-F {self.fwd}",
            *(f"-A {self.fwd} {r}" for r in from_bridge),
            # Users reach containers only through forwarded ports (and get replies).
            f"-A {self.fwd} -o {br} -m conntrack --ctstate ESTABLISHED,RELATED {tag} -j ACCEPT",
            f"-A {self.fwd} -o {br} -d {self.subnet} -m conntrack --ctstate DNAT {tag} -j ACCEPT",
            f"-A {self.fwd} -o {br} {tag} -j DROP",
        ]
        _restore(batches)

    def _rule(self, sid: str, f: Forward) -> str:
        return (
            f"-p tcp -m tcp --dport {f.host_port} -m comment --comment \"{self._tag(sid)}\" "
            f"-j DNAT --to-destination {f.address}:{f.port}"
        )

    def _count_rule(self, sid: str, f: Forward) -> str:
        return (f"-d {f.address}/32 -p tcp -m tcp --dport {f.port} "
                f"-m comment --comment \"{self._tag(sid)}\" -j RETURN")

    def counters(self) -> dict[str, int]:
        """Packets sent to each server's application ports since its accounting rules
        were made: one read of the accounting chain for every server of the node."""
        out: dict[str, int] = {}
        for line in _iptables("-t", "filter", "-L", self.acct, "-v", "-x", "-n").splitlines():
            m = _COUNTED.match(line)
            if m and m["node"] == self.node:
                out[m["sid"]] = out.get(m["sid"], 0) + int(m["packets"])
        return out

    def _redirect_rule(self, sid: str, r: Redirect) -> str:
        return (
            f"-s {r.user}/32 -d {r.address}/32 -p tcp -m tcp --dport {r.port} "
            f"-m comment --comment \"{self._tag(sid)}\" "
            f"-j DNAT --to-destination {r.to_address}:{r.to_port}"
        )

    def rules(self, chain: str | None = None, table: str = "nat") -> dict[str, list[str]]:
        """The node's tagged rules now (the forwards; the redirects with `self.xcpt`; the
        fences with `self.fence_chain`, "filter"), by server id (as `iptables -S` prints
        them)."""
        chain = chain or self.chain
        out: dict[str, list[str]] = {}
        for line in _iptables("-t", table, "-S", chain).splitlines():
            m = _COMMENT.search(line)
            if line.startswith("-A ") and m and m["node"] == self.node:
                out.setdefault(m["sid"], []).append(line[len(f"-A {chain} "):])
        return out

    def redirect(self, sid: str, redirects: list[Redirect]) -> None:
        """Send the served users' connections to the container (idempotent)."""
        present = set(self.rules(self.xcpt).get(sid, []))
        lines = [f"-A {self.xcpt} {ln}" for ln in (self._redirect_rule(sid, r)
                                                   for r in redirects) if ln not in present]
        _restore({"nat": lines})

    def unredirect(self, sid: str) -> int:
        """Remove the server's redirects (first thing in a termination)."""
        lines = [f"-D {self.xcpt} {r}" for r in self.rules(self.xcpt).get(sid, [])]
        _restore({"nat": lines})
        return len(lines)

    def fence(self, sid: str, address: str, ports: Iterable[int]) -> None:
        """Refuse every packet to the container's `ports` with a TCP reset (idempotent):
        its users' clients fail at once and go back to the cloud, and no request that
        arrives after this reaches the server whose data is being merged."""
        present = set(self.rules(self.fence_chain, "filter").get(sid, []))
        lines = [f"-d {address}/32 -p tcp -m tcp --dport {p} -m comment --comment "
                 f"\"{self._tag(sid)}\" -j REJECT --reject-with tcp-reset" for p in ports]
        _restore({"filter": [f"-A {self.fence_chain} {ln}" for ln in lines
                             if ln not in present]})

    def unfence(self, sid: str) -> int:
        lines = [f"-D {self.fence_chain} {r}"
                 for r in self.rules(self.fence_chain, "filter").get(sid, [])]
        _restore({"filter": lines})
        return len(lines)

    def add(self, sid: str, forwards: list[Forward], new: bool = False) -> None:
        """Forward the server's ports and count its users' packets; rules already there
        are not added twice. `new`: the server id has no rules yet (a handshake's), so
        the chains are not read first (each read is an `iptables -S` of a chain that
        grows with the servers)."""
        present = set() if new else set(self.rules().get(sid, []))
        lines = [f"-A {self.chain} {self._rule(sid, f)}" for f in forwards]
        lines = [ln for ln in lines if ln[len(f"-A {self.chain} "):] not in present]
        counted = set() if new else set(self.rules(self.acct, "filter").get(sid, []))
        _restore({"nat": lines,
                  "filter": [f"-A {self.acct} {r}" for f in forwards if f.counted
                             if (r := self._count_rule(sid, f)) not in counted]})

    def remove(self, sid: str, redirects: bool = False) -> int:
        """Remove every rule tagged with the server id, its accounting included (and its
        redirects, for a server that has some: each chain read costs an `iptables -S`);
        returns how many forwards and redirects there were."""
        chains = (self.chain, self.xcpt) if redirects else (self.chain,)
        rules = [(chain, r) for chain in chains for r in self.rules(chain).get(sid, [])]
        _restore({"nat": [f"-D {chain} {r}" for chain, r in rules],
                  "filter": [f"-D {self.acct} {r}"
                             for r in self.rules(self.acct, "filter").get(sid, [])]})
        # off the termination's path: a client's packet that comes first is retransmitted
        # (200 ms on) after the forgetting, and reset then
        gone = {(m["address"], int(m["port"])) for _, r in rules if (m := _DNAT_TO.search(r))}
        if gone:
            threading.Thread(target=_forget_logged, args=(gone,), daemon=True,
                             name="forget-connections").start()
        return len(rules)

    def reconcile(self, expected: dict[str, list[Forward]],
                  redirects: dict[str, list[Redirect]] | None = None) -> dict[str, int]:
        """Make the rules equal `expected` (and the redirects `redirects`): drop other
        servers' rules, add missing ones."""
        want = {("nat", self.chain): {sid: [self._rule(sid, f) for f in fs]
                                      for sid, fs in expected.items()},
                ("nat", self.xcpt): {sid: [self._redirect_rule(sid, r) for r in rs]
                                     for sid, rs in (redirects or {}).items()},
                ("filter", self.acct): {sid: [self._count_rule(sid, f) for f in fs
                                              if f.counted]
                                        for sid, fs in expected.items()}}
        removed = added = 0
        lines: dict[str, list[str]] = {"nat": [], "filter": []}
        for (table, chain), rules_by_sid in want.items():
            current = self.rules(chain, table)
            for sid, rules in current.items():
                keep = set(rules_by_sid.get(sid, []))
                for r in rules:
                    if r not in keep:
                        lines[table].append(f"-D {chain} {r}")
                        removed += 1
            for sid, rules in rules_by_sid.items():
                have = set(current.get(sid, []))
                for r in rules:
                    if r not in have:
                        lines[table].append(f"-A {chain} {r}")
                        added += 1
        _restore(lines)
        return {"removed": removed, "added": added}

    def teardown(self) -> None:
        """Remove the node's chains, jumps and guards entirely (node decommissioned, tests)."""
        batches: dict[str, list[str]] = {}
        for table, chains in (("nat", (self.chain, self.post, self.xcpt)),
                              ("filter", (self.fwd, self.inp, self.fence_chain, self.acct))):
            lines = ["-D" + ln[2:] for ln in self._our_jumps(table)]
            for chain in chains:
                if self._chain_exists(table, chain):
                    lines += [f"-F {chain}", f"-X {chain}"]
            batches[table] = lines
        _restore(batches)
        self.reconcile_guards({})

    # -- per-container guards on the bridge (ebtables) -----------------------------------
    def _guard_chain(self, sid: str) -> str:
        return f"{self.chain}-{sid.upper()}"

    def guards(self) -> dict[str, list[tuple[str, str]]]:
        """The node's bridge guards now: server id -> its (table, line) pairs, as
        `ebtables-save` prints them. One pass over the lines (each guard's chain, its
        rules, its jump and its veth's drop found by a lookup, not a scan of the table
        per guard: a handshake reads them all, and there may be many)."""
        prefix = f"{self.chain}-"
        tables: dict[str, list[str]] = {}
        table = ""
        for ln in _ebtables_save():
            if ln.startswith("*"):
                table = ln[1:]
            elif ln and not ln.startswith("#"):
                tables.setdefault(table, []).append(ln)
        nat, flt = tables.get("nat", []), Counter(tables.get("filter", []))
        out: dict[str, list[tuple[str, str]]] = {}
        chains: dict[str, list[tuple[str, str]]] = {}  # guard chain -> its lines
        jumps: list[tuple[str, str]] = []  # (jump line, its chain)
        for ln in nat:
            if ln.startswith(f":{prefix}"):
                chains[ln[1:].split()[0]] = [("nat", ln)]
        for ln in nat:
            if ln.startswith(f"-A {prefix}"):
                chain = ln.split()[1]
                if chain in chains:
                    chains[chain].append(("nat", ln))
            elif (ln.startswith("-A PREROUTING -i ") and (chain := ln.split()[-1]) in chains
                  and ln.endswith(f" -j {chain}")):
                jumps.append((ln, chain))
        for ln, chain in jumps:
            drop = f"-A FORWARD -i {ln.split()[3]} -j DROP"
            chains[chain] += [("nat", ln)] + [("filter", drop)] * flt[drop]
        for chain, mine in chains.items():
            out[chain[len(prefix):].lower()] = mine
        return out

    def _guard_lines(self, sid: str, p: Port) -> list[tuple[str, str]]:
        """Checked as frames enter the bridge (nat PREROUTING), before the bridge learns
        their source MAC, so a spoofed frame cannot even move another's MAC to its port."""
        chain = self._guard_chain(sid)
        return [
            ("nat", f":{chain} DROP"),
            ("nat", f"-A {chain} -p ARP -s {p.mac} --arp-ip-src {p.address}"
                    f" --arp-mac-src {p.mac} -j RETURN"),
            ("nat", f"-A {chain} -p IPv4 -s {p.mac} --ip-src {p.address} -j RETURN"),
            ("nat", f"-A {chain} -j DROP"),
            ("nat", f"-A PREROUTING -i {p.veth} -j {chain}"),
            ("filter", f"-A FORWARD -i {p.veth} -j DROP"),
        ]

    def guard(self, sid: str, port: Port) -> None:
        """Pin the container's port to its MAC and address (before it starts; idempotent)."""
        self.reconcile_guards({sid: port}, only=[sid])

    def guard_begin(self, sid: str, port: Port) -> Callable[[], None]:
        """Start writing the guard of a server id that has none yet (a handshake's), in a
        child process and without reading the tables first (the read grows with the
        guards), so that it overlaps the container's create; the returned function waits
        for it and, if the write failed, falls back to `guard`'s read and compare. (A chain
        of that name left by a crash is emptied by the declaration; the node's start
        removes such leftovers first anyway.)"""
        batches: dict[str, list[str]] = {"nat": [], "filter": []}
        for table, ln in self._guard_lines(sid, port):
            batches[table].append(ln)
        proc = _restore_begin(batches, "ebtables-restore")

        def finish() -> None:
            if proc.wait() != 0:
                self.guard(sid, port)
        return finish

    def unguard(self, sid: str) -> None:
        """Remove the server's guard (its container is destroyed); absent is fine."""
        self.reconcile_guards({}, only=[sid])

    def unguard_begin(self, sid: str, port: Port) -> Callable[[], None]:
        """Start removing the guard that `guard(sid, port)` made, in a child process and
        without reading the tables first (a termination overlaps it with LXC's delete);
        the returned function waits for it and, if the tables were not as expected
        (already gone, changed by hand), falls back to `unguard`'s read and compare."""
        want = self._guard_lines(sid, port)
        batches: dict[str, list[str]] = {"nat": [], "filter": []}
        for table, ln in want:  # the jump and the rules first, then the chain
            if ln.startswith("-A "):
                batches[table].append("-D" + ln[2:])
        batches["nat"].append(f"-X {self._guard_chain(sid)}")
        proc = _restore_begin(batches, "ebtables-restore")

        def finish() -> None:
            if proc.wait() != 0:
                self.unguard(sid)
        return finish

    def reconcile_guards(self, expected: dict[str, Port],
                         only: Iterable[str] | None = None) -> dict[str, int]:
        """Make the node's guards equal `expected` (restricted to the ids in `only`).

        Read, compare and write under one lock: two handshakes or terminations at once
        must not both delete a rule they both saw (the second restore would fail). The
        lock does not cover other processes' nf_tables changes (iptables-nft here, other
        nodes on the machine): ebtables-nft then sometimes fails to find a rule it has
        just read (the soak saw 2 in 40 terminations), so a failed write is read and
        compared again, which is safe because the whole operation is idempotent."""
        with _GUARDS_LOCK:
            for attempt in range(_GUARD_ATTEMPTS):
                try:
                    return self._reconcile_guards(expected, only)
                except FirewallError:
                    if attempt == _GUARD_ATTEMPTS - 1:
                        raise
                    time.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    def _reconcile_guards(self, expected: dict[str, Port],
                          only: Iterable[str] | None) -> dict[str, int]:  # fmt: skip
        current = self.guards()
        ids = set(only) if only is not None else set(current) | set(expected)
        batches: dict[str, list[str]] = {"nat": [], "filter": []}
        removed = added = 0
        for sid in sorted(ids):
            want = self._guard_lines(sid, expected[sid]) if sid in expected else []
            have = current.get(sid, [])
            if sorted(have) == sorted(want):
                continue
            if have:  # rules first, then the chain
                for table, ln in have:
                    if ln.startswith("-A "):
                        batches[table].append("-D" + ln[2:])
                batches["nat"] += [f"-X {ln[1:].split()[0]}" for t, ln in have if ln[0] == ":"]
                removed += 1
            for table, ln in want:
                batches[table].append(ln)
            added += bool(want)
        _restore(batches, cmd="ebtables-restore")
        return {"removed": removed, "added": added}


def _forget_logged(destinations: set[tuple[str, int]]) -> None:
    try:
        forget_connections(destinations)
    except Exception:  # noqa: BLE001 (a thread of its own: say it, the node goes on)
        log.exception("forgetting the connections to %s failed", sorted(destinations))


def forget_connections(destinations: set[tuple[str, int]]) -> int:
    """Conntrack forgets every TCP connection NATed to one of these (container address,
    port): the next packet of a client that kept one open meets no forward and is reset,
    rather than follow the old NAT to a container that is gone. Returns how many."""
    if not destinations:
        return 0
    conntrack, exceptions, nfctsocket = _pyroute2_conntrack()
    Conntrack, NetlinkError = conntrack.Conntrack, exceptions.NetlinkError
    NFCTAttrTuple = nfctsocket.NFCTAttrTuple

    with Conntrack() as ct:  # the kernel filters (by the whole reply source: faster)
        stale = [e for address, port in destinations
                 for e in ct.dump_entries(tuple_reply=NFCTAttrTuple(
                     saddr=address, sport=port, proto=socket.IPPROTO_TCP))
                 if (e.tuple_reply.saddr, e.tuple_reply.sport) == (address, port)]  # fmt: skip
        for e in stale:
            with contextlib.suppress(NetlinkError):  # ended meanwhile
                ct.delete(e)
    return len(stale)


_PYROUTE2_LOCK = threading.Lock()
_PYROUTE2_PARTS = ("pyroute2.conntrack", "pyroute2.netlink.exceptions",
                   "pyroute2.netlink.nfnetlink.nfctsocket")


def _pyroute2_conntrack() -> tuple[ModuleType, ...]:
    """The three pyroute2 modules conntrack needs, without the package's `__init__`: that
    one imports every netlink family pyroute2 has (IPDB, NDB with sqlite3, ethtool,
    nftables, unittest.mock): 7.7 MB of the daemon's RSS for the 0.6 MB used here
    (measured, pyroute2 0.9; on a 1 GB board the daemon has 80 MB). The package stands
    bare in `sys.modules` only while they load, so a later `import pyroute2` anywhere
    in the process gets the whole one."""
    with _PYROUTE2_LOCK:
        bare = None
        if "pyroute2" not in sys.modules:
            spec = importlib.util.find_spec("pyroute2")
            assert spec is not None
            bare = sys.modules["pyroute2"] = importlib.util.module_from_spec(spec)
        try:
            return tuple(importlib.import_module(m) for m in _PYROUTE2_PARTS)
        finally:
            if bare is not None and sys.modules.get("pyroute2") is bare:
                del sys.modules["pyroute2"]
