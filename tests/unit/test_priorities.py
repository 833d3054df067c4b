"""Dynamic priorities: the rule, its bound, and what it changes in a round (who is served
first and who is evicted for whom)."""

from __future__ import annotations

import pytest
from test_autoscaler_plan import HIGH, FakeManager, snap, srv, summary

from enorm.autoscaler import Options
from enorm.control_loop import run_round
from enorm.priorities import Rule, apply, boost, effective
from enorm.protocol import TerminationReason as Why

RULE = Rule(users_step=100, max_boost=1, idle_after_s=600)


@pytest.mark.parametrize(("server", "expected_boost", "expected"), [
    (srv("calm", 5, lat=10.0, users=5, idle=0.0), 0, 5),
    (srv("slow", 5, lat=HIGH, users=5, idle=0.0), 1, 6),
    (srv("big", 5, lat=10.0, users=100, idle=0.0), 1, 6),
    (srv("slow-big", 5, lat=HIGH, users=500, idle=0.0), 2, 6),  # bounded at +1
    (srv("unused", 5, lat=None, users=0, idle=0.0), -1, 4),
    (srv("quiet", 5, lat=10.0, users=5, idle=300.0), -1, 4),  # half the idle timeout
    (srv("slow-quiet", 5, lat=HIGH, users=5, idle=400.0), 0, 5),
    (srv("floor", 0, lat=None, users=0), -1, 0),  # never below 0
    (srv("unmeasured", 5, lat=None, users=5, idle=None), 0, 5),
])  # fmt: skip
def test_the_rule(server, expected_boost, expected):
    assert boost(server, RULE) == expected_boost
    assert effective(server, RULE) == expected


def test_a_wider_bound_and_bad_rules():
    s = srv("slow-big", 5, lat=HIGH, users=500)
    assert effective(s, Rule(users_step=100, max_boost=2)) == 7
    assert effective(s, Rule(users_step=100, max_boost=0)) == 5  # the declared priority
    for bad in ({"users_step": 0}, {"max_boost": -1}, {"idle_after_s": 0}):
        with pytest.raises(ValueError):
            Rule(**bad)


def test_apply_keeps_the_declared_priority():
    out = apply(snap([srv("A", 5, lat=HIGH), srv("B", 7, users=0)]), RULE)
    assert [(s.id, s.priority, s.declared_priority) for s in out.servers] == [
        ("A", 6, 5), ("B", 6, 7)]


def test_a_busy_server_is_served_before_an_unused_one_of_higher_priority():
    """Room for one more unit: with declared priorities the unused server of priority 6
    would evict nobody and the slow server of priority 5 gets nothing; with dynamic
    priorities the slow one (6) ranks above the unused one (5), and with no room left it
    evicts it (strictly lower now)."""
    servers = [srv("slow", 5, lat=HIGH, users=50, created=1.0),
               srv("unused", 6, lat=10.0, users=50, idle=400.0, created=0.0)]
    paper = run_round(lambda: snap(servers, free=(0, 0)), FakeManager())
    assert summary(paper.actions) == []  # slow cannot evict a higher priority
    opts = Options(dynamic_priorities=True, priority_users_step=100, idle_after_s=600)
    m = FakeManager()
    dyn = run_round(lambda: snap(servers, free=(0, 0)), m, opts)
    assert summary(dyn.actions) == [("term", "unused", Why.EVICTED_FOR_HIGHER_PRIORITY),
                                    ("up", "slow", (2.0, 400))]
    up = dyn.actions[1]
    assert up.numbers["priority"] == 6 and up.numbers["declared_priority"] == 5
    assert {s.id: (s.priority, s.declared_priority) for s in dyn.snapshot.servers} == {
        "slow": (6, 5), "unused": (5, 6)}


def test_options_from_config_carry_the_mode():
    class Cfg:
        dynamic_priorities = True
        priority_users_step = 250

    o = Options.from_config(Cfg())
    assert o.dynamic_priorities and o.priority_users_step == 250
    assert not Options().dynamic_priorities
    with pytest.raises(ValueError):
        Options(priority_users_step=0)
