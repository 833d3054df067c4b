"""The soak's verdict (bench/soak.py `rss_trend`, `verdict`): the daemon's RSS over
cycles; failed, refused and left-over cycles."""

from __future__ import annotations

import random

from bench.soak import TREND_MIN_CYCLES, rss_trend, verdict


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


def test_failed_refused_and_left_over_cycles_fail_the_soak():
    clean = {"containers": [], "records": 0, "ports_held": 0, "mounts": []}
    flat = rss_trend(series(10_000, 0.0), 10_000)
    ok = {"errors": 0, "error_samples": [], "refused": 0, "leftovers": clean,
          "samples_over_capacity": 0, "rss_trend": flat}
    assert verdict(ok) == []
    # The run that found the loop-device race: 4 terminations answered 500 and kept
    # their units, every later handshake refused, 4 records and 8 ports left.
    bad = {**ok, "errors": 4, "error_samples": ["DiskError"] * 4, "refused": 2367,
           "leftovers": {**clean, "records": 4, "ports_held": 8}}
    failed = verdict(bad)
    assert len(failed) == 3 and "4 cycles failed" in failed[0]
    assert "2367 handshakes refused" in failed[1]
    assert "'records': 4" in failed[2] and "'ports_held': 8" in failed[2]
    assert verdict({**ok, "samples_over_capacity": 2}) == ["2 samples over capacity"]
    assert "not flat" in verdict({**ok, "rss_trend": rss_trend(series(10_000, 0.8),
                                                                 10_000)})[0]
