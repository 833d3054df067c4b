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


def offload_and_play(cloud, edge, manifest: str) -> int:
    """The served users copied out and played on the edge; returns how many keys were
    copied out, of which the edge changes 3 and deletes 1."""
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
    return report.keys


def check(cloud, edge, report, copied, victim_before, other_before) -> None:
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
    # Left as copied on the edge (changed on the cloud alone, or on neither side):
    # untouched, and the edge's stale copy of the cloud's change does not undo it.
    assert report.untouched == copied - 4
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
    copied = offload_and_play(cloud, edge, name)
    victim, other = state(cloud, [VICTIM]), state(cloud, [OTHER])
    manifest = cloud.hgetall(name)
    report = datasync.merge_back(edge, cloud, shared_patterns=keys.SHARED_PATTERNS,
                                 user_ids=SERVED, manifest=name, cloud_wins=["u:*"])
    check(cloud, edge, report, copied, victim, other)
    # A merge retried after one that wrote everything but died before dropping the
    # manifest: what it wrote itself is no conflict; the cloud-won key still is.
    cloud.hset(name, mapping=manifest)
    again = datasync.merge_back(edge, cloud, shared_patterns=keys.SHARED_PATTERNS,
                                user_ids=SERVED, manifest=name, cloud_wins=["u:*"])
    assert again.conflicts == 1 and again.conflict_sample == ["u:{a2}"]
    assert again.deleted == 0 and cloud.hget(keys.user("a2"), "name") == b"renamed-on-cloud"


@pytest.mark.parametrize("manifest", ["marked", "unmarked"])
@pytest.mark.parametrize("kind", ["standalone", "cluster"])
def test_a_key_the_edge_left_as_copied_is_untouched(kind, manifest, redis_server, request):
    """With a manifest, a key the edge left as copied is not sent nor written: the
    cloud's value stands, whatever the cloud did meanwhile. One that went out without a
    TTL and that the edge left without one costs the cloud no call at all: a TTL the
    cloud gave it meanwhile stands too. With a TTL on either side an unchanged value
    takes the edge's TTL (the TTL is not in the digest), a value the cloud changed keeps
    the cloud's. A value the edge changed is restored. Nothing else is lost. A manifest
    written before the TTL mark ("unmarked") is still read: every key without a TTL is
    asked (one PTTL), and the edge's lack of a TTL is set where the cloud gave one."""
    if kind == "cluster":
        cloud = datasync.connect(request.getfixturevalue("redis_cluster").url, cluster=True)
    else:
        cloud = datasync.connect(redis_server().url)
    edge = datasync.connect(redis_server().url)
    users = [f"q{i}" for i in range(40)]
    fill_users(cloud, users)
    cloud.set("ttl:{q1}", "v", ex=3600)
    cloud.set("persist:{q2}", "v", ex=3600)
    cloud.set("gone:{q6}", "v", ex=3600)
    for u in ("q8", "q9", "q10"):  # hash tables: their digest is not in their payload
        cloud.sadd(f"big:{{{u}}}", *(f"species-{s}" for s in range(200)))
    name = datasync.manifest_key("same")
    copied = datasync.copy_users(cloud, edge, users, manifest=name)
    marks = cloud.hgetall(name)
    assert {len(v) for v in marks.values()} == {16, 17}
    assert [k for k, v in marks.items() if len(v) == 16] and all(
        (len(v) == 16) == (k in (b"ttl:{q1}", b"persist:{q2}", b"gone:{q6}") or cloud.ttl(k) > 0)
        for k, v in marks.items())  # fmt: skip
    if manifest == "unmarked":  # as a copy before the mark wrote it
        cloud.hset(name, mapping={k: v[:16] for k, v in marks.items()})
    edge.hset(keys.user("q0"), "xp", 7)  # the edge changed a value
    edge.expire(keys.user("q3"), 600)  # ... a TTL only
    edge.persist("persist:{q2}")  # ... dropped a TTL
    edge.sadd("big:{q9}", "species-new")  # ... changed a hash table
    # The edge recorded its hash tables as the copy wrote them: their DUMP now tells those
    # left as copied without a digest; a record that no longer matches (here forged, as
    # a rehash alone would make it) costs the digest, and the table is still told apart.
    tables = edge.hgetall(payloads.COPIED_TABLES)
    assert set(tables) == {b"big:{q8}", b"big:{q9}", b"big:{q10}"}
    assert tables[b"big:{q10}"] == edge.dump("big:{q10}")[-8:]
    edge.hset(payloads.COPIED_TABLES, "big:{q8}", b"x" * 8)
    edge.config_resetstat()
    # Meanwhile the cloud changes keys the edge left as copied: values (no TTL, and one
    # with its TTL kept), a delete (no TTL, and one with a TTL), a TTL given.
    cloud.hset(keys.location("q4"), "lat", 9.5)
    cloud.set("ttl:{q1}", "cloud", keepttl=True)
    cloud.delete(keys.pokedex("q5"), "gone:{q6}")
    cloud.expire(keys.user("q7"), 900)
    cloud.expire("big:{q10}", 900)
    nodes = cloud.get_primaries() if kind == "cluster" else [cloud]
    conns = [n.redis_connection if kind == "cluster" else n for n in nodes]
    for c in conns:
        c.config_resetstat()
    report = datasync.merge_back(edge, cloud, user_ids=users, manifest=name)
    def calls(cmd: str) -> int:
        return sum(c.info("commandstats").get(f"cmdstat_{cmd}", {}).get("calls", 0)
                   for c in conns)  # fmt: skip

    # Written: the changed values (restored: q0, and q9's hash table); the TTL of the
    # key the edge gave one (set), the TTL the edge dropped (removed), and without the
    # mark those only the cloud gave (q7, q10: removed, the edge has none, and nothing
    # says they went out without one).
    written = 4 if manifest == "marked" else 6
    assert report.verified and report.keys == written
    assert report.untouched == copied.keys - written
    assert report.conflicts == report.deleted == 0
    assert calls("restore") == 2 and calls("pexpire") == 1
    # Digested: only the edge's changed keys and those with a TTL on either side (q1, q2,
    # q3, and q6, which the cloud deleted: nothing to digest; without the mark q7 and
    # q10 too, which the cloud gave a TTL); the 190-odd others not. The hash tables the
    # edge left (q8, q10) are told by the edge's digest: not sent, not read.
    if manifest == "marked":
        assert calls("persist") == 1 and calls("dump") == 6 and calls("smembers") == 1
        # The one PTTL: the key that went out with a TTL the edge dropped.
        assert calls("pttl") == 1
        # The cloud's TTLs stand.
        assert 0 < cloud.ttl(keys.user("q7")) <= 900 and 0 < cloud.ttl("big:{q10}") <= 900
    else:
        assert calls("persist") == 3 and calls("dump") == 8 and calls("smembers") == 2
        assert calls("pttl") >= report.untouched - 3
        assert cloud.ttl(keys.user("q7")) == -1 and cloud.ttl("big:{q10}") == -1
    assert cloud.scard("big:{q9}") == 201 and cloud.scard("big:{q8}") == 200
    # On the edge: a sorted digest of q8 (its record forged) and q9 (changed) only.
    assert edge.info("commandstats")["cmdstat_smembers"]["calls"] == 2
    assert report.not_owned == 0
    assert cloud.hget(keys.user("q0"), "xp") == b"7"
    assert 0 < cloud.ttl(keys.user("q3")) <= 600
    assert cloud.ttl("persist:{q2}") == -1
    # The cloud's changes stand: its value and TTL, its deletes.
    assert cloud.hget(keys.location("q4"), "lat") == b"9.5"
    assert cloud.get("ttl:{q1}") == b"cloud" and 600 < cloud.ttl("ttl:{q1}") <= 3600
    assert not cloud.exists(keys.pokedex("q5")) and not cloud.exists("gone:{q6}")
    # Everything else is the edge's: 0 keys lost.
    edge_state, cloud_state = state(edge, users), state(cloud, users)
    for k in (keys.location("q4"), "ttl:{q1}", keys.pokedex("q5"), "gone:{q6}"):
        edge_state.pop(k.encode()), cloud_state.pop(k.encode(), None)
    assert cloud_state == edge_state and len(cloud_state) == copied.keys - 4


def test_a_record_of_the_tables_the_tenant_broke_is_no_record(redis_server):
    """The edge's record of its hash tables (`payloads.COPIED_TABLES`) is the tenant's to
    break: made a string before the copy or after it, the copy and the merge still work,
    every table digested, the edge's change found, the cloud's state the edge's."""
    cloud, edge = (datasync.connect(redis_server().url) for _ in range(2))
    for u in ("t1", "t2"):
        cloud.sadd(f"big:{{{u}}}", *(f"species-{s}" for s in range(200)))
    edge.set(payloads.COPIED_TABLES, "not a hash")
    name = datasync.manifest_key("broken")
    copied = datasync.copy_users(cloud, edge, ["t1", "t2"], manifest=name)
    assert copied.keys == 2 and edge.get(payloads.COPIED_TABLES) == b"not a hash"
    edge.sadd("big:{t2}", "species-new")
    edge.config_resetstat()
    report = datasync.merge_back(edge, cloud, user_ids=["t1", "t2"], manifest=name)
    assert report.verified and report.keys == 1 and report.untouched == 1
    assert report.not_owned == 0
    assert edge.info("commandstats")["cmdstat_smembers"]["calls"] == 2
    assert cloud.scard("big:{t1}") == 200 and cloud.scard("big:{t2}") == 201


def test_merge_back_into_a_cluster(redis_cluster, redis_server):
    cloud = datasync.connect(redis_cluster.url, cluster=True)
    edge = datasync.connect(redis_server().url)
    copied = offload_and_play(cloud, edge, datasync.manifest_key("s1"))
    victim, other = state(cloud, [VICTIM]), state(cloud, [OTHER])
    report = datasync.merge_back(edge, cloud, shared_patterns=keys.SHARED_PATTERNS,
                                 user_ids=SERVED, manifest=datasync.manifest_key("s1"),
                                 cloud_wins=["u:*"])
    check(cloud, edge, report, copied, victim, other)


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
    copied = offload_and_play(cloud, a, first)
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
    assert report.untouched == copied - 4
    assert cloud.hget(keys.location("a2"), "lat") == b"48.85"
    b_state, cloud_state = state(b, SERVED), state(cloud, SERVED)
    for k in (b"u:{a2}", b"loc:{a2}"):
        del b_state[k], cloud_state[k]
    assert cloud_state == b_state
    assert not cloud.exists(second)
