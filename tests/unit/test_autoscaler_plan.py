"""plan() of the auto-scaler (Procedures 5 and 6), one table row per branch; apply() and
the scheduling wrapper with fakes."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import pytest

from enorm.autoscaler import (
    NodeSnapshot,
    Options,
    ScaleDown,
    ScaleUp,
    ServerSnapshot,
    Snapshot,
    Terminate,
    apply,
    plan,
)
from enorm.control_loop import ControlLoop, run_round
from enorm.protocol import Resources
from enorm.protocol import ScaleReason as Scaled
from enorm.protocol import TerminationReason as Why
from enorm.resources import Amount

UNIT = Amount(1.0, 200.0)


def srv(
    id: str,
    priority: int = 10,
    cores: float = 1.0,
    mem: int = 200,
    *,
    lat: float | None = None,
    obj: float = 100.0,
    users: int = 5,
    idle: float | None = 0.0,
    override: bool = False,
    term: str = "single",
    owner: str = "cloud",
    app: str = "game",
    created: float = 0.0,
    improvable: bool = True,
) -> ServerSnapshot:
    return ServerSnapshot(
        id=id,
        priority=priority,
        limits=Resources(cores=cores, memory_mb=mem),
        users=users,
        latency_objective_ms=obj,
        latency_ms=lat,
        idle_for_s=idle,
        override=override,
        termination=term,  # type: ignore[arg-type]
        owner=owner,
        app=app,
        created_at=created,
        improvable=improvable,
    )


def snap(servers, free=(0.0, 0.0), unit=UNIT, minimum=None) -> Snapshot:
    return Snapshot(NodeSnapshot(Amount(*free), unit, minimum), tuple(servers))


def summary(actions) -> list[tuple]:
    out = []
    for x in actions:
        if isinstance(x, ScaleUp):
            out.append(("up", x.server_id, (x.new_limits.cores, x.new_limits.memory_mb)))
        elif isinstance(x, ScaleDown):
            out.append(("down", x.server_id, (x.new_limits.cores, x.new_limits.memory_mb)))
        else:
            out.append(("term", x.server_id, x.reason))
    return out


HIGH, LOW = 150.0, 50.0  # latency above / below the default objective of 100 ms

CASES = [
    # --- Procedure 6: scale up
    (
        "scale up with a free unit (P6.1)",
        snap([srv("A", lat=HIGH)], free=(1, 200)),
        Options(),
        [("up", "A", (2.0, 400))],
    ),
    (
        "scale up by evicting one lower-priority server (P6.2)",
        snap([srv("A", 10, lat=HIGH), srv("B", 5)], free=(0, 0)),
        Options(),
        [("term", "B", Why.EVICTED_FOR_HIGHER_PRIORITY), ("up", "A", (2.0, 400))],
    ),
    (
        "scale up by evicting several, lowest first; equal priority is never evicted",
        snap(
            [srv("A", 10, 2, 400, lat=HIGH), srv("D", 10, created=5), srv("B", 5), srv("C", 1)],
            free=(0, 0),
            unit=Amount(2.0, 400.0),
            minimum=UNIT,
        ),
        Options(),
        [("term", "C", Why.EVICTED_FOR_HIGHER_PRIORITY),
         ("term", "B", Why.EVICTED_FOR_HIGHER_PRIORITY), ("up", "A", (4.0, 800))],
    ),
    (
        "nothing lower to evict: leave it (P6.3)",
        snap([srv("H", 20), srv("A", 10, lat=HIGH), srv("E", 10, created=1)], free=(0.5, 500)),
        Options(),
        [],
    ),
    (
        "evicting all lower is not enough: the paper evicts anyway, then leaves it",
        snap([srv("A", 10, lat=HIGH), srv("B", 5)], free=(-0.5, 0), minimum=Amount(0.5, 100)),
        Options(),
        [("term", "B", Why.EVICTED_FOR_HIGHER_PRIORITY)],
    ),
    (
        "skip_futile_evictions keeps the lower server when eviction cannot make room",
        snap([srv("A", 10, lat=HIGH), srv("B", 5)], free=(-0.5, 0), minimum=Amount(0.5, 100)),
        Options(skip_futile_evictions=True),
        [],
    ),
    (
        "free resources carry over: the second server finds no unit left",
        snap([srv("A", 10, lat=HIGH), srv("B", 10, lat=HIGH, created=1)], free=(1, 200)),
        Options(),
        [("up", "A", (2.0, 400))],
    ),
    (
        "a scale down higher up frees the unit a lower server then takes",
        snap([srv("A", 10, 2, 400, lat=LOW), srv("B", 5, lat=HIGH)], free=(0, 0)),
        Options(),
        [("down", "A", (1.0, 200)), ("up", "B", (2.0, 400))],
    ),
    (
        "ties: the older server ranks first and gets the only unit",
        snap(
            [srv("new", 10, lat=HIGH, created=200), srv("old", 10, lat=HIGH, created=100)],
            free=(1, 200),
        ),
        Options(),
        [("up", "old", (2.0, 400))],
    ),
    (
        "separate CPU / memory steps",
        snap([srv("A", lat=HIGH)], free=(4, 4000)),
        Options(cpu_step=0.5, memory_step_mb=100),
        [("up", "A", (1.5, 300))],
    ),
    # --- P5.9: scale down
    (
        "scale down by one unit",
        snap([srv("A", 10, 3, 600, lat=LOW)]),
        Options(),
        [("down", "A", (2.0, 400))],
    ),
    (
        "floor at one unit: nothing to release",
        snap([srv("A", 10, 1, 200, lat=LOW)]),
        Options(),
        [],
    ),
    (
        "floor at one unit: a partial step stops at the unit, per dimension",
        snap([srv("A", 10, 1.5, 200, lat=LOW)]),
        Options(),
        [("down", "A", (1.0, 200))],
    ),
    (
        "latency at the objective or unknown: no change",
        snap([srv("A", 10, 2, 400, lat=100.0), srv("B", 5, 2, 400, lat=None)], free=(5, 5000)),
        Options(),
        [],
    ),
    (
        "hysteresis: 85 ms is inside a 20% band below 100 ms -> keep",
        snap([srv("A", 10, 2, 400, lat=85.0)]),
        Options(hysteresis=0.2),
        [],
    ),
    (
        "hysteresis: 75 ms is below the band -> scale down",
        snap([srv("A", 10, 2, 400, lat=75.0)]),
        Options(hysteresis=0.2),
        [("down", "A", (1.0, 200))],
    ),
    (
        "without hysteresis (the paper) 85 ms scales down",
        snap([srv("A", 10, 2, 400, lat=85.0)]),
        Options(),
        [("down", "A", (1.0, 200))],
    ),
    # --- P5.3-P5.4: resource check
    (
        "resource check fails in the middle: that server and all below go",
        snap([srv("A", 30), srv("B", 20, lat=HIGH), srv("C", 10), srv("D", 5)], free=(-2.5, -500)),
        Options(),
        [
            ("term", "B", Why.INSUFFICIENT_RESOURCES),
            ("term", "C", Why.INSUFFICIENT_RESOURCES),
            ("term", "D", Why.INSUFFICIENT_RESOURCES),
        ],
    ),
    (
        "resource check in memory alone",
        snap([srv("A", 30), srv("B", 20)], free=(3, -150)),
        Options(),
        [("term", "B", Why.INSUFFICIENT_RESOURCES)],
    ),
    (
        "resource check ignores the override flag",
        snap([srv("A", 30), srv("B", 20, override=True)], free=(-0.5, 0)),
        Options(),
        [("term", "B", Why.INSUFFICIENT_RESOURCES)],
    ),
    # --- P5.5-P5.6: need check
    (
        "idle for the configured time",
        snap([srv("A", idle=600.0, lat=HIGH), srv("B", 5, idle=599.0)], free=(1, 200)),
        Options(idle_after_s=600),
        [("term", "A", Why.IDLE)],
    ),
    (
        "no users covered",
        snap([srv("A", users=0, lat=HIGH)], free=(1, 200)),
        Options(),
        [("term", "A", Why.NO_USERS)],
    ),
    (
        "latency not improvable by the edge",
        snap([srv("A", lat=HIGH, improvable=False)], free=(1, 200)),
        Options(),
        [("term", "A", Why.LATENCY_NOT_IMPROVABLE)],
    ),
    (
        "override: need-check terminations skipped, scaling still happens",
        snap(
            [srv("A", users=0, idle=9999, improvable=False, override=True, lat=HIGH)],
            free=(1, 200),
        ),
        Options(),
        [("up", "A", (2.0, 400))],
    ),
    (
        "a terminated server frees room for the servers after it",
        snap([srv("A", 10, 2, 400, users=0), srv("B", 5, lat=HIGH)], free=(0, 0)),
        Options(),
        [("term", "A", Why.NO_USERS), ("up", "B", (2.0, 400))],
    ),
    # --- termination mode "multiple"
    (
        "multiple: an idle server takes its siblings (same owner+app) along",
        snap(
            [
                srv("A", 10, idle=9999, term="multiple", owner="x", app="g"),
                srv("S", 3, owner="x", app="g"),
                srv("O", 3, owner="y", app="g"),
                srv("P", 3, owner="x", app="h"),
            ]
        ),
        Options(),
        [("term", "A", Why.IDLE), ("term", "S", Why.SIBLING_TERMINATED)],
    ),
    (
        "multiple: evicting one server evicts its siblings with it",
        snap(
            [
                srv("A", 10, lat=HIGH),
                srv("B", 5, owner="x"),
                srv("D", 3, owner="z"),
                srv("C", 1, term="multiple", owner="x"),
            ],
            free=(0, 0),
        ),
        Options(),
        [("term", "C", Why.EVICTED_FOR_HIGHER_PRIORITY), ("term", "B", Why.SIBLING_TERMINATED),
         ("up", "A", (2.0, 400))],
    ),
    (
        "single (default): siblings stay",
        snap([srv("A", 10, idle=9999, owner="x"), srv("S", 3, owner="x")]),
        Options(),
        [("term", "A", Why.IDLE)],
    ),
    (
        "empty node",
        snap([], free=(2, 2000)),
        Options(),
        [],
    ),
]


@pytest.mark.parametrize(
    "snapshot,options,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_plan(snapshot, options, expected):
    assert summary(plan(snapshot, options)) == expected


def test_plan_is_pure_and_deterministic():
    s = snap([srv("A", 10, 2, 400, lat=LOW), srv("B", 5, lat=HIGH), srv("C", 1)], free=(0, 0))
    before = repr(s)
    assert plan(s) == plan(s)
    assert repr(s) == before


def test_scale_up_records_evictions_and_numbers():
    s = snap([srv("A", 10, lat=HIGH), srv("B", 5), srv("C", 1)], free=(0, 0))
    up = plan(s)[-1]
    assert isinstance(up, ScaleUp)
    assert up.requires == ("C",)
    assert up.numbers["latency_ms"] == HIGH
    assert up.numbers["latency_objective_ms"] == 100.0
    assert up.numbers["free_cores"] == 1.0  # after the eviction, before the scale up


def test_resource_termination_numbers_name_the_cause():
    s = snap([srv("A", 30), srv("B", 20), srv("C", 10)], free=(-1.5, 0))
    acts = plan(s)
    assert summary(acts) == [("term", "B", Why.INSUFFICIENT_RESOURCES),
                             ("term", "C", Why.INSUFFICIENT_RESOURCES)]
    assert acts[1].numbers["ranked_below"] == "B"
    assert acts[0].numbers["available_cores"] == pytest.approx(0.5)


def test_snapshot_rejects_duplicate_ids():
    with pytest.raises(ValueError):
        snap([srv("A"), srv("A")])


def test_options_validation_and_config():
    with pytest.raises(ValueError):
        Options(hysteresis=1.0)

    class Cfg:
        idle_after_s = 42.0
        autoscale_interval_s = 300.0

    assert Options.from_config(Cfg()).idle_after_s == 42.0


# ----------------------------------------------------------------------------- apply


class FakeManager:
    def __init__(self, fail: set[str] = frozenset()) -> None:
        self.fail = fail
        self.calls: list[tuple] = []

    def scale(self, server_id, limits, reason, numbers):
        self.calls.append(("scale", server_id, limits.cores, limits.memory_mb, reason))
        if server_id in self.fail:
            raise RuntimeError(f"cgroup write failed for {server_id}")

    def terminate(self, server_id, reason, numbers):
        self.calls.append(("terminate", server_id, reason))
        if server_id in self.fail:
            raise RuntimeError(f"migration failed for {server_id}")


def test_apply_continues_after_a_failure():
    acts = [
        Terminate("X", Why.IDLE),
        ScaleDown("Y", Resources(cores=1, memory_mb=200), Scaled.LATENCY_BELOW_OBJECTIVE),
        ScaleUp("Z", Resources(cores=2, memory_mb=400), Scaled.LATENCY_ABOVE_OBJECTIVE),
    ]
    m = FakeManager(fail={"Y"})
    res = apply(acts, m)
    assert [r.ok for r in res] == [True, False, True]
    assert "cgroup write failed" in res[1].error
    assert [c[1] for c in m.calls] == ["X", "Y", "Z"]


def test_apply_skips_a_scale_up_whose_eviction_failed():
    acts = plan(snap([srv("A", 10, lat=HIGH), srv("B", 5)], free=(0, 0)))
    m = FakeManager(fail={"B"})
    res = apply(acts, m)
    assert [(r.ok, r.skipped) for r in res] == [(False, False), (False, True)]
    assert m.calls == [("terminate", "B", Why.EVICTED_FOR_HIGHER_PRIORITY)]


def test_apply_passes_limits_reason_numbers():
    m = FakeManager()
    apply(plan(snap([srv("A", lat=HIGH)], free=(1, 200))), m)
    assert m.calls == [("scale", "A", 2.0, 400, Scaled.LATENCY_ABOVE_OBJECTIVE)]


# ----------------------------------------------------------------------------- rounds


def test_run_round_wires_snapshot_plan_apply():
    m = FakeManager()
    r = run_round(lambda: snap([srv("A", users=0)]), m)
    assert r.error is None
    assert summary(r.actions) == [("term", "A", Why.NO_USERS)]
    assert m.calls == [("terminate", "A", Why.NO_USERS)]


def test_run_round_survives_a_failing_snapshot():
    def boom():
        raise OSError("cgroup gone")

    r = run_round(boom, FakeManager())
    assert r.snapshot is None and r.actions == () and "cgroup gone" in r.error


def test_control_loop_run_once_and_from_config():
    class Cfg:
        idle_after_s = 10.0
        autoscale_interval_s = 300.0

    seen = []
    s = ControlLoop.from_config(
        Cfg(), lambda: snap([srv("A", idle=11.0)]), FakeManager(), on_round=seen.append
    )
    assert s.interval_s == 300.0 and s.options.idle_after_s == 10.0
    r = s.run_once()
    assert summary(r.actions) == [("term", "A", Why.IDLE)]
    assert seen == [r] and s.last is r


def test_control_loop_runs_in_background_without_overlap():
    active = 0
    peak = 0
    rounds = 0
    lock = threading.Lock()

    def slow_snapshot():
        nonlocal active, peak, rounds
        with lock:
            active += 1
            peak = max(peak, active)
        time.sleep(0.12)  # longer than the interval: runs must not overlap
        with lock:
            active -= 1
            rounds += 1
        return snap([])

    s = ControlLoop(slow_snapshot, FakeManager(), interval_s=0.05)
    s.start(first_run_in_s=0.0)
    try:
        job = s.job(ControlLoop.JOB_ID)
        assert job.max_instances == 1 and job.coalesce is True
        deadline = time.monotonic() + 5
        while rounds < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        s.shutdown()
    assert rounds >= 2
    assert peak == 1
    assert not s.running


def test_amount_helpers():
    assert Amount(1, 2) + Amount(0.5, 1) == Amount(1.5, 3)
    assert Amount(1, 200).covers(Amount(1, 200))
    assert not Amount(0.99, 200).covers(Amount(1, 200))
    assert Amount(-1, 5).resources() == Resources(cores=0, memory_mb=5)
    assert replace(srv("A"), priority=3).priority == 3
