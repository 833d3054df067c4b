"""The soak's verdict on the daemon's RSS over cycles (bench/soak.py `rss_trend`)."""

from __future__ import annotations

import random

from bench.soak import TREND_MIN_CYCLES, rss_trend


def series(cycles: int, kb_per_cycle: float, noise_mb: float = 0.3) -> list[dict]:
    """An RSS sample every 5 cycles: a warm-up step, then a slope, with noise."""
    rng = random.Random(1)
    return [{"cycle": c, "rss_mb": 70 + min(c, 500) / 100 + c * kb_per_cycle / 1024
             + rng.uniform(0, noise_mb)} for c in range(0, cycles + 1, 5)]


def test_a_flat_rss_after_the_warm_up_passes():
    t = rss_trend(series(10_000, 0.0), 10_000)
    assert t["judged"] and t["flat"]
    assert abs(t["rise_last_third_mb"]) < 0.2 and t["spread_last_two_thirds_mb"] < 0.5


def test_the_issues_leak_fails():
    # 0.8 KB per cycle, as the issue measured: 2.6 MB over the last third of 10,000.
    t = rss_trend(series(10_000, 0.8), 10_000)
    assert t["judged"] and not t["flat"]
    assert 2.3 < t["rise_last_third_mb"] < 2.9 and 750 < t["kb_per_1000_cycles"] < 850


def test_a_short_run_is_reported_not_judged():
    t = rss_trend(series(TREND_MIN_CYCLES - 5, 0.8), TREND_MIN_CYCLES - 5)
    assert not t["judged"]
    assert rss_trend([], 24) == {"judged": False, "why": "too few samples"}
