"""The paced load's schedule (bench.load.pace): one request a period at a random moment
of it, a slow request skipping the periods it overran instead of catching up."""

from __future__ import annotations

import random

import pytest

from bench.load import PACE_S, pace


def test_one_request_a_period_at_its_drawn_moment():
    due, nxt = pace(100.0, 100.0, 0, 0.25)
    assert due == pytest.approx(100.0 + 0.25 * PACE_S) and nxt == 1
    due, nxt = pace(100.0, due + 0.01, nxt, 0.9)  # a quick request: the next period
    assert due == pytest.approx(100.0 + 1.9 * PACE_S) and nxt == 2


def test_a_slow_request_skips_the_periods_it_overran():
    # the request of period 1 ended 3.2 periods in: the next goes in period 3, not 2
    due, nxt = pace(0.0, 3.2 * PACE_S, 2, 0.5)
    assert due == pytest.approx(3.5 * PACE_S) and nxt == 4
    # its moment in the current period has passed: it goes now (the caller's sleep is 0)
    due, nxt = pace(0.0, 3.7 * PACE_S, 2, 0.1)
    assert due < 3.7 * PACE_S and nxt == 4


def test_no_user_keeps_a_place_in_the_period():
    """Two users' moments relative to each other change from period to period (with
    fixed places, a set of users kept its neighbours, and what they cost it)."""
    a, b = random.Random("near-g0-/13"), random.Random("near-g0-/0")
    gaps = []
    pa = pb = 0
    for _ in range(200):
        da, pa = pace(0.0, pa * PACE_S, pa, a.random())
        db, pb = pace(0.0, pb * PACE_S, pb, b.random())
        gaps.append(da - db)
    assert min(gaps) < -0.3 * PACE_S and max(gaps) > 0.3 * PACE_S
    # and the same users of another load process draw otherwise
    assert random.Random("near-g1-/13").random() != random.Random("near-g0-/13").random()
