"""Scored placement (cloud_manager/placement.py): the cost and the order, from tables."""

from __future__ import annotations

import pytest

from cloud_manager.placement import (
    Candidate,
    Summary,
    Weights,
    base_cost,
    cost,
    order,
    summary_candidate,
)

W = Weights()


def test_cost_adds_latency_load_room_and_preemption():
    base = Candidate("a", latency_ms=10.0, free_units=3.0, load=0.5)
    assert cost(base, W) == pytest.approx(10.0 + 0.2 * 50 + 0.2 * 100 / 4)
    assert cost(Candidate("b", latency_ms=None, free_units=3.0), W) == pytest.approx(
        1000.0 + 0.2 * 25)  # unknown latency counts as the loss penalty
    pre = Candidate("c", latency_ms=10.0, free_units=0.0, needs_preemption=True)
    assert cost(pre, W) == pytest.approx(10.0 + 20.0 + 50.0)


@pytest.mark.parametrize(("cands", "expected"), [
    # nearer wins
    ([Candidate("far", 80.0, 4), Candidate("near", 10.0, 4)], ["near", "far"]),
    # a busy near node loses to a quiet one a little farther away
    ([Candidate("near", 10.0, 4, load=1.0), Candidate("mid", 20.0, 4)], ["mid", "near"]),
    # one that cannot admit goes last, however near
    ([Candidate("full", 1.0, 0, admits=False), Candidate("far", 200.0, 1)], ["far", "full"]),
    # ties keep the configured order
    ([Candidate("x", 10.0, 2), Candidate("y", 10.0, 2)], ["x", "y"]),
])
def test_scored_order(cands, expected):
    assert order(cands, "scored") == expected


def test_first_keeps_the_configured_order():
    cands = [Candidate("far", 80.0, 4), Candidate("near", 10.0, 4)]
    assert order(cands, "first") == ["far", "near"]
    with pytest.raises(ValueError, match="unknown placement"):
        order(cands, "random")  # type: ignore[arg-type]


def test_weights_are_checked_and_steer_the_choice():
    with pytest.raises(ValueError, match="latency"):
        Weights(latency=-1)
    cands = [Candidate("near-busy", 10.0, 4, load=2.0), Candidate("far-idle", 60.0, 4)]
    assert order(cands, "scored", Weights(load=0.0))[0] == "near-busy"
    assert order(cands, "scored", Weights(load=1.0))[0] == "far-idle"


@pytest.mark.parametrize("s", [
    Summary(free_units=3.0, load=0.5, min_priority=0, preempt=False),
    Summary(free_units=0.0, load=1.2, min_priority=0, preempt=True),  # pre-empts to admit
    Summary(free_units=8.0, load=0.0, min_priority=7, preempt=False),
])
def test_base_cost_is_the_cost_but_the_latency(s):
    # the registry's rank and the final order are one cost: the rank's part plus latency
    for w in (W, Weights(load=1.0, free=0.0, priority=2.0, latency=3.0)):
        c = summary_candidate("n", s, priority=9, latency_ms=12.0)
        assert cost(c, w) == pytest.approx(base_cost(s, w) + w.latency * 12.0)


def test_base_cost_puts_a_node_that_admits_nothing_after_every_other():
    full = Summary(free_units=0.2, load=0.0, min_priority=0, preempt=False)
    worst = Summary(free_units=1.0, load=50.0, min_priority=0, preempt=True)
    assert not summary_candidate("full", full, 9).admits
    assert base_cost(full, W) > base_cost(worst, W) + 1000
    # the priority is the request's: a node above it does not admit this one
    picky = Summary(free_units=4.0, load=0.0, min_priority=6, preempt=False)
    assert summary_candidate("p", picky, 5).admits is False
    assert summary_candidate("p", picky, 6).admits is True
