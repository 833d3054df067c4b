"""The test harness's own logic (tests/nodes.py): node numbers held across processes and
given back, and a fixture that takes every node down and names every failure."""

from __future__ import annotations

import subprocess
import sys

import pytest
from nodes import _held, down_all, node_index, release_index

TAKEN_ELSEWHERE = """
import fcntl, os, sys
fd = os.open(f"/run/enorm-test-nodes/{sys.argv[1]}", os.O_CREAT | os.O_RDWR, 0o600)
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    print("free")
except BlockingIOError:
    print("held")
"""


def elsewhere(n: int) -> str:
    """What another test process finds number n to be."""
    return subprocess.run([sys.executable, "-c", TAKEN_ELSEWHERE, str(n)], check=True,
                          capture_output=True, text=True).stdout.strip()


def test_a_number_is_held_until_released_and_never_given_twice():
    a, b = node_index(), node_index()
    try:
        assert a != b and elsewhere(a) == elsewhere(b) == "held"
        release_index(a)
        assert elsewhere(a) == "free" and a not in _held
        assert elsewhere(b) == "held"  # not released: still this process's
    finally:
        release_index(a)
        release_index(b)


class FakeNode:
    def __init__(self, name: str, fails: bool):
        self.name, self.fails, self.downed = name, fails, False

    def down(self) -> None:
        self.downed = True
        if self.fails:
            raise RuntimeError(f"node {self.name}: left on the machine: ...")


def test_every_node_is_taken_down_and_every_failure_named():
    nodes = [FakeNode("t1", True), FakeNode("t2", False), FakeNode("t3", True)]
    with pytest.raises(pytest.fail.Exception) as failed:
        down_all(nodes)
    assert all(n.downed for n in nodes)
    assert "node t1" in str(failed.value) and "node t3" in str(failed.value)
    assert "node t2" not in str(failed.value)
    down_all([FakeNode("t4", False)])  # nothing failed: nothing raised
