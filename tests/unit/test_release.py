"""A terminated server's release (enorm.release): what it held stays held until its
undo has run, a failed undo keeps it held, and admission sees it taken."""

from __future__ import annotations

import threading

from enorm.node import Node
from enorm.release import Held, Releases


def test_held_until_the_undo_has_run_and_kept_when_it_fails():
    r = Releases()
    go = threading.Event()
    r.hold("a", Held("enorm-x-a", "10.0.0.5", frozenset({30001, 30002})))
    r.hold("b", Held("enorm-x-b", "10.0.0.6", frozenset({30003})))
    r.submit("a", go.wait)
    r.submit("b", lambda: 1 / 0)
    assert r.addresses() == {"10.0.0.5", "10.0.0.6"}
    assert r.ports() == {30001, 30002, 30003}
    go.set()
    r.drain()
    assert [h.container for h in r.held()] == ["enorm-x-b"]  # its undo failed: still held
    assert r.ports() == {30003}


def test_admission_sees_a_releasing_servers_address_and_ports_taken():
    node = Node.__new__(Node)
    node.releases = Releases()
    node.releases.hold("a", Held("enorm-x-a", "10.0.0.5", frozenset({30001})))
    assert node.taken_ports([]) == {30001}
    assert node.taken_addresses([]) == {"10.0.0.5"}
