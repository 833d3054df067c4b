"""The cloud side's state spread over a Redis Cluster's slots (issue 32): the registry and
the ledger, on a plain Redis and on a 3-master cluster, as several processes see them."""

from __future__ import annotations

import json
import random
import time

import pytest
from redis.crc import key_slot

from cloud_manager import EdgeClient
from cloud_manager import ledger as ledger_mod
from cloud_manager import registry as registry_mod
from cloud_manager.ledger import Entry, Ledger
from cloud_manager.placement import Placer, Weights, base_cost, order, summary_candidate
from cloud_manager.registry import Registry
from enorm import datasync
from enorm.protocol import NodeOffer, Resources, SetupRequest, User


def offer(name: str, free_cores: float = 2.0) -> NodeOffer:
    r = Resources(cores=4, memory_mb=4096)
    return NodeOffer(name=name, capacity=r, reserved=Resources(cores=0, memory_mb=0),
                     basic_service=Resources(cores=0, memory_mb=0), allocated=r,
                     free=Resources(cores=free_cores, memory_mb=2048),
                     unit=Resources(cores=1, memory_mb=200), servers=0, admission="paper",
                     ports_free=100, autoscale_interval_s=300)


@pytest.fixture(params=["standalone", "cluster"])
def cloud(request, redis_server):
    if request.param == "cluster":
        return datasync.connect(request.getfixturevalue("redis_cluster").url, cluster=True)
    return datasync.connect(redis_server().url)


def masters_of(cloud, keys: list[str]) -> dict[str, int]:
    """How many of `keys` each master holds (one 'master' when standalone)."""
    if not datasync.is_cluster(cloud):
        return {"standalone": len(keys)}
    out: dict[str, int] = {}
    for k in keys:
        node = cloud.nodes_manager.get_node_from_slot(key_slot(k.encode()))
        out[node.name] = out.get(node.name, 0) + 1
    return out


def test_the_registry_spreads_and_answers_who_is_up_in_one_read(cloud):
    now = [1000.0]
    reg = Registry(cloud, down_after_s=10.0, clock=lambda: now[0])
    names = [f"n{i}" for i in range(300)]
    answers = [registry_mod.Answer(n, f"http://10.0.0.1/{n}",
                                   offer(n) if i % 3 else None, "no answer", None)
               for i, n in enumerate(names)]
    states = reg.record_many(answers, ttl_s=30.0)
    up = {n for i, n in enumerate(names) if i % 3}
    assert {n for n, st in states.items() if st.seen_at is not None} == up
    assert reg.names() == sorted(names)
    assert set(reg.names(up_only=True)) == up
    # Another process sees the same view; the node's own TTL (30 s) beats down_after_s.
    other = Registry(cloud, down_after_s=10.0, clock=lambda: now[0] + 25)
    assert set(other.names(up_only=True)) == up
    assert {n for n, st in other.up_among(names).items() if st is not None} == up
    assert other.nodes()["n1"].offer.name == "n1" and other.get("n0").seen_at is None
    # A node that stops answering keeps its last offer and goes down at its TTL.
    now[0] += 5
    reg.record("n1", "http://10.0.0.1/n1", None, "timed out")
    st = other.get("n1")
    assert st.offer is not None and st.error == "timed out" and st.seen_at == 1000.0
    now[0] += 26
    assert not reg.up("n1") and "n1" not in reg.names(up_only=True)
    reg.forget("n1")
    assert reg.get("n1") is None and "n1" not in reg.names()
    # No slot holds the fleet: the nodes' keys and the index spread over every master.
    keys = [registry_mod.node_key(n) for n in names]
    assert len({key_slot(k.encode()) for k in keys}) > 250
    index = [registry_mod.index_key(k) for k in range(registry_mod.SHARDS)]
    spread = masters_of(cloud, keys + index)
    assert len(spread) == (3 if datasync.is_cluster(cloud) else 1)
    assert max(spread.values()) < 0.5 * len(keys + index) or len(spread) == 1
    with pytest.raises(ValueError, match="braces"):
        reg.get("a{b}")


def test_the_rank_gives_the_shortlist_a_whole_fleet_read_would_without_reading_it(cloud):
    """Registry.ranked (issue 32): the 16 best nodes up that admit a request, by the cost
    but the latency, as ranking every node's summary would pick them; down nodes left out
    (and out of the rank once passed), a node above the request's priority skipped."""
    rng, now = random.Random(7), 1000.0
    reg = Registry(cloud, down_after_s=10.0, clock=lambda: now)
    answers, down = [], set()
    for i in range(600):
        n = f"r{i}"
        o = offer(n, free_cores=rng.choice([0.0, 1.0, 2.0, 4.0])).model_copy(
            update={"load": rng.uniform(0, 2), "min_priority": rng.choice([0, 0, 0, 8])})
        at = now if i % 7 else now - 100  # every 7th went down long ago
        if not i % 7:
            down.add(n)
        answers.append(registry_mod.Answer(n, f"http://10.0.0.1/{n}", o, at=at))
    reg.record_many(answers, ttl_s=30.0)
    fits = lambda n, s: summary_candidate(n, s, 5).admits  # noqa: E731
    sums = reg.summaries()
    assert not down & set(sums)
    whole = [n for n in order([summary_candidate(n, s, 5) for n, s in sums.items()],
                              "scored") if fits(n, sums[n])][:16]
    read = reg.ranked(16, fits)
    best = [n for n, s in read if fits(n, s)][:16]
    assert [base_cost(sums[n], Weights()) for n in best] == [
        base_cost(sums[n], Weights()) for n in whole]  # (ties in either order)
    assert len(read) < 200 and not down & {n for n, _ in read}  # a few per shard, up only
    # the down nodes passed left the rank; one that answers again is back in it
    ranks = [registry_mod.rank_key(j) for j in range(registry_mod.RANK_SHARDS)]
    assert sum(cloud.zcard(k) for k in ranks) < 600
    reg.forget(best[0])
    assert best[0] not in dict(reg.ranked(16, fits))
    assert cloud.zscore(registry_mod.rank_key(registry_mod.rank_shard(best[0])),
                        best[0]) is None


def test_the_rank_s_head_in_memory_gives_what_the_cluster_would(cloud):
    """RankHead (issue 32): the first round read from a copy of each shard's head gives
    the rank's own answer on a fleet that did not move, leaves out a node gone down since
    its reading, and is not used once it is stale."""
    rng, now = random.Random(3), [1000.0]
    reg = Registry(cloud, down_after_s=10.0, clock=lambda: now[0])
    reg.record_many([registry_mod.Answer(
        f"h{i}", "http://10.0.0.1", offer(f"h{i}", rng.choice([1.0, 2.0, 4.0])).model_copy(
            update={"load": rng.uniform(0, 2)}), at=now[0] - rng.uniform(0, 20))
        for i in range(400)], ttl_s=30.0)
    fits = lambda n, s: summary_candidate(n, s, 5).admits  # noqa: E731
    head = registry_mod.RankHead(reg, reg.first_page(32), every_s=60.0)
    head.refresh()
    fresh = reg.ranked(32, fits)
    assert reg.ranked(32, fits, head=head) == fresh
    # 15 s on: the nodes last seen over 15 s before their bound are down; the head read
    # before holds them, the answer does not
    now[0] += 15.0
    down = {n for n, _ in fresh} - {n for n, _ in reg.ranked(32, fits)}
    assert down and not down & {n for n, _ in reg.ranked(32, fits, head=head)}
    assert head.pages(reg.first_page(32)) is not None
    assert head.pages(reg.first_page(32) + 1) is None  # holds too few of each shard
    head.every_s = 0.01
    time.sleep(0.05)
    assert head.pages(reg.first_page(32)) is None  # stale: the cluster is read


def test_a_placement_among_a_large_fleet_probes_the_rank_s_shortlist_and_the_near(cloud):
    """Placer (issue 32): of 600 nodes, the 16 of the rank's shortlist and the node named
    near are probed (here they do not answer: latency unknown, so the summaries decide),
    in the order a ranking of every summary gives; with weights other than the
    registry's the whole fleet is read instead, and names the nodes down."""
    reg = Registry(cloud, down_after_s=10.0)
    rng = random.Random(3)
    reg.record_many([registry_mod.Answer(
        f"p{i}", "http://127.0.0.1:1", offer(f"p{i}", free_cores=rng.choice([1.0, 4.0])
                                              ).model_copy(update={"load": rng.uniform(0, 2)}),
        at=time.time() - (100 if i < 30 else 0)) for i in range(600)], ttl_s=30.0)
    edges = [EdgeClient("http://127.0.0.1:1", "t", name=f"p{i}", retries=0, timeout=0.5)
             for i in range(600)]
    req = SetupRequest.model_construct(priority=5, users=[])
    sums = reg.summaries()
    whole = order([summary_candidate(n, s, 5) for n, s in sums.items()], "scored")
    near = next(n for n in whole[100:] if n in sums)
    placer = Placer(reg, "scored")
    try:
        order_, refused, placed = placer.place(edges, req, near=[near])
    finally:
        placer.close()  # (its rank's head, started by the decision)
    names = [e.name for e in order_]
    costs = [base_cost(sums[n], Weights()) for n in whole[:16]]  # (ties in either order)
    assert [base_cost(sums[n], Weights()) for n in names[:16]] == costs
    assert near in placed["nodes"] and len(placed["nodes"]) == 17
    assert len(names) < 200 and not refused  # the rank's first pages, not the fleet
    order_, refused, _ = Placer(reg, "scored", Weights(load=0.5)).place(edges, req)
    assert len(order_) == 570 and len(refused) == 30


def test_the_ledger_spreads_and_a_user_who_moved_on_keeps_the_newer_deployment(cloud):
    led = Ledger(cloud)
    users = [User(id=f"u{i}", address="10.1.0.1") for i in range(200)]
    for s in range(20):
        led.record(Entry(server_id=f"s{s:02d}", node=f"n{s % 3}", app="g", url="http://x",
                         users=users[s * 10:(s + 1) * 10], created_at=float(s)))
    assert [e.server_id for e in led.all()] == [f"s{s:02d}" for s in range(20)]
    assert led.where("u42").server_id == "s04" and led.where("nobody") is None
    # u40..u44 move to a new deployment; forgetting the old one keeps their pointers.
    led.record(Entry(server_id="s99", node="n1", app="g", url="http://y",
                     users=users[40:45], created_at=99.0))
    led.forget("s04")
    assert led.get("s04") is None
    assert led.where("u42").server_id == "s99" and led.where("u47") is None
    # `where` is one read: the pointer holds the server, its node and URL.
    assert led.where("u43") == ledger_mod.Served("s99", "n1", "http://y")
    cloud.rename(ledger_mod.deployment_key("s99"), "moved:{s99}")
    assert led.where("u43") == ledger_mod.Served("s99", "n1", "http://y")
    cloud.rename("moved:{s99}", ledger_mod.deployment_key("s99"))
    # A pointer of the older shape (the server id alone) is read through its deployment:
    # one that is gone reads as none.
    cloud.set(ledger_mod.user_key("u48"), "s04")
    assert led.where("u48") is None
    cloud.set(ledger_mod.user_key("u49"), "s03")
    assert led.where("u49") == ledger_mod.Served("s03", "n0", "http://x")
    # A process killed between a deployment and its pointers: the repair finishes it;
    # a user in two deployments points at the newer, as `record` would have left it.
    half = Entry(server_id="s50", node="n0", app="g", url="http://z",
                 users=[users[1], users[48], User(id="new", address="10.1.0.2")],
                 created_at=50.0)
    cloud.set(ledger_mod.deployment_key("s50"), half.to_json())
    cloud.sadd(ledger_mod.index_key(ledger_mod.shard("s50")), "s50")
    assert led.where("new") is None
    assert led.repair() == 3  # `new`, u48 (its pointer named s04, gone), u1 (s00 is older)
    assert led.where("new").server_id == "s50" == led.where("u48").server_id
    assert led.where("u1").server_id == "s50" and led.where("u42").server_id == "s99"
    assert led.repair() == 0
    keys = [ledger_mod.user_key(u.id) for u in users]
    spread = masters_of(cloud, keys)
    assert len(spread) == (3 if datasync.is_cluster(cloud) else 1)
    assert max(spread.values()) < 0.5 * len(keys) or len(spread) == 1
    # The users' pointers are the library's keys: no copy finds them as a user's data.
    assert not [k for k in datasync.user_keys(cloud, ["u1"]) if b"served-by" in k]


def test_a_server_ended_before_its_record_is_never_recorded_nor_pointed_at(cloud):
    """The ended mark (issue 32): the orphans' reconcile fences a server the ledger does
    not know before it ends it, and a withdrawal marks its deployment, so that a record
    or a repair that comes late writes nothing that lasts."""
    led = Ledger(cloud)
    users = [User(id=f"f{i}", address="10.1.0.1") for i in range(5)]
    late = Entry(server_id="o1", node="n0", app="g", url="http://o", users=users[:2])
    assert led.fence("o1")
    with pytest.raises(ledger_mod.Ended, match="o1"):
        led.record(late)
    assert led.get("o1") is None and led.where("f0") is None and "o1" not in led.ids()
    # a recorded server is known: not fenced
    kept = Entry(server_id="k1", node="n0", app="g", url="http://k", users=users[2:4])
    led.record(kept)
    assert not led.fence("k1") and led.where("f2").server_id == "k1"
    # a repair of a deployment withdrawn meanwhile takes back what it wrote
    led.forget("k1")
    assert led.repair([kept]) == 2 and led.where("f2") is None
    with pytest.raises(ledger_mod.Ended):
        led.record(kept)
    # a record cut between the deployment and the rest is finished
    half = Entry(server_id="h1", node="n1", app="g", url="http://h", users=users[4:])
    cloud.set(ledger_mod.deployment_key("h1"), half.to_json())
    assert "h1" not in led.ids() and led.where("f4") is None
    assert led.finish(half) == 1
    assert "h1" in led.ids() and led.where("f4").server_id == "h1" and led.finish(half) == 0


def test_an_offload_in_flight_is_leased_and_taken_by_one_process_once_it_lapses(cloud):
    """Intents (issue 32): an offload in flight is its owner's while it renews its lease;
    lapsed, it is listed for the others, one of them takes it, and it is gone once
    released. The owner, stalled past its lease, takes it back if nobody did, and learns
    it was taken over if somebody did."""
    led = Ledger(cloud)
    e = Entry(server_id="i1", node="n0", app="g", url="http://i",
              users=[User(id="iu1", address="10.2.0.1")])
    k = ledger_mod.shard("i1")
    led.intend(ledger_mod.Intent(e, handed_over_from="i0"), "alive", lease_s=0.3)
    assert led.leased(["i1"]) == [True] and led.lapsed(k) == []
    assert not led.take("i1", "other", 5.0)  # its owner's while it lives
    assert led.renew(["i1"], "alive", 0.3) == []
    time.sleep(0.4)  # the owner stalled a lease: nobody took it, so it takes it back
    assert led.renew(["i1"], "alive", 0.3) == [] and led.leased(["i1"]) == [True]
    time.sleep(0.4)
    (lapsed,) = led.lapsed(k)
    assert lapsed == ledger_mod.Intent(e, handed_over_from="i0")
    assert led.take("i1", "b", 5.0) and not led.take("i1", "c", 5.0)  # one taker
    assert led.renew(["i1"], "alive", 0.3) == ["i1"]  # the owner learns it was taken
    assert led.where("iu1") is None  # an intent is not a record
    led.release("i1")
    assert led.lapsed(k) == [] and led.leased(["i1"]) == [False]
    assert led.renew(["i1"], "alive", 0.3) == ["i1"]  # carried on: not the owner's again
    assert led.leased(["i1"]) == [False]
    assert cloud.get(ledger_mod.intent_key("i1")) is None
    assert "i1" not in {x.decode() for x in cloud.smembers(ledger_mod.intents_key(k))}


def test_a_ledger_of_the_old_shape_is_adopted(cloud):
    old = Entry(server_id="s1", node="n0", app="g", url="http://x",
                users=[User(id="cloud", address="10.0.0.1")])
    cloud.hset("enorm:{cloud}:deployments", "s1", old.to_json())
    cloud.hset("enorm:{cloud}:users", "cloud", "s1")
    led = Ledger(cloud)
    assert led.adopt_legacy() == 1 and led.adopt_legacy() == 0
    assert led.where("cloud").server_id == "s1"
    assert json.loads(led.get("s1").to_json())["node"] == "n0"
    assert not cloud.exists("enorm:{cloud}:deployments", "enorm:{cloud}:users")
