"""Id ranges of unprivileged containers: registration in /etc/subuid and /etc/subgid,
and the machine-wide claims of slots (files only)."""

from __future__ import annotations

import os
import time

import lxc
import pytest

from enorm import idmap, preflight
from enorm.containers import Containers
from enorm.idmap import RANGE, IdRange, Slots


def etc(tmp_path, subuid: str, subgid: str):
    (tmp_path / "etc").mkdir(exist_ok=True)
    (tmp_path / "etc/subuid").write_text(subuid)
    (tmp_path / "etc/subgid").write_text(subgid)
    return tmp_path


def test_range_and_lxc_items():
    r = IdRange(1_200_000_000, 4 * RANGE)
    assert r.slots == 4
    assert r.host_base(3) == 1_200_000_000 + 3 * RANGE
    assert r.lxc_items(1) == [f"u 0 {1_200_000_000 + RANGE} {RANGE}",
                              f"g 0 {1_200_000_000 + RANGE} {RANGE}"]


def test_registered_needs_the_whole_range_for_root_in_both_files(tmp_path):
    r = IdRange(1_200_000_000, 16 * RANGE)
    root = etc(tmp_path, "_lxd:100000:10000001\nroot:100000:10000001\n"
                         f"root:1200000000:{16 * RANGE}\n",
               f"root:1100000000:{2000 * RANGE}\n")  # a wider range covers it too
    assert idmap.registered(r, root) == []
    root = etc(tmp_path, f"root:1200000000:{8 * RANGE}\n",  # too short
               f"someone:1200000000:{16 * RANGE}\n")  # not root's
    assert idmap.registered(r, root) == ["/etc/subuid", "/etc/subgid"]
    f = preflight.check_idmap(root, r, live=False)
    assert len(f) == 1 and not f[0].ok and "root:1200000000:1048576" in f[0].fix


def test_slots_are_distinct_released_and_taken_over_when_stale(tmp_path):
    slots = Slots(tmp_path, IdRange(1_200_000_000, 3 * RANGE))
    alive = {"a", "b", "c"}
    got = [slots.claim(n, alive.__contains__) for n in ("a", "b", "c")]
    assert got == [0, 1, 2]
    assert slots.of("b") == 1
    with pytest.raises(idmap.IdmapError, match="all 3 id ranges"):
        slots.claim("d", alive.__contains__)
    slots.release("b")
    assert slots.of("b") is None
    assert slots.claim("d", alive.__contains__) == 1
    # "a" is gone without releasing (a crash): young claims are kept (its container may
    # be being made), old ones are taken over.
    alive.discard("a")
    with pytest.raises(idmap.IdmapError):
        slots.claim("e", alive.__contains__)
    old = time.time() - idmap.STALE_CLAIM_S - 1
    os.utime(slots.dir / "0", (old, old))
    assert slots.claim("e", alive.__contains__) == 0
    assert slots.of("e") == 0 and slots.of("a") is None


def test_a_claim_looks_past_the_last_one_and_wraps_around(tmp_path):
    """A node's next claim starts after its last one, so that a busy node does not look
    up every old claim's owner in LXC on each launch; it still wraps around to a slot
    freed below, and a slot another process holds is never taken."""
    slots = Slots(tmp_path, IdRange(1_200_000_000, 4 * RANGE))
    looked_up: list[str] = []

    def alive(owner: str) -> bool:
        looked_up.append(owner)
        return True

    assert [slots.claim(n, alive) for n in ("a", "b", "c")] == [0, 1, 2]
    old = time.time() - idmap.STALE_CLAIM_S - 1
    for f in slots.dir.glob("[0-9]"):
        os.utime(f, (old, old))  # old claims: each met on the way is looked up
    assert slots.claim("d", alive) == 3 and looked_up == []
    other = Slots(tmp_path, IdRange(1_200_000_000, 4 * RANGE))  # another process
    other.release("b")
    assert slots.claim("e", alive) == 1  # wrapped around, past the old claim of a
    assert looked_up == ["a"]
    with pytest.raises(idmap.IdmapError):  # every other claim met once, none taken
        slots.claim("f", alive)
    assert looked_up == ["a", "c", "a"]  # d and e are young: not looked up
    slots.release("c")  # its own release: the next claim starts there
    looked_up.clear()
    assert slots.claim("f", alive) == 2 and looked_up == []
    assert other.of("f") == 2 and slots.of("f") == 2
    (slots.dir / "2").write_text("g")  # taken over elsewhere: the remembered slot is not
    assert slots.of("f") is None and slots.of("g") == 2


def test_an_old_claim_of_a_container_lxc_cannot_load_stands(tmp_path):
    """Another node's container whose config LXC cannot load (being written or removed,
    or left by a crash) keeps its id range; LXC's error did fail the claimer's launch."""
    ids = IdRange(1_200_000_000, 2 * RANGE)
    mine = Containers(tmp_path, "enorm-tx-", "enorm-base-x", ids=ids)
    other = tmp_path / "enorm-ty-c1"
    other.mkdir()
    (other / "config").write_text("lxc.no.such.key = 1\n")
    gone = "enorm-ty-c2"  # no directory at all: its claim is taken over
    for owner in ("enorm-ty-c1", gone):
        mine.slots.claim(owner, alive=lambda _: True)
    old = time.time() - idmap.STALE_CLAIM_S - 1
    for f in (tmp_path / ".enorm-idmap").glob("[0-9]"):
        os.utime(f, (old, old))
    with pytest.raises(RuntimeError):
        lxc.Container("enorm-ty-c1", str(tmp_path))
    assert mine.slots.claim("enorm-tx-a", mine._claim_holds) == 1  # c2's, not c1's
