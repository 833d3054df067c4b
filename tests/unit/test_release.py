"""A terminated server's release (enorm.release): what it held stays held until its
undo has run, a failed undo keeps it held and is retried until it succeeds, and
admission sees it taken."""

from __future__ import annotations

import threading

from nodes import eventually

from enorm import release
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
    r.close()


def test_a_failed_release_is_retried_after_each_wait_then_with_each_retry(monkeypatch):
    monkeypatch.setattr(release, "RETRY_S", (0.01, 0.02))
    r = Releases()
    r.hold("a", Held("enorm-x-a", "10.0.0.5", frozenset({30001})))
    tries = []

    def undo() -> None:
        tries.append(1)
        if len(tries) <= 3:  # the first and both timed retries fail
            raise OSError("umount: target is busy")

    r.submit("a", undo)
    assert eventually(lambda: len(tries) == 3, 5)
    r.drain()
    assert r.ports() == {30001} and r.retries == 2  # no more waits: held until `retry`
    r.retry()
    r.drain()
    assert len(tries) == 4 and r.held() == [] and r.retries == 3


def test_admission_sees_a_releasing_servers_address_and_ports_taken():
    node = Node.__new__(Node)
    node.releases = Releases()
    node.releases.hold("a", Held("enorm-x-a", "10.0.0.5", frozenset({30001})))
    assert node.taken_ports([]) == {30001}
    assert node.taken_addresses([]) == {"10.0.0.5"}


def test_a_termination_waits_while_the_backlog_is_full(monkeypatch):
    """Under churn faster than the worker, what is held stays bounded: the submit that
    would queue more than BACKLOG waits until the worker has made room."""
    monkeypatch.setattr(release, "BACKLOG", 2)
    r = Releases()
    go = threading.Event()
    r.submit("first", go.wait)  # the worker runs it: the queue itself is empty
    assert eventually(lambda: r._queue.qsize() == 0, 5)
    r.submit("a", lambda: None)
    r.submit("b", lambda: None)  # two wait behind the first: the backlog is full
    third = threading.Thread(target=r.submit, args=("c", lambda: None))
    third.start()
    third.join(0.3)
    assert third.is_alive()  # it waits for room
    go.set()
    third.join(5)
    assert not third.is_alive()
    r.drain()
    r.close()
