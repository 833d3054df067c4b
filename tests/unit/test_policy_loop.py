"""The policy loop around the pure plan, with a fake cloud manager: what a round asks,
what it carries out, one event per decision, failures recorded and the rest of the
group's decisions skipped, servers a node pre-empted re-placed elsewhere, a group whose
node is down moved in one step, moves in the background while the rounds go on, a round
when a clock comes due."""

from __future__ import annotations

import logging
import threading
from types import SimpleNamespace

import pytest

from cloud_manager.edge_client import EdgeError
from cloud_manager.ledger import Lapsed
from cloud_manager.policy import Settings
from cloud_manager.policy_loop import Group, PolicyLoop
from enorm.protocol import MergeReport, NodeOffer, Resources, TerminationReason, User

LONDON, PARIS = (51.5072, -0.1276), (48.8566, 2.3522)


def offer(name: str, free_cores: float = 2.0) -> NodeOffer:
    r = Resources(cores=2, memory_mb=1024)
    return NodeOffer(name=name, capacity=r, reserved=Resources(cores=0, memory_mb=0),
                     basic_service=Resources(cores=0, memory_mb=0), allocated=r,
                     free=Resources(cores=free_cores, memory_mb=1024),
                     unit=Resources(cores=0.5, memory_mb=128), servers=0, admission="reject",
                     ports_free=10, autoscale_interval_s=300)


class Edge:
    def __init__(self, name: str, up: bool = True, free: float = 2.0, rtt=None):
        self.name, self.up, self.free, self.rtt = name, up, free, rtt

    def offer(self, timeout=None):
        if not self.up:
            raise EdgeError(f"{self.name}: down")
        return offer(self.name, self.free)

    def probe(self, addresses, timeout=None):
        self.probed = list(addresses)
        if self.rtt is None:
            raise EdgeError(f"{self.name}: 400 probe refused")
        return SimpleNamespace(rtt_ms={a: self.rtt.get(a) for a in addresses})

    def server(self, server_id):  # its auto-scaler grew it to 1.5 cores (3 units)
        return SimpleNamespace(limits=Resources(cores=1.5, memory_mb=128))


class FakeManager:
    """What the loop uses of a CloudManager; records the calls."""

    def __init__(self, *edges: Edge):
        self.edges, self.registry, self.priority = list(edges), None, 5
        self.cloud, self.closing, self.calls = None, threading.Event(), []
        self.fail: set[str] = set()
        self.n = 0
        self.intents = None  # `start_intents`: offloads in flight in the ledger

    def _dep(self, node: str, users) -> SimpleNamespace:
        self.n += 1
        edge = next(e for e in self.edges if e.name == node)
        return SimpleNamespace(server_id=f"s{self.n}", edge=edge,
                               users=list(users), user_ids=[u.id for u in users],
                               ended=threading.Event(), state="deployed", end_reason=None,
                               session=None, timings={}, merge=None)

    def _before(self, hook, dep) -> None:
        """The loop's `before_redirect`, where the real one runs: once the server holds
        the data, before the users are sent; if it raises, the server ends. Then the
        redirect, which fails with `lapsed` (another process took the offload over) or
        `redirect` (the app's redirect failed: its lease left to lapse)."""
        if hook is not None:
            try:
                hook(dep)
            except Exception:
                self.calls.append(("abandon", dep.server_id))
                raise
        if "lapsed" in self.fail:
            raise Lapsed(dep.server_id)
        if "redirect" in self.fail:
            raise RuntimeError("redirect: 503")

    def offload(self, users, exclude=(), before_redirect=None, **over):
        (node,) = [e.name for e in self.edges if e.name not in exclude]
        self.calls.append(("offload", node, sorted(u.id for u in users), over))
        if "offload" in self.fail:
            raise RuntimeError("no room")
        dep = self._dep(node, users)
        self._before(before_redirect, dep)
        return dep

    def handover(self, old, to=None, users=None, before_redirect=None):
        self.calls.append(("handover", old.server_id, to))
        dep = self._dep(to, users)
        self._before(before_redirect, dep)
        return dep

    def withdraw(self, dep):
        self.calls.append(("withdraw", dep.server_id))
        if "withdraw" in self.fail:
            raise EdgeError("node unreachable")
        dep.timings["restore"] = 0.01  # the users are home
        if "unreached" in self.fail:
            raise EdgeError(f"{dep.edge.name}: DELETE: connection refused")
        dep.state = "withdrawn"
        dep.ended.set()

    def prepare_handover(self, old, to=None, users=None):
        self.calls.append(("prepare", old.server_id, to))
        if "prepare" in self.fail:
            raise RuntimeError("no room")
        new = self._dep(to, users)

        def complete(before_redirect=None):
            self._before(before_redirect, new)
            self.calls.append(("complete", old.server_id, new.server_id))
            return new

        def cancel():
            self.calls.append(("cancel", new.server_id))

        return SimpleNamespace(complete=complete, cancel=cancel, seconds=2.5)

    def prepare_offload(self, users, exclude=(), **over):
        (node,) = [e.name for e in self.edges if e.name not in exclude]
        self.calls.append(("prepare_offload", node, sorted(u.id for u in users)))
        new = self._dep(node, users)

        def complete(before_redirect=None):
            self._before(before_redirect, new)
            self.calls.append(("send_users", new.server_id))
            return new

        def cancel():
            self.calls.append(("cancel", new.server_id))

        return SimpleNamespace(complete=complete, cancel=cancel, seconds=2.0)

    def close_session(self, dep):
        dep.session = None

    def merge_home(self, dep, cloud_wins=False):
        self.calls.append(("merge_home", dep.server_id, cloud_wins))
        if "unreached" in self.fail:
            raise EdgeError(f"{dep.edge.name}: DELETE: connection refused")
        dep.merge = MergeReport(keys_migrated=5, conflicts=2, conflicts_cloud_won=2)
        dep.state = "withdrawn"
        dep.ended.set()


def party(where, **kw):
    users = [User(id="u1", address="203.0.113.1"), User(id="u2", address="203.0.113.2")]
    return lambda data_of: [Group("party", users, where[0], **kw)] if where[0] else []


def loop_for(cm, where, settings=None, **kw):
    s = settings or Settings(cloud_ms=40.0, dwell_s=0.0,
                             locations={"a": LONDON, "b": PARIS})
    clock = iter(range(1000)).__next__
    return PolicyLoop(cm, s, party(where, **kw), clock=lambda: float(clock()))


def test_a_round_carries_out_the_plan_one_event_each(caplog):
    cm = FakeManager(Edge("a"), Edge("b"))
    where = [LONDON]
    loop = loop_for(cm, where, priority=7)
    seen = []
    loop.listeners.append(seen.append)
    with caplog.at_level(logging.INFO, "cloud_manager.decisions"):
        (ev,) = loop.round()
    assert cm.calls == [("offload", "a", ["u1", "u2"], {"priority": 7})]
    assert (ev.kind, ev.reason, ev.node, ev.new_server_id, ev.ok) == (
        "offload", "edge_pays", "a", "s1", True)
    assert seen == [ev] and list(loop.events) == [ev]
    assert "offload party -> a: edge_pays" in caplog.text and "done" in caplog.text
    assert loop.round() == []  # served where it should be: nothing to do
    where[0] = PARIS
    (ev,) = loop.round()
    assert (ev.kind, ev.server_id, ev.new_server_id, ev.to) == ("handover", "s1", "s2", "b")
    assert loop.owned["party"].server_id == "s2"
    where[0] = None  # the party is gone
    (ev,) = loop.round()
    assert (ev.kind, ev.reason, ev.server_id) == ("withdraw", "no_users", "s2")
    assert loop.owned == {}


DOWN_AT_ONCE = Settings(cloud_ms=40.0, dwell_s=0.0, down_bound_s=0.0,
                        locations={"a": LONDON, "b": PARIS})


def test_a_failed_withdrawal_is_recorded_and_the_group_not_offloaded_again():
    cm = FakeManager(Edge("a"), Edge("b"))
    users = [User(id="u1", address="203.0.113.1"), User(id="u2", address="203.0.113.2")]
    loop = PolicyLoop(cm, DOWN_AT_ONCE, lambda _: [Group("party", users, LONDON)])
    loop.round()
    users.append(User(id="u3", address="203.0.113.3"))  # the group changed: made anew
    cm.fail.add("withdraw")
    (ev,) = loop.round()  # the withdrawal fails: no offload in that round
    assert (ev.kind, ev.reason, ev.ok) == ("withdraw", "group_changed", False)
    assert "node unreachable" in ev.error
    assert cm.calls[-1] == ("withdraw", "s1") and "party" in loop.owned
    cm.fail.clear()
    evs = loop.round()  # the node answers the withdrawal now: then the offload
    assert [(e.kind, e.node, e.ok) for e in evs] == [("withdraw", "a", True),
                                                     ("offload", "a", True)]


def test_a_node_down_with_no_other_node_that_pays_sends_its_users_home():
    cm = FakeManager(Edge("a"), Edge("b", free=0.0))  # b admits nothing
    loop = loop_for(cm, [LONDON], settings=DOWN_AT_ONCE)
    loop.round()
    cm.edges[0].up = False
    cm.fail.add("unreached")
    (ev,) = loop.round()  # the users are home, the node did not answer the DELETE
    assert (ev.kind, ev.reason, ev.ok) == ("withdraw", "node_down", False)
    assert loop.owned == {} and list(loop.unreached) == ["s1"]
    assert loop.round() == []  # nowhere to go: on the cloud, nothing merged while down
    assert not any(c[0] == "merge_home" for c in cm.calls)


def test_a_node_down_past_the_bound_its_group_goes_to_another_node_in_one_move():
    cm = FakeManager(Edge("a"), Edge("b"))
    loop = loop_for(cm, [LONDON], settings=DOWN_AT_ONCE)
    loop.round()
    cm.edges[0].up = False
    cm.fail.add("unreached")
    # one move: a server on b from the cloud's copy, the users redirected there once
    # (never withdrawn to the cloud first); the dead server waits to be merged
    (ev,) = loop.round()
    assert (ev.kind, ev.reason, ev.node, ev.to, ev.server_id, ev.new_server_id, ev.ok) == (
        "handover", "node_down", "a", "b", "s1", "s2", True)
    assert ev.figures["down_bound_s"] == 0.0 and ev.figures["to_ms"] < 40.0
    assert cm.calls[-1] == ("offload", "b", ["u1", "u2"], {})
    assert not any(c[0] == "withdraw" for c in cm.calls)
    assert loop.owned["party"].server_id == "s2" and list(loop.unreached) == ["s1"]
    assert loop.round() == []  # a still down: nothing more, nothing merged
    assert not any(c[0] == "merge_home" for c in cm.calls)
    cm.edges[0].up = True
    cm.fail.clear()
    # a is back: its server merged, the cloud winning conflicts; then the group back to a
    ev, back = loop.round()
    assert cm.calls[-2] == ("merge_home", "s1", True)
    assert (back.kind, back.reason, back.server_id, back.to) == (
        "handover", "better_node", "s2", "a")
    assert (ev.kind, ev.reason, ev.node, ev.server_id, ev.ok) == (
        "withdraw", "node_back", "a", "s1", True)
    assert ev.figures == {"state": "withdrawn", "keys_migrated": 5, "conflicts": 2,
                          "conflicts_cloud_won": 2, "untouched": 0}
    assert loop.unreached == {} and loop.owned["party"].edge.name == "a"


def test_a_preempted_server_is_re_placed_on_another_node():
    cm = FakeManager(Edge("a"), Edge("b"))
    loop = loop_for(cm, [LONDON])
    loop.round()
    dep = loop.owned["party"]
    dep.state, dep.end_reason = "terminated", TerminationReason.PREEMPTED
    dep.ended.set()
    (ev,) = loop.round()
    assert (ev.kind, ev.reason, ev.node) == ("offload", "preempted", "b")
    assert ev.figures["preempted_from"] == "a"


def test_a_failed_offload_is_an_event_and_the_next_round_tries_again():
    cm = FakeManager(Edge("a"), Edge("b", free=0.0))  # b has no unit free: never there
    cm.fail.add("offload")
    loop = loop_for(cm, [LONDON])
    (ev,) = loop.round()
    assert not ev.ok and ev.error == "RuntimeError: no room" and loop.owned == {}
    cm.fail.clear()
    (ev,) = loop.round()
    assert ev.ok and ev.node == "a"


def test_settings_the_loop_cannot_use_are_refused():
    cm = FakeManager(Edge("a"))
    with pytest.raises(ValueError, match="cloud_ms or cloud_location"):
        PolicyLoop(cm, Settings(), party([LONDON]))
    with pytest.raises(ValueError, match="policy.locations: no edge node named 'z'"):
        PolicyLoop(cm, Settings(cloud_ms=40, locations={"z": LONDON}), party([LONDON]))


def test_the_budget_counts_the_servers_units_now():
    cm = FakeManager(Edge("a"), Edge("b"))
    where = [LONDON]
    s = Settings(cloud_ms=40.0, dwell_s=0.0, max_units=4, locations={"a": LONDON, "b": PARIS})
    loop = loop_for(cm, where, settings=s)
    loop.round()
    snap, _ = loop.snapshot()
    assert [d.units for d in snap.deployments] == [3.0]  # 1.5 cores in 0.5-core units
    loop.settings = s.model_copy(update={"max_units": 2})
    (ev,) = loop.round()
    assert (ev.kind, ev.reason, ev.figures["units"]) == ("withdraw", "budget_spent", 3.0)


def test_an_app_without_groups_or_locations_gets_groups_from_the_probes():
    near_a, near_b, lost = "203.0.113.1", "203.0.113.2", "203.0.113.3"
    cm = FakeManager(Edge("a", rtt={near_a: 3.0, near_b: 30.0}),
                     Edge("b", rtt={near_a: 25.0, near_b: 4.0}),
                     Edge("c"))  # its probe fails: no figure from it
    users = [User(id="u1", address=near_a), User(id="u2", address=near_b),
             User(id="u3", address=lost)]
    loop = PolicyLoop(cm, Settings(cloud_ms=40.0), lambda data_of: users)
    evs = loop.round()
    assert sorted((e.group, e.node, tuple(e.users)) for e in evs) == [
        ("near-a", "a", ("u1",)), ("near-b", "b", ("u2",))]
    assert next(e for e in evs if e.node == "a").figures["node_ms"] == 3.0
    assert sorted(cm.edges[0].probed) == sorted([near_a, near_b, lost])


def test_a_probe_rtt_becomes_what_a_request_costs():
    """The figures the plan compares: two round trips of the node's probe and an edge
    server's time, against the cloud's measured request cost; with a location, the
    cloud's by the same model and its own server time."""
    addr = "203.0.113.1"
    cm = FakeManager(Edge("a", rtt={addr: 14.0}))
    s = Settings(cloud_ms=84.0, request_rtts=2.0, edge_service_ms=20.0)
    loop = PolicyLoop(cm, s, lambda data_of: [Group("g", [User(id="u1", address=addr)])])
    (ev,) = loop.round()
    assert (ev.kind, ev.figures["node_ms"], ev.figures["gain_ms"]) == ("offload", 48.0, 36.0)
    located = Settings(cloud_location=PARIS, locations={"a": LONDON}, request_rtts=2.0,
                       edge_service_ms=20.0, cloud_service_ms=5.0, base_ms=2.0,
                       ms_per_km=0.02)
    loop = PolicyLoop(FakeManager(Edge("a")), located,
                      lambda data_of: [Group("g", [User(id="u1", address=addr)], LONDON)])
    snap, _ = loop.snapshot()
    (g,) = snap.groups
    assert g.node_ms["a"] == 2 * 2.0 + 20.0
    assert g.cloud_ms == pytest.approx(2 * (2.0 + 0.02 * 344) + 5.0, abs=0.2)


def test_groups_are_moved_side_by_side_each_in_order():
    """Two groups crossing at once: neither waits for the other's start-first move (the
    barrier passes only with both offloads under way), the events in the plan's order."""
    cm = FakeManager(Edge("a"), Edge("b"))
    meet = threading.Barrier(2, timeout=10)
    plain = cm.offload

    def offload(users, exclude=(), **over):
        meet.wait()
        return plain(users, exclude, **over)

    cm.offload = offload
    users = [User(id=f"u{i}", address=f"203.0.113.{i}") for i in range(4)]
    loop = PolicyLoop(cm, Settings(cloud_ms=40.0, locations={"a": LONDON, "b": PARIS}),
                      lambda _: [Group("north", users[:2], LONDON),
                                 Group("south", users[2:], PARIS)])
    evs = loop.round()
    assert [(e.kind, e.group, e.node, e.ok) for e in evs] == [
        ("offload", "north", "a", True), ("offload", "south", "b", True)]


def test_a_failed_move_away_from_a_down_node_sends_the_users_home():
    cm = FakeManager(Edge("a"), Edge("b"))
    loop = loop_for(cm, [LONDON], settings=DOWN_AT_ONCE)
    loop.round()
    cm.edges[0].up = False
    cm.fail |= {"unreached", "offload"}
    (ev,) = loop.round()
    assert (ev.kind, ev.reason, ev.ok) == ("handover", "node_down", False)
    assert cm.calls[-1] == ("withdraw", "s1")  # users home; the server waits
    assert loop.owned == {} and list(loop.unreached) == ["s1"]
    cm.fail.discard("offload")
    (ev,) = loop.round()  # the group is the policy's again: offloaded to b
    assert (ev.kind, ev.node, ev.ok) == ("offload", "b", True)


def test_moves_go_on_in_the_background_and_the_group_gets_no_other_decision_meanwhile():
    cm = FakeManager(Edge("a"), Edge("b"))
    gate = threading.Event()
    plain = cm.offload

    def offload(users, exclude=(), **over):
        assert gate.wait(10)
        return plain(users, exclude, **over)

    cm.offload = offload
    loop = loop_for(cm, [LONDON])
    seen = []
    loop.listeners.append(seen.append)
    assert loop.round(wait=False) == []  # the offload is under way
    snap, _ = loop.snapshot()
    assert snap.busy == {"party"}
    assert [(d.group, d.node, d.server_id) for d in snap.deployments] == [("party", "a", "")]
    assert loop.round(wait=False) == []  # nothing more decided for it meanwhile
    gate.set()
    loop.stop()  # waits for the moves under way
    assert [(e.kind, e.node, e.ok) for e in seen] == [("offload", "a", True)]
    assert [c[0] for c in cm.calls] == ["offload"] and loop.owned["party"].server_id == "s1"
    snap, _ = loop.snapshot()
    assert snap.busy == frozenset() and snap.deployments[0].server_id == "s1"


DWELL = Settings(cloud_ms=40.0, dwell_s=4.0, interval_s=10.0,
                 locations={"a": LONDON, "b": PARIS})


def walking(cm, settings=DWELL):
    where, now = [LONDON], [0.0]
    loop = PolicyLoop(cm, settings, party(where), clock=lambda: now[0])
    loop.round()
    assert loop.owned["party"].edge.name == "a"
    return loop, where, now


def test_the_next_round_comes_when_a_dwell_clock_comes_due():
    loop, where, now = walking(FakeManager(Edge("a"), Edge("b")))
    assert loop.next_round_in() is None  # no clock runs
    where[0], now[0] = PARIS, 1.0
    assert loop.round() == []  # b better since 1.0: due at 5.0
    now[0] = 1.5
    assert loop.next_round_in() == pytest.approx(3.51)
    now[0] = 5.01
    (ev,) = loop.round()
    assert (ev.kind, ev.to, ev.figures["for_s"]) == ("handover", "b", 4.01)


def test_a_handover_is_prepared_while_its_dwell_runs_then_only_switched():
    cm = FakeManager(Edge("a"), Edge("b"))
    loop, where, now = walking(cm)
    where[0], now[0] = PARIS, 1.0
    assert loop.round() == []
    loop.standby["party"].future.result()  # prepared in the background
    assert cm.calls[-1] == ("prepare", "s1", "b") and list(loop.standby) == ["party"]
    cm.edges[1].free = 0.0  # the standby took b's last unit: b is still wanted
    now[0] = 3.0
    assert loop.round() == [] and cm.calls[-1] == ("prepare", "s1", "b")  # once
    now[0] = 5.0
    (ev,) = loop.round()  # the switch alone, to the server made meanwhile
    assert cm.calls[-1] == ("complete", "s1", "s2")
    assert not any(c[0] in ("handover", "cancel") for c in cm.calls)
    assert (ev.kind, ev.new_server_id, ev.figures["prepared_ahead_s"]) == (
        "handover", "s2", 2.5)
    assert loop.standby == {} and loop.owned["party"].server_id == "s2"


def test_a_standby_not_needed_is_ended_once_its_node_has_not_led_for_the_dwell():
    cm = FakeManager(Edge("a"), Edge("b"))
    loop, where, now = walking(cm)
    where[0], now[0] = PARIS, 1.0
    loop.round()
    where[0], now[0] = LONDON, 2.0  # back before the dwell is out: no handover
    assert loop.round() == [] and list(loop.standby) == ["party"]  # kept a while
    where[0], now[0] = PARIS, 3.0  # b leads again: the same standby serves
    loop.round()
    where[0], now[0] = LONDON, 4.0
    loop.round()
    now[0] = 6.5
    loop.round()
    assert list(loop.standby) == ["party"]
    now[0] = 7.0  # b has not led for 4 s (since 3.0): ended
    loop.round()
    loop.stop()
    assert [c[0] for c in cm.calls] == ["offload", "prepare", "cancel"]
    assert loop.standby == {} and loop.owned["party"].server_id == "s1"


def test_no_standby_beyond_the_budget_nor_when_turned_off():
    for s in (DWELL.model_copy(update={"max_servers": 1}),
              DWELL.model_copy(update={"prepare_moves": False})):
        cm = FakeManager(Edge("a"), Edge("b"))
        loop, where, now = walking(cm, s)
        where[0], now[0] = PARIS, 1.0
        loop.round()
        now[0] = 5.0
        (ev,) = loop.round()
        assert [c[0] for c in cm.calls] == ["offload", "handover"], s
        assert "prepared_ahead_s" not in ev.figures


def test_a_standby_that_failed_to_start_leaves_the_whole_handover_to_the_decision():
    cm = FakeManager(Edge("a"), Edge("b"))
    loop, where, now = walking(cm)
    cm.fail.add("prepare")
    where[0], now[0] = PARIS, 1.0
    loop.round()
    now[0] = 5.0
    (ev,) = loop.round()
    assert [c[0] for c in cm.calls] == ["offload", "prepare", "handover"] and ev.ok


def test_the_hook_reads_no_data_on_a_node_that_is_down():
    """Else the round would fail on it every time, and never move the group away."""
    cm = FakeManager(Edge("a"), Edge("b"))
    cm.cloud = "cloud redis"
    users = [User(id="u1", address="203.0.113.1")]
    read = []

    def hook(data_of):
        read.append(data_of("u1"))
        return [Group("party", users, LONDON)]

    s = Settings(cloud_ms=40.0, down_bound_s=60.0, locations={"a": LONDON, "b": PARIS})
    loop = PolicyLoop(cm, s, hook)
    loop.round()
    dep = loop.owned["party"]
    dep.session = object()  # served on a, its Redis reached over SSH
    loop._redis[dep.server_id] = "edge redis"
    loop.round()
    cm.edges[0].up = False
    loop.round()
    assert read == ["cloud redis", "edge redis", "cloud redis"]


def test_a_merge_of_a_node_back_holds_no_round_up_and_is_asked_once():
    cm = FakeManager(Edge("a"), Edge("b", free=0.0))
    loop = loop_for(cm, [LONDON], settings=DOWN_AT_ONCE)
    loop.round()
    cm.edges[0].up = False
    cm.fail.add("unreached")
    loop.round()  # home; s1 waits in `unreached`
    cm.edges[0].up = True
    cm.fail.clear()
    gate, plain = threading.Event(), cm.merge_home

    def merge_home(dep, cloud_wins=False):
        assert gate.wait(10)
        return plain(dep, cloud_wins)

    cm.merge_home = merge_home
    seen = []
    loop.listeners.append(seen.append)
    loop.round(wait=False)  # the merge under way; the round went on: offloaded to a
    loop.round(wait=False)
    gate.set()
    loop.stop()
    assert [c for c in cm.calls if c[0] == "merge_home"] == [("merge_home", "s1", True)]
    assert ("withdraw", "node_back", True) in [(e.kind, e.reason, e.ok) for e in seen]
    assert loop.unreached == {} and loop.owned["party"].edge.name == "a"


def test_a_move_off_a_down_node_is_prepared_while_the_bound_runs():
    cm = FakeManager(Edge("a"), Edge("b"))
    s = DWELL.model_copy(update={"down_bound_s": 3.0})
    loop, where, now = walking(cm, s)
    cm.edges[0].up = False
    cm.fail.add("unreached")
    now[0] = 1.0
    assert loop.round() == []  # down since 1.0: a server on b prepared meanwhile
    loop.standby["party"].future.result()
    assert cm.calls[-1] == ("prepare_offload", "b", ["u1", "u2"])
    now[0] = 4.0
    (ev,) = loop.round()  # the bound: the users sent to the prepared server, once
    assert (ev.kind, ev.reason, ev.to, ev.new_server_id, ev.figures["prepared_ahead_s"]) == (
        "handover", "node_down", "b", "s2", 2.0)
    assert [c[0] for c in cm.calls] == ["offload", "prepare_offload", "send_users"]
    assert list(loop.unreached) == ["s1"] and loop.standby == {}


def test_a_node_back_within_the_bound_its_standby_is_ended():
    cm = FakeManager(Edge("a"), Edge("b"))
    s = DWELL.model_copy(update={"down_bound_s": 10.0})
    loop, where, now = walking(cm, s)
    cm.edges[0].up = False
    now[0] = 1.0
    loop.round()
    cm.edges[0].up = True
    now[0] = 2.0
    loop.round()
    assert list(loop.standby) == ["party"]  # kept a while (a node that blinks)
    now[0] = 5.0  # not wanted for the dwell (4 s): ended
    loop.round()
    loop.stop()
    assert [c[0] for c in cm.calls] == ["offload", "prepare_offload", "cancel"]
    assert loop.owned["party"].server_id == "s1" and loop.unreached == {}


def test_each_new_server_is_recorded_before_its_users_are_sent_there():
    # `enorm-cloud policy` records in the ledger here: a server its users are sent to is
    # never one another process's reconcile could take for an orphan
    cm = FakeManager(Edge("a"), Edge("b"))
    where = [LONDON]
    loop = loop_for(cm, where, settings=DOWN_AT_ONCE)
    loop.before_redirect = lambda dep: cm.calls.append(("record", dep.server_id))
    loop.round()  # offload
    where[0] = PARIS
    loop.round()  # handover, not prepared
    cm.edges[1].up = False
    cm.fail.add("unreached")
    loop.round()  # b down: to a in one move
    assert [c[:2] for c in cm.calls if c[0] != "withdraw"] == [
        ("offload", "a"), ("record", "s1"), ("handover", "s1"), ("record", "s2"),
        ("offload", "a"), ("record", "s3")]


def test_a_prepared_move_is_recorded_before_its_switch():
    cm = FakeManager(Edge("a"), Edge("b"))
    loop, where, now = walking(cm)
    loop.before_redirect = lambda dep: cm.calls.append(("record", dep.server_id))
    where[0], now[0] = PARIS, 1.0
    loop.round()
    loop.standby["party"].future.result()
    now[0] = 5.0
    (ev,) = loop.round()
    assert ev.ok and cm.calls[-2:] == [("record", "s2"), ("complete", "s1", "s2")]


def test_a_server_that_cannot_be_recorded_gets_no_user():
    # e.g. another process's reconcile ended it as an orphan (ledger.Ended) meanwhile
    cm = FakeManager(Edge("a"), Edge("b"))
    loop = loop_for(cm, [LONDON])

    def refuse(dep):
        raise RuntimeError(f"server {dep.server_id} was ended before its record was done")

    loop.before_redirect = refuse
    (ev,) = loop.round()
    assert (ev.kind, ev.ok) == ("offload", False) and "ended before" in ev.error
    assert cm.calls[-1] == ("abandon", "s1") and loop.owned == {}
    loop.before_redirect = None
    (ev,) = loop.round()  # the next round offers the group again
    assert (ev.kind, ev.ok, ev.new_server_id) == ("offload", True, "s2")


class Ledger:
    """What the loop reads of the ledger: the records, the intents still in flight."""

    def __init__(self):
        self.entries: dict[str, list[str]] = {}
        self.flying: set[str] = set()

    def record(self, dep) -> None:  # the loop's `before_redirect` in `enorm-cloud policy`
        self.entries[dep.server_id] = dep.user_ids

    def get(self, server_id):
        return self.entries.get(server_id)

    def in_flight(self, server_ids):
        return [s in self.flying for s in server_ids]


def with_ledger(cm):
    ledger = Ledger()
    cm.intents = SimpleNamespace(ledger=ledger)
    return ledger


@pytest.mark.parametrize("failure", ["lapsed", "redirect"])
def test_a_move_another_process_completes_counts_as_placed_and_is_not_offered_again(
        failure):
    # the offload's lease was lost to another process (ledger.Lapsed), or its redirect
    # failed and its lease is left to lapse: once recorded, whoever takes it sends the
    # users there (orphans.py); offered again, they would be sent twice
    cm = FakeManager(Edge("a"), Edge("b"))
    ledger = with_ledger(cm)
    where = [LONDON]
    loop = loop_for(cm, where)
    loop.before_redirect = ledger.record
    cm.fail.add(failure)
    ledger.flying.add("s1")  # its intent: until the taker has sent the users
    (ev,) = loop.round()
    assert (ev.kind, ev.ok, ev.new_server_id, ev.figures["taken_over"]) == (
        "offload", True, "s1", True)
    assert loop.owned["party"].server_id == "s1" and loop.carried == {"party": "s1"}
    cm.fail.clear()
    where[0] = PARIS  # a better node: no decision while another process completes it
    assert loop.round() == [] and loop.round() == []
    assert [c[0] for c in cm.calls] == ["offload"]
    ledger.flying.clear()  # the users sent there, the intent released
    (ev,) = loop.round()  # the group is the loop's again, on that server
    assert (ev.kind, ev.server_id, ev.to, ev.ok) == ("handover", "s1", "b", True)
    assert loop.carried == {} and "taken_over" not in ev.figures


def test_a_move_that_failed_before_its_record_or_with_no_ledger_is_offered_again():
    cm = FakeManager(Edge("a"), Edge("b"))
    ledger = with_ledger(cm)
    loop = loop_for(cm, [LONDON])
    cm.fail.add("lapsed")  # taken over before its record: the taker ended it
    (ev,) = loop.round()  # (no `before_redirect`: nothing recorded)
    assert (ev.kind, ev.ok) == ("offload", False) and "lapsed" in ev.error
    assert loop.owned == {} and loop.carried == {} and ledger.entries == {}
    cm.fail.clear()
    (ev,) = loop.round()
    assert (ev.kind, ev.ok, ev.new_server_id) == ("offload", True, "s2")


def test_a_handover_or_a_move_off_a_down_node_another_process_completes():
    cm = FakeManager(Edge("a"), Edge("b"))
    ledger = with_ledger(cm)
    where = [LONDON]
    loop = loop_for(cm, where, settings=DOWN_AT_ONCE)
    loop.before_redirect = ledger.record
    loop.round()
    where[0] = PARIS
    cm.fail.add("lapsed")
    ledger.flying.add("s2")
    (ev,) = loop.round()  # the handover's switch taken over: the group on s2
    assert (ev.kind, ev.server_id, ev.new_server_id, ev.ok) == ("handover", "s1", "s2", True)
    assert loop.owned["party"].server_id == "s2" and loop.carried == {"party": "s2"}
    ledger.flying.clear()
    assert loop.round() == [] and loop.carried == {}
    cm.edges[1].up = False  # b down: to a in one move, which is taken over too
    cm.fail.add("unreached")
    ledger.flying.add("s3")
    (ev,) = loop.round()
    assert (ev.kind, ev.reason, ev.new_server_id, ev.ok) == ("handover", "node_down", "s3",
                                                             True)
    # the users are not sent home (the taker sends them to s3); s2 waits to be merged
    assert not any(c[0] == "withdraw" for c in cm.calls)
    assert loop.owned["party"].server_id == "s3" and list(loop.unreached) == ["s2"]
