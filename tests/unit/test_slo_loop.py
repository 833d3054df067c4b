"""The fast mode's latency loop (`autoscaler.slo_plan`) and its place in the control loop."""

from __future__ import annotations

import pytest
from test_autoscaler_plan import HIGH, FakeManager, snap, srv, summary

from enorm import autoscaler as a
from enorm.autoscaler import Options, SloOptions, plan, slo_plan
from enorm.control_loop import ControlLoop
from enorm.protocol import ScaleReason as Scaled
from enorm.protocol import TerminationReason as Why

SLO = SloOptions(interval_s=1.0, hysteresis=0.3, cooldown_s=10.0, down_after_s=60.0)
LONG_AGO = {"A": 0.0, "B": 0.0}
NOW = 1000.0


def test_a_step_up_when_above_the_objective_and_a_unit_is_free():
    acts = slo_plan(snap([srv("A", lat=HIGH)], free=(1, 200)), LONG_AGO, NOW, SLO)
    assert summary(acts) == [("up", "A", (2.0, 400))]
    assert acts[0].reason == Scaled.LATENCY_ABOVE_OBJECTIVE_FAST


def test_no_evictions_in_the_fast_loop_the_round_does_those():
    s = snap([srv("A", 10, lat=HIGH), srv("B", 1)], free=(0, 0))
    assert slo_plan(s, LONG_AGO, NOW, SLO) == []
    assert [x.server_id for x in plan(s) if isinstance(x, a.Terminate)] == ["B"]


def test_the_free_step_goes_to_the_highest_priority_first():
    s = snap([srv("B", 1, lat=HIGH), srv("A", 9, lat=HIGH)], free=(1, 200))
    assert summary(slo_plan(s, LONG_AGO, NOW, SLO)) == [("up", "A", (2.0, 400))]


def test_cool_down_after_a_change():
    s = snap([srv("A", lat=HIGH)], free=(1, 200))
    assert slo_plan(s, {"A": NOW - 9.9}, NOW, SLO) == []
    assert summary(slo_plan(s, {"A": NOW - 10.0}, NOW, SLO)) == [("up", "A", (2.0, 400))]


def test_a_new_server_counts_its_cool_down_from_its_launch():
    s = snap([srv("A", lat=HIGH, created=NOW - 5)], free=(1, 200))
    assert slo_plan(s, {}, NOW, SLO) == []


def test_hysteresis_band_and_a_longer_wait_before_a_step_down():
    two = dict(cores=2.0, mem=400)
    in_band = snap([srv("A", lat=75.0, **two)])  # objective 100, band down to 70
    assert slo_plan(in_band, LONG_AGO, NOW, SLO) == []
    low = snap([srv("A", lat=50.0, **two)])
    assert slo_plan(low, {"A": NOW - 30.0}, NOW, SLO) == []  # cooled down, not 60 s yet
    assert summary(slo_plan(low, {"A": NOW - 60.0}, NOW, SLO)) == [("down", "A", (1.0, 200))]


def test_never_below_one_unit_and_never_for_the_unknown_or_unimprovable():
    servers = [srv("A", lat=10.0), srv("B", lat=None), srv("C", lat=HIGH, improvable=False)]
    assert slo_plan(snap(servers, free=(4, 800)), {}, NOW, SLO) == []


def test_slo_options_are_checked():
    with pytest.raises(ValueError, match="hysteresis"):
        SloOptions(hysteresis=1.0)
    with pytest.raises(ValueError, match="interval_s"):
        SloOptions(interval_s=0)


def test_fast_mode_leaves_latency_to_the_loop_and_keeps_the_rounds_checks():
    s = snap([srv("A", lat=HIGH), srv("Q", users=0)], free=(1, 200))
    fast = Options(latency_steps=False)
    assert summary(plan(s, fast)) == [("term", "Q", Why.NO_USERS)]
    assert ("up", "A", (2.0, 400)) in summary(plan(s))


def test_the_loop_records_changes_and_cools_each_server_down():
    clock = [NOW]
    m = FakeManager()
    loop = ControlLoop(lambda: snap([srv("A", lat=HIGH)], free=(4, 800)), m,
                       Options(latency_steps=False), slo=SLO, clock=lambda: clock[0])
    assert summary(loop.slo_tick().actions) == [("up", "A", (2.0, 400))]
    assert loop.last_change == {"A": NOW}
    clock[0] += 5.0
    assert loop.slo_tick().actions == ()  # cooling down
    clock[0] += 5.0
    assert len(loop.slo_tick().actions) == 1
    assert [c[0] for c in m.calls] == ["scale", "scale"]


def test_fast_policy_from_config_adds_the_latency_job():
    class Cfg:
        autoscale_interval_s = 300.0
        policy = "fast"
        slo_interval_s = 2.0
        slo_hysteresis = 0.2
        slo_cooldown_s = 4.0
        slo_down_after_s = 30.0

    loop = ControlLoop.from_config(Cfg(), lambda: snap([]), FakeManager())
    assert loop.slo == SloOptions(2.0, 0.2, 4.0, 30.0)
    assert loop.options.latency_steps is False
    loop.start()
    try:
        assert loop.job(ControlLoop.SLO_JOB_ID).trigger.interval.total_seconds() == 2.0
        assert loop.job(ControlLoop.JOB_ID).trigger.interval.total_seconds() == 300.0
    finally:
        loop.shutdown()
    Cfg.policy = "paper"
    paper = ControlLoop.from_config(Cfg(), lambda: snap([]), FakeManager())
    assert paper.slo is None and paper.options.latency_steps is True


def test_no_step_down_when_the_servers_cpu_use_would_crowd_the_smaller_limit():
    from dataclasses import replace

    busy = replace(srv("A", lat=20.0, cores=2.0, mem=400), cores_used=0.8)
    assert slo_plan(snap([busy]), LONG_AGO, NOW, SLO) == []  # 0.8 > 1 core * (1 - 0.3)
    light = replace(busy, cores_used=0.5)
    assert summary(slo_plan(snap([light]), LONG_AGO, NOW, SLO)) == [("down", "A", (1.0, 200))]
