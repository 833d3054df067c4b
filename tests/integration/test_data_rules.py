"""The cloud ends up with exactly the served users' data, and only theirs: ownership,
deletes and conflicts of merge_back on real Redis (standalone, and a 3-master cluster as
the cloud), and a hostile edge server on a real node."""

from __future__ import annotations

import pytest
import redis
from test_datasync import fill_users
from test_edge_node import handshake

from enorm import datasync
from enorm.datasync import payloads
from games.pokemon import keys

SERVED, OTHER, VICTIM = ["a1", "a2"], "c3", "v9"


def state(client, users) -> dict[bytes, tuple]:
    """key -> (type, value) of the users' keys."""
    return datasync.read_typed(client, datasync.user_keys(client, users), "source")


def offload_and_play(cloud, edge, manifest: str) -> None:
    fill_users(cloud, [*SERVED, OTHER, VICTIM])
    report = datasync.copy_users(cloud, edge, SERVED, manifest=manifest)
    assert report.manifest and cloud.hlen(manifest) == report.keys
    # The edge server plays: changes, creates and deletes its users' keys...
    edge.hset(keys.user("a1"), "xp", 4242)
    edge.delete(keys.pokedex("a2"))
    edge.sadd("new:{a1}:x", "born-on-edge")
    edge.hset(keys.location("a1"), "lat", 1.0)
    edge.hset(keys.user("a2"), "xp", 7)
    # ... and, being hostile, writes keys of users it never served, shared-looking ones too.
    edge.hset(keys.user(VICTIM), mapping={"name": "pwned", "xp": 0})
    edge.set(f"zz:{{{OTHER}}}", "planted")
    edge.sadd(f"region:{{{VICTIM}}}", "forged")
    # Meanwhile the cloud writes two served users' keys the edge changed too (conflicts),
    # and one the edge left as it was copied (the cloud's is the newer: kept).
    cloud.hset(keys.location("a1"), "lat", 99.0)
    cloud.hset(keys.user("a2"), "name", "renamed-on-cloud")
    cloud.hset(keys.location("a2"), "lat", 48.85)


def check(cloud, edge, report, victim_before, other_before) -> None:
    assert report.verified and report.manifest
    # Ownership: nothing of a user the server did not serve reached the cloud.
    assert report.not_owned == 3
    assert set(report.not_owned_sample) == {"u:{v9}", "zz:{c3}", "region:{v9}"}
    assert state(cloud, [VICTIM]) == victim_before and state(cloud, [OTHER]) == other_before
    assert not cloud.exists("region:{v9}")
    # Deletes reach the cloud; creations too.
    assert report.deleted == 1 and not cloud.exists(keys.pokedex("a2"))
    assert cloud.smembers("new:{a1}:x") == {b"born-on-edge"}
    # Conflicts are reported; the edge wins, except where the cloud wins by pattern.
    assert report.conflicts == 2
    assert set(report.conflict_sample) == {"loc:{a1}", "u:{a2}"}
    assert report.conflicts_cloud_won == 1
    assert cloud.hget(keys.location("a1"), "lat") == b"1.0"  # edge won
    assert cloud.hget(keys.user("a2"), "name") == b"renamed-on-cloud"  # cloud won (u:*)
    # Changed on the cloud alone: not a conflict, and the edge's stale copy does not undo it.
    assert report.cloud_kept == 1
    assert cloud.hget(keys.location("a2"), "lat") == b"48.85"
    # Everything else of the served users equals the edge's final state, key set included.
    edge_state, cloud_state = state(edge, SERVED), state(cloud, SERVED)
    for k in (b"u:{a2}", b"loc:{a2}"):
        del edge_state[k], cloud_state[k]
    assert cloud_state == edge_state
    assert not cloud.exists(datasync.manifest_key("s1"))


def test_merge_back_owned_keys_deletes_and_conflicts(redis_server):
    cloud = datasync.connect(redis_server().url)
    edge = datasync.connect(redis_server().url)
    name = datasync.manifest_key("s1")
    offload_and_play(cloud, edge, name)
    victim, other = state(cloud, [VICTIM]), state(cloud, [OTHER])
    manifest = cloud.hgetall(name)
    report = datasync.merge_back(edge, cloud, shared_patterns=keys.SHARED_PATTERNS,
                                 user_ids=SERVED, manifest=name, cloud_wins=["u:*"])
    check(cloud, edge, report, victim, other)
    # A merge retried after one that wrote everything but died before dropping the
    # manifest: what it wrote itself is no conflict; the cloud-won key still is.
    cloud.hset(name, mapping=manifest)
    again = datasync.merge_back(edge, cloud, shared_patterns=keys.SHARED_PATTERNS,
                                user_ids=SERVED, manifest=name, cloud_wins=["u:*"])
    assert again.conflicts == 1 and again.conflict_sample == ["u:{a2}"]
    assert again.deleted == 0 and cloud.hget(keys.user("a2"), "name") == b"renamed-on-cloud"


@pytest.mark.parametrize("kind", ["standalone", "cluster"])
def test_a_key_neither_side_changed_is_not_written_again(kind, redis_server, request):
    """With a manifest, a key whose value neither the edge nor the cloud changed is found
    equal by its digest and not rewritten (nor sent): only its TTL is set as the edge has
    it (the TTL is not in the digest); a change of value is restored."""
    if kind == "cluster":
        cloud = datasync.connect(request.getfixturevalue("redis_cluster").url, cluster=True)
    else:
        cloud = datasync.connect(redis_server().url)
    edge = datasync.connect(redis_server().url)
    users = [f"q{i}" for i in range(40)]
    fill_users(cloud, users)
    cloud.set("ttl:{q1}", "v", ex=3600)
    cloud.set("persist:{q2}", "v", ex=3600)
    name = datasync.manifest_key("same")
    copied = datasync.copy_users(cloud, edge, users, manifest=name)
    edge.hset(keys.user("q0"), "xp", 7)  # the edge changed a value
    edge.expire(keys.user("q3"), 600)  # ... a TTL only
    edge.persist("persist:{q2}")  # ... dropped a TTL
    nodes = cloud.get_primaries() if kind == "cluster" else [cloud]
    conns = [n.redis_connection if kind == "cluster" else n for n in nodes]
    for c in conns:
        c.config_resetstat()
    report = datasync.merge_back(edge, cloud, user_ids=users, manifest=name)
    def calls(cmd: str) -> int:
        return sum(c.info("commandstats").get(f"cmdstat_{cmd}", {}).get("calls", 0)
                   for c in conns)  # fmt: skip

    # Written: the changed value (restored); the TTL of the key the edge gave one and of
    # the key that kept its own (set), the TTL the edge dropped (removed).
    assert report.keys == copied.keys and report.unchanged == copied.keys - 4
    assert calls("restore") == 1 and calls("pexpire") == 2
    assert cloud.hget(keys.user("q0"), "xp") == b"7"
    assert 0 < cloud.ttl(keys.user("q3")) <= 600
    assert cloud.ttl("persist:{q2}") == -1 and 0 < cloud.ttl("ttl:{q1}") <= 3600
    assert state(cloud, users) == state(edge, users)


def test_merge_back_into_a_cluster(redis_cluster, redis_server):
    cloud = datasync.connect(redis_cluster.url, cluster=True)
    edge = datasync.connect(redis_server().url)
    offload_and_play(cloud, edge, datasync.manifest_key("s1"))
    victim, other = state(cloud, [VICTIM]), state(cloud, [OTHER])
    report = datasync.merge_back(edge, cloud, shared_patterns=keys.SHARED_PATTERNS,
                                 user_ids=SERVED, manifest=datasync.manifest_key("s1"),
                                 cloud_wins=["u:*"])
    check(cloud, edge, report, victim, other)


@pytest.mark.system
def test_hostile_edge_server_on_a_real_node(edge_node, redis_server):
    """The node merges only the setup request's users, whatever the container's Redis
    holds, and says what it refused, in the result and in the event."""
    node = edge_node()
    sink = redis_server()
    cloud = datasync.connect(sink.url)
    fill_users(cloud, ["u1", VICTIM])
    victim = state(cloud, [VICTIM])
    body = handshake(node, users=[{"id": "u1", "address": "10.90.0.2"}],
                     data_sink={"url": sink.url, "shared_patterns": keys.SHARED_PATTERNS}).json()
    sid = body["server_id"]
    edge = redis.Redis(host=body["address"], port=6379, password=body["redis_password"])
    datasync.copy_users(cloud, edge, ["u1"], manifest=datasync.manifest_key(sid))
    edge.delete(keys.pokedex("u1"))
    edge.hset(keys.user(VICTIM), "name", "pwned")  # another user's data
    edge.set("enorm:acl:{x}", "forged")  # anything tagged
    edge.sadd("region:gcpvj0", "user:u1")  # a shared key: merged
    r = node.client().delete(f"{node.url}/v1/servers/{sid}", timeout=60)
    assert r.status_code == 200, r.text
    res = r.json()
    assert res["not_owned"] == 2 and set(res["not_owned_sample"]) == {"u:{v9}", "enorm:acl:{x}"}
    assert res["keys_deleted"] == 1 and res["conflicts"] == 0
    assert state(cloud, [VICTIM]) == victim and not cloud.exists("enorm:acl:{x}")
    assert not cloud.exists(keys.pokedex("u1"))
    assert cloud.smembers("region:gcpvj0") == {b"user:u1"}
    ev = next(e for e in node.client().get(f"{node.url}/v1/events?server={sid}",
                                           timeout=10).json()
              if e["type"] == "server.terminated")
    assert ev["data"]["not_owned"] == 2 and ev["data"]["keys_deleted"] == 1


def test_a_handover_node_to_node_merges_as_the_first_edge_would_have(redis_server):
    """Edge A's users go straight to edge B (export, restore); A merges only its shared
    keys and leaves the manifest, which moves to B; B's merge then does what A's would
    have done: deletes, creations, conflicts. Nothing of users A did not serve travels."""
    cloud, a, b = (datasync.connect(redis_server().url) for _ in range(3))
    first, second = datasync.manifest_key("s1"), datasync.manifest_key("s2")
    offload_and_play(cloud, a, first)
    a.sadd("region:gcpvj0", "user:a1")  # a shared key written on A
    victim_before, other_before = state(cloud, [VICTIM]), state(cloud, [OTHER])
    served_before = state(cloud, SERVED)

    dumped, others = datasync.export_users(a, SERVED, keys.SHARED_PATTERNS)
    assert set(dumped) == set(datasync.user_keys(a, SERVED)) and others == 3
    assert len(payloads.restore(b, dumped, replace=True)) == len(dumped)
    left = datasync.merge_back(a, cloud, shared_patterns=keys.SHARED_PATTERNS,
                               user_ids=SERVED, manifest=first, handed=SERVED)
    assert left.verified and left.keys == 0 and left.deleted == 0 and left.not_owned == 3
    assert state(cloud, SERVED) == served_before  # the handed users' keys: B's to merge
    assert cloud.sismember("region:gcpvj0", "user:a1")
    assert cloud.exists(first)

    assert datasync.move_manifest(cloud, first, second) == cloud.hlen(second) > 0
    assert not cloud.exists(first)
    report = datasync.merge_back(b, cloud, shared_patterns=keys.SHARED_PATTERNS,
                                 user_ids=SERVED, manifest=second, cloud_wins=["u:*"])
    assert report.verified and report.manifest and report.not_owned == 0
    assert state(cloud, [VICTIM]) == victim_before and state(cloud, [OTHER]) == other_before
    assert report.deleted == 1 and not cloud.exists(keys.pokedex("a2"))
    assert cloud.smembers("new:{a1}:x") == {b"born-on-edge"}
    assert report.conflicts == 2 and report.conflicts_cloud_won == 1
    assert cloud.hget(keys.location("a1"), "lat") == b"1.0"
    assert cloud.hget(keys.user("a2"), "name") == b"renamed-on-cloud"
    assert report.cloud_kept == 1 and cloud.hget(keys.location("a2"), "lat") == b"48.85"
    b_state, cloud_state = state(b, SERVED), state(cloud, SERVED)
    for k in (b"u:{a2}", b"loc:{a2}"):
        del b_state[k], cloud_state[k]
    assert cloud_state == b_state
    assert not cloud.exists(second)
