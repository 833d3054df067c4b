"""plan() of the cloud manager's policy, one table row per rule; the hysteresis over
several rounds; the location model and the grouping by nearest node."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from cloud_manager.policy import (
    DeploymentView,
    GroupView,
    NodeView,
    Settings,
    Snapshot,
    State,
    distance_km,
    expected_ms,
    groups_by_nearest,
    next_due,
    plan,
    request_ms,
    upcoming,
)

S = Settings(offload_gain_ms=10, withdraw_gain_ms=5, handover_gain_ms=5, dwell_s=4,
             withdraw_dwell_s=4, down_bound_s=30, idle_after_s=600)
UP = (NodeView("a", True), NodeView("b", True))


def grp(name="g", users=("u1", "u2"), cloud=40.0, a=None, b=None, **kw) -> GroupView:
    return GroupView(name, frozenset(users), cloud_ms=cloud, node_ms={"a": a, "b": b}, **kw)


def dep(group="g", node="a", users=("u1", "u2"), sid=None, units=1.0) -> DeploymentView:
    return DeploymentView(group, f"s-{group}" if sid is None else sid, node, frozenset(users),
                          units)


def summary(decisions) -> list[tuple]:
    return [(d.kind, d.group, d.node if d.kind != "handover" else d.to, str(d.reason))
            for d in decisions]


def one(groups, deps=(), nodes=UP, state=None, now=100.0, settings=S, opted_out=(), busy=()):
    snap = Snapshot(now, tuple(groups), tuple(nodes), tuple(deps), frozenset(opted_out),
                    frozenset(busy))
    return plan(snap, state or State(), settings)


ROWS = {
    # O: offload by threshold
    "offload when a node beats the cloud by the threshold":
        ([grp(a=5.0, b=20.0)], [], {}, [("offload", "g", "a", "edge_pays")]),
    "no offload under the threshold":
        ([grp(cloud=14.0, a=5.0)], [], {}, []),
    "offload at exactly the threshold":
        ([grp(cloud=15.0, a=5.0)], [], {}, [("offload", "g", "a", "edge_pays")]),
    "the nearest node that admits":
        ([grp(a=5.0, b=8.0)], [], {"nodes": (NodeView("a", True, admits=False),
                                            NodeView("b", True))},
         [("offload", "g", "b", "edge_pays")]),
    "never a node that is down":
        ([grp(a=5.0)], [], {"nodes": (NodeView("a", False), NodeView("b", True))}, []),
    "unknown latency decides nothing":
        ([grp(a=None, b=None)], [], {}, []),
    "unknown cloud latency decides nothing":
        ([grp(cloud=None, a=1.0)], [], {}, []),
    "an idle group is not offloaded":
        ([grp(a=5.0, idle_for_s=700.0)], [], {}, []),
    # opt-out
    "a group that opted out stays on the cloud":
        ([grp(a=5.0, opt_out=True)], [], {}, []),
    "a user who opted out is left out of the offload":
        ([grp(a=5.0)], [], {"opted_out": ["u2"]}, [("offload", "g", "a", "edge_pays")]),
    "a deployed group that opts out is withdrawn":
        ([grp(a=5.0, opt_out=True)], [dep()], {}, [("withdraw", "g", "a", "opt_out")]),
    "a deployed user who opts out: withdrawn, the rest offloaded again":
        ([grp(a=5.0)], [dep()], {"opted_out": ["u1"]},
         [("withdraw", "g", "a", "opt_out"), ("offload", "g", "a", "edge_pays")]),
    "every user opted out":
        ([grp(a=5.0)], [dep()], {"opted_out": ["u1", "u2"]},
         [("withdraw", "g", "a", "opt_out")]),
    # W
    "a deployment whose group is gone":
        ([], [dep()], {}, [("withdraw", "g", "a", "no_users")]),
    "a deployment whose group changed is re-made":
        ([grp(users=("u1", "u2", "u3"), a=5.0)], [dep()], {},
         [("withdraw", "g", "a", "group_changed"), ("offload", "g", "a", "edge_pays")]),
    "idle users: withdrawn":
        ([grp(a=5.0, idle_for_s=600.0)], [dep()], {}, [("withdraw", "g", "a", "idle")]),
    "a node down under the bound: kept":
        ([grp(a=5.0)], [dep()], {"nodes": (NodeView("a", False), NodeView("b", True)),
                                 "state": State(down={"a": 80.0})}, []),
    "a node down past the bound: straight to the best node up, one move":
        ([grp(a=5.0, b=8.0)], [dep()], {"nodes": (NodeView("a", False), NodeView("b", True)),
                                        "state": State(down={"a": 70.0})},
         [("handover", "g", "b", "node_down")]),
    "a node down past the bound, no other node pays: withdrawn":
        ([grp(a=5.0, b=35.0)], [dep()], {"nodes": (NodeView("a", False), NodeView("b", True)),
                                         "state": State(down={"a": 70.0})},
         [("withdraw", "g", "a", "node_down")]),
    "a node down past the bound, the other one admits nothing: withdrawn":
        ([grp(a=5.0, b=8.0)], [dep()], {"nodes": (NodeView("a", False),
                                                  NodeView("b", True, admits=False)),
                                        "state": State(down={"a": 70.0})},
         [("withdraw", "g", "a", "node_down")]),
    "a node down past the bound, the move counts for the budget":
        ([grp("x", ("u1",), a=5.0, b=8.0), grp("y", ("u2",), a=30.0, b=1.0, priority=8)],
         [dep("x", users=("u1",))],
         {"nodes": (NodeView("a", False), NodeView("b", True)),
          "state": State(down={"a": 70.0}),
          "settings": S.model_copy(update={"max_servers": 1})},
         [("handover", "x", "b", "node_down")]),
    "gain gone, not yet for the dwell time: kept":
        ([grp(cloud=8.0, a=5.0)], [dep()], {"state": State(gone={"g": 97.0})}, []),
    "gain gone for the dwell time: withdrawn, not offloaded again":
        ([grp(cloud=8.0, a=5.0)], [dep()], {"state": State(gone={"g": 96.0})},
         [("withdraw", "g", "a", "gain_gone")]),
    "gain gone for the handover's dwell, not the withdrawal's longer one: kept":
        ([grp(cloud=8.0, a=5.0)], [dep()],
         {"state": State(gone={"g": 96.0}),
          "settings": S.model_copy(update={"withdraw_dwell_s": 10})}, []),
    "gain gone for the withdrawal's longer dwell: withdrawn":
        ([grp(cloud=8.0, a=5.0)], [dep()],
         {"state": State(gone={"g": 90.0}),
          "settings": S.model_copy(update={"withdraw_dwell_s": 10})},
         [("withdraw", "g", "a", "gain_gone")]),
    "gain gone on its node, another node pays: kept (handed over by H, not home)":
        ([grp(cloud=8.0, a=7.0, b=3.0)], [dep()], {"state": State(gone={"g": 0.0})}, []),
    "gain gone on every node for the dwell time: withdrawn":
        ([grp(cloud=8.0, a=7.0, b=5.0)], [dep()], {"state": State(gone={"g": 96.0})},
         [("withdraw", "g", "a", "gain_gone")]),
    "gain gone on its node, the other pays but does not admit: withdrawn":
        ([grp(cloud=8.0, a=7.0, b=3.0)], [dep()],
         {"state": State(gone={"g": 96.0}),
          "nodes": (NodeView("a", True), NodeView("b", True, admits=False))},
         [("withdraw", "g", "a", "gain_gone")]),
    "gain in the band (under offload, over withdraw): kept":
        ([grp(cloud=12.0, a=5.0)], [dep()], {"state": State(gone={"g": 0.0})}, []),
    # H
    "a better node, not yet for the dwell time: kept":
        ([grp(a=20.0, b=5.0)], [dep()], {"state": State(better={"g": ("b", 97.0)})}, []),
    "a better node for the dwell time: handover":
        ([grp(a=20.0, b=5.0)], [dep()], {"state": State(better={"g": ("b", 96.0)})},
         [("handover", "g", "b", "better_node")]),
    "better, but by less than the threshold: kept":
        ([grp(a=9.0, b=5.0)], [dep()], {"state": State(better={"g": ("b", 0.0)})}, []),
    "no handover to a node that does not admit":
        ([grp(a=20.0, b=5.0)], [dep()], {"state": State(better={"g": ("b", 0.0)}),
                                         "nodes": (NodeView("a", True),
                                                   NodeView("b", True, admits=False))}, []),
    "no handover from a node that is down":
        ([grp(a=20.0, b=5.0)], [dep()], {"state": State(better={"g": ("b", 0.0)},
                                                        down={"a": 99.0}),
                                         "nodes": (NodeView("a", False), NodeView("b", True))},
         []),
    # re-place after a pre-emption
    "preempted: re-placed on another node":
        ([grp(a=5.0, b=8.0, preempted_from="a")], [], {},
         [("offload", "g", "b", "preempted")]),
    "preempted, and no other node pays: stays on the cloud":
        ([grp(a=5.0, b=35.0, preempted_from="a")], [], {}, []),
    # budget and priorities
    "budget: one server; the higher priority first":
        ([grp("lo", ("u1",), a=5.0, priority=2), grp("hi", ("u2",), a=30.0, priority=8)], [],
         {"settings": S.model_copy(update={"max_servers": 1})},
         [("offload", "hi", "a", "edge_pays")]),
    "budget: same priority, the larger gain first":
        ([grp("x", ("u1",), a=25.0), grp("y", ("u2",), a=5.0)], [],
         {"settings": S.model_copy(update={"max_servers": 1})},
         [("offload", "y", "a", "edge_pays")]),
    "budget full: a higher priority group displaces a lower one":
        ([grp("lo", ("u1",), a=5.0, priority=2), grp("hi", ("u2",), a=5.0, priority=8)],
         [dep("lo", users=("u1",))], {"settings": S.model_copy(update={"max_servers": 1})},
         [("withdraw", "lo", "a", "budget_for_priority"), ("offload", "hi", "a", "edge_pays")]),
    "budget full: an equal priority does not displace":
        ([grp("x", ("u1",), a=5.0), grp("y", ("u2",), a=1.0)], [dep("x", users=("u1",))],
         {"settings": S.model_copy(update={"max_servers": 1})}, []),
    "budget spent (units grew): the lowest priority withdrawn":
        ([grp("lo", ("u1",), a=5.0, priority=2), grp("hi", ("u2",), a=5.0, priority=8)],
         [dep("lo", users=("u1",), units=2.0), dep("hi", users=("u2",), units=3.0)],
         {"settings": S.model_copy(update={"max_units": 4})},
         [("withdraw", "lo", "a", "budget_spent")]),
    "budget of zero: nothing goes to the edge":
        ([grp(a=5.0)], [], {"settings": S.model_copy(update={"max_servers": 0})}, []),
    # a decision under way (the loop moves groups in the background)
    "a group being moved: no other decision, though a better node is due":
        ([grp(a=20.0, b=5.0)], [dep()], {"state": State(better={"g": ("b", 0.0)}),
                                         "busy": ["g"]}, []),
    "a group being moved whose users changed: withdrawn only once the move is done":
        ([grp(users=("u1", "u2", "u3"), a=5.0)], [dep()], {"busy": ["g"]}, []),
    "a group being moved off a down node: not withdrawn":
        ([grp(a=5.0)], [dep()], {"nodes": (NodeView("a", False), NodeView("b", True)),
                                 "state": State(down={"a": 70.0}), "busy": ["g"]}, []),
    "a group being moved counts for the budget and is not displaced":
        ([grp("lo", ("u1",), a=5.0, priority=2), grp("hi", ("u2",), a=5.0, priority=8)],
         [dep("lo", users=("u1",), sid="")],
         {"settings": S.model_copy(update={"max_servers": 1}), "busy": ["lo"]}, []),
}


@pytest.mark.parametrize("groups,deps,kw,expected", ROWS.values(), ids=ROWS.keys())
def test_plan(groups, deps, kw, expected):
    decisions, _ = one(groups, deps, **kw)
    assert summary(decisions) == expected


def test_each_decision_carries_its_figures():
    (d,), _ = one([grp(a=5.0)])
    assert d.figures == {"cloud_ms": 40.0, "node_ms": 5.0, "gain_ms": 35.0,
                         "threshold_ms": 10, "priority": 5}
    assert d.users == frozenset({"u1", "u2"})
    assert "offload g -> a: edge_pays (cloud_ms=40.0" in d.describe()
    (h,), _ = one([grp(a=20.0, b=5.0)], [dep()], state=State(better={"g": ("b", 90.0)}))
    assert (h.server_id, h.node, h.to) == ("s-g", "a", "b")
    assert h.figures == {"node_ms": 20.0, "to_ms": 5.0, "gain_ms": 15.0, "threshold_ms": 5,
                         "for_s": 10.0}


def rounds(series, step=1.0):
    """The plan over consecutive rounds (each an (a_ms, b_ms) pair) with the state and
    the deployment carried as the loop carries them (a handover moves it): the rounds
    where something was decided, and what."""
    state, out, d = State(), [], dep()
    for i, (a, b) in enumerate(series):
        decisions, state = one([grp(a=a, b=b)], [d], state=state, now=i * step)
        for x in decisions:
            out.append((i, x.kind, str(x.reason)))
            if x.kind == "handover":
                d = dep(node=x.to)
    return out


def test_handover_after_the_dwell_time_once_per_crossing():
    # b is better from round 2 on; dwell 4 s at 1 s rounds: handover at round 6
    series = [(5.0, 20.0)] * 2 + [(20.0, 5.0)] * 20
    assert rounds(series) == [(6, "handover", "better_node")]
    # and back, once, when the group walks back
    assert rounds(series + [(5.0, 20.0)] * 10) == [(6, "handover", "better_node"),
                                                  (26, "handover", "better_node")]


def test_a_crossing_near_the_cloud_is_one_handover_not_home_and_out():
    """A near cloud (12 ms): walking from a to b, a's gain falls under the withdraw
    threshold (5) before b leads a by the handover threshold (5). b pays all along: the
    group is handed over once, never sent home."""
    state, out, d = State(), [], dep()
    for i in range(16):  # a: 3 -> 18 ms, b: 15 -> 0 ms, a round a second
        g = grp(cloud=12.0, a=3.0 + i, b=max(0.0, 15.0 - i))
        decisions, state = one([g], [d], state=state, now=float(i))
        out += [(i, x.kind, x.to) for x in decisions]
        d = dep(node=decisions[0].to) if decisions else d
    assert out == [(13, "handover", "b")]  # b leads by 5 from round 9; 4 s later


def test_no_flapping_along_a_border():
    # the lead changes sides every 2 s: never 4 s on end, so never a handover
    series = [(5.0, 20.0), (5.0, 20.0), (20.0, 5.0), (20.0, 5.0)] * 5
    assert rounds(series) == []
    # a lead under the threshold resets the clock too
    series = [(20.0, 5.0)] * 3 + [(8.0, 5.0)] + [(20.0, 5.0)] * 3
    assert rounds(series) == []


def test_the_dwell_clock_restarts_when_the_best_node_changes():
    three = (NodeView("a", True), NodeView("b", True), NodeView("c", True))
    state, out = State(), []
    for i, (b, c) in enumerate([(5.0, 9.0)] * 3 + [(9.0, 5.0)] * 5):
        g = GroupView("g", frozenset({"u1", "u2"}), cloud_ms=40.0,
                      node_ms={"a": 20.0, "b": b, "c": c})
        decisions, state = one([g], [dep()], nodes=three, state=state, now=float(i))
        out += [(i, d.to) for d in decisions]
    assert out == [(7, "c")]  # c leads from round 3; 4 s later


def test_a_node_down_move_carries_its_figures_and_the_server_it_leaves():
    (h,), _ = one([grp(a=5.0, b=8.0)], [dep()], state=State(down={"a": 60.0}),
                  nodes=(NodeView("a", False), NodeView("b", True)))
    assert (h.kind, h.node, h.server_id, h.to) == ("handover", "a", "s-g", "b")
    assert h.figures == {"down_for_s": 40.0, "down_bound_s": 30, "cloud_ms": 40.0,
                         "to_ms": 8.0, "gain_ms": 32.0, "threshold_ms": 10}


def test_a_busy_groups_clocks_wait_for_it():
    st = State(better={"g": ("b", 90.0)}, gone={"h": 95.0})
    _, out = one([grp(a=20.0, b=5.0), grp("h", ("u3",), cloud=8.0, a=5.0)],
                 [dep(sid=""), dep("h", users=("u3",), sid="")], state=st, busy=["g", "h"])
    assert (out.better, out.gone) == ({"g": ("b", 90.0)}, {"h": 95.0})


def test_next_due_is_the_earliest_clock_still_to_come():
    st = State(better={"g": ("b", 10.0)}, gone={"h": 12.0}, down={"a": 5.0})
    assert next_due(st, S, now=0.0) == 14.0  # dwell 4 s after 10.0
    assert next_due(st, S, now=14.0) == 16.0  # that one was planned for: the next
    assert next_due(st, S, now=16.0) == 35.0  # the node's down bound (30 s)
    assert next_due(st, S, now=35.0) is None
    assert next_due(State(), S, now=0.0) is None
    longer = S.model_copy(update={"withdraw_dwell_s": 10})
    assert next_due(State(gone={"h": 12.0}), longer, now=16.0) == 22.0  # its own wait


DOWN_A = (NodeView("a", False), NodeView("b", True))
UPCOMING = {
    "a better node whose dwell runs: the handover to it":
        ([grp(a=20.0, b=5.0)], [dep()], {"state": State(better={"g": ("b", 99.0)})},
         {"g": ("better_node", "b")}),
    "nothing runs: nothing to prepare":
        ([grp(a=5.0, b=20.0)], [dep()], {}, {}),
    "a node down within the bound: the move to its refuge":
        ([grp(a=5.0, b=8.0)], [dep()], {"nodes": DOWN_A, "state": State(down={"a": 90.0})},
         {"g": ("node_down", "b")}),
    "a node down within the bound, no refuge that pays: nothing":
        ([grp(a=5.0, b=35.0)], [dep()], {"nodes": DOWN_A, "state": State(down={"a": 90.0})},
         {}),
    "a node down past the bound: decided already, nothing to prepare":
        ([grp(a=5.0, b=8.0)], [dep()], {"nodes": DOWN_A, "state": State(down={"a": 60.0})},
         {}),
    "a group being moved: nothing":
        ([grp(a=20.0, b=5.0)], [dep()], {"state": State(better={"g": ("b", 99.0)}),
                                         "busy": ["g"]}, {}),
    "a group on the cloud: nothing":
        ([grp(a=20.0, b=5.0)], [], {"state": State(better={"g": ("b", 99.0)})}, {}),
}


@pytest.mark.parametrize("groups,deps,kw,expected", UPCOMING.values(), ids=UPCOMING.keys())
def test_upcoming_moves(groups, deps, kw, expected):
    snap = Snapshot(100.0, tuple(groups), kw.get("nodes", UP), tuple(deps),
                    busy=frozenset(kw.get("busy", ())))
    got = upcoming(snap, kw.get("state", State()), S)
    assert {g: (str(r), n) for g, (r, n) in got.items()} == expected


def test_node_down_clock_is_kept_in_the_state():
    nodes = (NodeView("a", False), NodeView("b", True))
    _, st = one([grp(a=5.0)], [dep()], nodes=nodes, now=10.0)
    assert st.down == {"a": 10.0}
    _, st = one([grp(a=5.0)], [dep()], nodes=nodes, state=st, now=20.0)
    assert st.down == {"a": 10.0}
    _, st = one([grp(a=5.0)], [dep()], state=st, now=25.0)  # up again: forgotten
    assert st.down == {}


def test_settings_errors_name_the_field():
    with pytest.raises(ValidationError, match="withdraw_gain_ms"):
        Settings(offload_gain_ms=5, withdraw_gain_ms=10)
    with pytest.raises(ValidationError, match="locations.a"):
        Settings(locations={"a": (95.0, 0.0)})
    with pytest.raises(ValidationError, match="interval_s"):
        Settings(interval_s=0)
    with pytest.raises(ValueError, match="unique"):
        Snapshot(0.0, (grp(), grp()), UP)


def test_location_model():
    london, paris = (51.5072, -0.1276), (48.8566, 2.3522)
    assert distance_km(london, paris) == pytest.approx(344, abs=2)
    assert distance_km(london, london) == 0.0
    s = Settings(base_ms=2.0, ms_per_km=0.02)
    assert expected_ms(london, paris, s) == pytest.approx(2.0 + 0.02 * 344, abs=0.1)


@pytest.mark.parametrize(("rtt", "rtts", "edge", "cloud_service", "cloud", "want"), [
    (14.0, 1.0, 0.0, 0.0, False, 14.0),  # the defaults: an RTT is the figure
    (14.0, 2.0, 0.0, 0.0, False, 28.0),  # two round trips a request
    (14.0, 2.0, 20.0, 5.0, False, 48.0),  # and an edge server's time
    (15.0, 2.0, 20.0, 5.0, True, 35.0),  # the cloud's own server time
])
def test_request_ms(rtt, rtts, edge, cloud_service, cloud, want):
    s = Settings(request_rtts=rtts, edge_service_ms=edge, cloud_service_ms=cloud_service)
    assert request_ms(rtt, s, cloud=cloud) == want


def test_a_request_cost_on_the_cloud_keeps_a_group_that_the_rtt_would_send_home():
    """The near cloud: 15 ms of RTT against a node 14 ms away at a midpoint. Compared as
    RTTs the node no longer pays (a 1 ms gain: home, then out to the next node); compared
    as what a request costs (two round trips and an edge server's 20 ms, against the 84 ms
    a request costs on the cloud) it pays by 36 ms and the group stays."""
    rtt = Settings(cloud_ms=15.0, dwell_s=0.0, withdraw_dwell_s=0.0, withdraw_gain_ms=2.0,
                   offload_gain_ms=5.0)
    req = rtt.model_copy(update={"cloud_ms": 84.0, "request_rtts": 2.0,
                                 "edge_service_ms": 20.0})
    for s, kinds in ((rtt, ["withdraw"]), (req, [])):
        out, _ = one([grp(cloud=s.cloud_ms, a=request_ms(14.0, s))], [dep()], settings=s)
        assert [d.kind for d in out] == kinds


def test_groups_by_nearest_node():
    rtt = {"a": {"u1": 1.0, "u2": 9.0, "u3": None},
           "b": {"u1": 3.0, "u2": 2.0, "u3": None, "u4": 7.0}}
    assert groups_by_nearest(rtt) == {"near-a": ["u1"], "near-b": ["u2", "u4"]}
