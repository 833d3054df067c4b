"""bench.provisioning's quarters: how a series grows as a run goes (the handshake with
the servers held grows, the floor one at a time does not)."""

from __future__ import annotations

from bench.provisioning import quarters


def test_quarters_are_the_medians_of_each_quarter_in_order():
    xs = [0.010] * 5 + [0.020] * 5 + [0.030] * 5 + [0.040] * 5
    assert quarters(xs) == [10.0, 20.0, 30.0, 40.0]


def test_a_short_series():
    assert quarters([0.001, 0.002, 0.003, 0.004, 0.100]) == [1.0, 2.0, 3.0, 4.0]
    assert quarters([0.005, 0.006]) == [5.0, 6.0]  # fewer than four: each as it is
