"""The policy loop learns of a take-over (issues 31 and 32), on a real Redis with the
real ledger, leases and orphans' take-over: the loop's process records its offload, then
stalls past its lease; another process's reconcile takes the offload and completes it
(sends the users there). The loop's move fails (`Lapsed`), and its next rounds must not
offer those users again: the group counts as placed on that server, and gets no
decision until the other process has sent them there (its intent released)."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

from cloud_manager import ledger as ledger_mod
from cloud_manager.ledger import Entry, Intent, Intents, Ledger
from cloud_manager.orphans import Orphans, Verdict
from cloud_manager.policy import Settings
from cloud_manager.policy_loop import Group, PolicyLoop
from enorm import datasync
from enorm.protocol import User
from tests.unit.test_policy_loop import LONDON, PARIS, Edge

LEASE_S = 0.3
USERS = [User(id="t1", address="203.0.113.1"), User(id="t2", address="203.0.113.2")]


class Owner:
    """The loop's cloud manager: an offload that records its server, then stalls past
    its lease (as a process paused by the machine) before it sends the users."""

    def __init__(self, ledger: Ledger, edges, stalled) -> None:
        self.edges, self.registry, self.priority = edges, None, 5
        self.cloud, self.closing = None, threading.Event()
        self.intents = Intents(ledger, LEASE_S)  # renewals not running: the stall
        self.stalled, self.offloads, self.redirected = stalled, [], []

    def offload(self, users, exclude=(), before_redirect=None, **over):
        (edge,) = [e for e in self.edges if e.name not in exclude]
        sid = f"takeover-{len(self.offloads)}"
        self.offloads.append(sid)
        self.intents.begin(Intent(Entry(server_id=sid, node=edge.name, app="game",
                                        url=f"http://192.0.2.1/{sid}", users=list(users))))
        dep = SimpleNamespace(server_id=sid, edge=edge, users=list(users),
                              user_ids=[u.id for u in users], ended=threading.Event(),
                              state="deployed", end_reason=None, session=None, timings={},
                              merge=None)
        before_redirect(dep)
        self.stalled(sid)
        self.intents.keep(sid)  # raises Lapsed: another process took it
        self.redirected.append(sid)
        return dep


def test_a_group_whose_offload_another_process_completes_is_not_offered_again(
        redis_server):
    cloud = datasync.connect(redis_server().url)
    ledger = Ledger(cloud)
    edges = [Edge("ta"), Edge("tb")]
    sent, go_on, sending = [], threading.Event(), threading.Event()

    def send_users(dep):  # the taker's redirect, held until the loop's rounds are seen
        sending.set()
        assert go_on.wait(10)
        sent.append((dep.server_id, sorted(dep.user_ids)))

    taker_cm = SimpleNamespace(registry=object(), edges=edges, intents=None,
                               app=SimpleNamespace(name="game"), send_users=send_users)
    taker = Orphans(taker_cm, ledger, lease_s=10.0)
    took: dict[str, Verdict] = {}

    def stalled(sid):  # past its lease; the other process's reconcile takes it over
        time.sleep(LEASE_S + 0.1)
        t = threading.Thread(target=lambda: took.update(
            taker.take_over(ledger_mod.shard(sid))))
        t.start()
        assert sending.wait(10)  # taken (its lease the taker's), users being sent

    owner = Owner(ledger, edges, stalled)
    where = [LONDON]
    loop = PolicyLoop(owner, Settings(cloud_ms=40.0, dwell_s=0.0, withdraw_dwell_s=0.0,
                                      locations={"ta": LONDON, "tb": PARIS}),
                      lambda _: [Group("party", USERS, where[0])])
    loop.before_redirect = lambda dep: ledger.record(Entry(
        server_id=dep.server_id, node=dep.edge.name, app="game",
        url=f"http://192.0.2.1/{dep.server_id}", users=dep.users))
    (ev,) = loop.round()
    sid = owner.offloads[0]
    assert (ev.kind, ev.ok, ev.new_server_id, ev.figures.get("taken_over")) == (
        "offload", True, sid, True)
    assert owner.redirected == [] and loop.carried == {"party": sid}
    where[0] = PARIS  # a better node: still nothing while the taker sends the users
    assert loop.round() == [] and loop.round() == [] and owner.offloads == [sid]
    assert ledger.in_flight([sid]) == [True]
    go_on.set()
    deadline = time.time() + 10
    while ledger.in_flight([sid]) == [True] and time.time() < deadline:
        time.sleep(0.05)
    assert took == {sid: Verdict.COMPLETED} and sent == [(sid, ["t1", "t2"])]
    where[0] = LONDON
    assert loop.round() == [] and loop.carried == {}  # done: served there, as placed
    assert {ledger.where(u.id).server_id for u in USERS} == {sid}
    assert owner.offloads == [sid] and ledger.ids() == [sid]  # never offered again
