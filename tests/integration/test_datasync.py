"""enorm.datasync against real redis-server processes (standalone and a 3-master cluster)."""

from __future__ import annotations

import os
import random
import time

import pytest
import redis

from enorm import datasync
from enorm.datasync import payloads, transport
from games.pokemon import keys

USERS = 16_384


def fill_users(client, user_ids, seed: int = 1) -> int:
    """Game-shaped data: 4-10 keys per user. Returns the number of keys written."""
    rng = random.Random(seed)
    n = 0
    pipe = client.pipeline(transaction=False)
    for i, uid in enumerate(user_ids):
        pms = rng.randrange(0, 7)
        pipe.hset(keys.user(uid), mapping={"id": uid, "name": f"t{uid}", "xp": rng.randrange(999)})
        pipe.sadd(keys.pokedex(uid), *rng.sample(range(1, 152), 3))
        pipe.hset(keys.location(uid), mapping={"lat": 51.5, "lng": -0.12, "region": "gcpvj0"})
        pipe.zadd(keys.pokemon_index(uid), {str(k): k for k in range(max(pms, 1))})
        for k in range(pms):
            pipe.hset(keys.pokemon(uid, k), mapping={"species": rng.randrange(1, 152), "cp": 99})
        n += 4 + pms
        if i % 500 == 499:
            pipe.execute()
    pipe.execute()
    return n


def all_user_keys(client) -> set[bytes]:
    return set(datasync.user_keys(client))


def snapshot(client, ks) -> dict[bytes, bytes]:
    """key -> DUMP payload (same server version on both sides: equal data, equal bytes)."""
    return {k: payload for k, (payload, _) in payloads.dump(client, list(ks)).items()}


@pytest.fixture
def pair(redis_server):
    cloud, edge = redis_server(), redis_server()
    return datasync.connect(cloud.url), datasync.connect(edge.url), cloud, edge


def test_copy_16k_users_verified_and_merge_back(pair):
    cloud, edge, *_ = pair
    ids = [str(u) for u in range(USERS)]
    n = fill_users(cloud, ids)
    cloud.sadd("region:gcpvj0", "user:1", "species:4")
    cloud.hset("region:meta", mapping={"a": "cloud", "b": "cloud"})

    report = datasync.copy_users(cloud, edge, ids)
    assert report.verified and report.keys == n == report.keys_verified
    assert report.deleted == 0 and report.seconds > 0  # its speed: bench/datasync.py
    assert edge.dbsize() == n  # shared keys are not copied with the users

    # The edge plays: user data changes, region annotations appear on both sides.
    edge.hset(keys.user("7"), "xp", 5000)
    edge.hset(keys.pokemon("7", 99), mapping={"species": 150, "cp": 3000})
    edge.sadd("region:gcpvj0", "user:7")
    edge.sadd("region:u10hb3", "user:8")
    edge.hset("region:meta", mapping={"b": "edge", "c": "edge"})
    edge.zadd("region:top", {"a": 5, "b": 1})
    edge.rpush("region:log", "x", "y", "y")
    cloud.sadd("region:gcpvj0", "user:cloud-only")
    cloud.zadd("region:top", {"a": 3, "b": 9, "c": 1})
    cloud.rpush("region:log", "y", "z")

    before = all_user_keys(edge)
    merged = datasync.merge_back(edge, cloud, shared_patterns=keys.SHARED_PATTERNS + ["region:*"])
    assert merged.verified and merged.deleted == 0
    assert merged.keys == len(before) == n + 1
    assert merged.merged == 5
    assert merged.keys_verified == merged.keys + merged.merged
    assert all_user_keys(edge) == before  # nothing deleted on the source
    # zero keys lost: every user key of the edge is on the cloud with the edge's value
    assert snapshot(cloud, before) == snapshot(edge, before)
    assert cloud.hget(keys.user("7"), "xp") == b"5000"
    assert cloud.smembers("region:gcpvj0") == {
        b"user:1",
        b"species:4",
        b"user:7",
        b"user:cloud-only",
    }
    assert cloud.smembers("region:u10hb3") == {b"user:8"}
    assert cloud.hgetall("region:meta") == {b"a": b"cloud", b"b": b"edge", b"c": b"edge"}
    assert dict(cloud.zrange("region:top", 0, -1, withscores=True)) == {b"a": 5, b"b": 9, b"c": 1}
    assert cloud.lrange("region:log", 0, -1) == [b"y", b"z", b"x", b"y"]

    doomed = datasync.user_keys(edge, ["7", "8"])
    assert len(doomed) >= 8
    assert datasync.delete_users(edge, ["7", "8"]) == len(doomed)
    assert not datasync.user_keys(edge, ["7", "8"])
    assert datasync.user_keys(cloud, ["7", "8"])  # the cloud keeps its copy


def test_copy_few_users_replace_and_keep(pair):
    cloud, edge, *_ = pair
    fill_users(cloud, ["a*1", "b", "c"])
    fill_users(cloud, ["a", "a1"], seed=2)  # must not be picked up by the glob of "a*1"
    r = datasync.copy_users(cloud, edge, ["a*1", "b"])
    assert r.users == 2 and r.keys == len(datasync.user_keys(cloud, ["a*1", "b"]))
    assert datasync.user_keys(edge, ["a", "a1", "c"]) == []
    edge.hset(keys.user("b"), "name", "edge-name")
    kept = datasync.copy_users(cloud, edge, ["b"], replace=False)
    assert kept.keys == 0 and kept.skipped > 0
    assert edge.hget(keys.user("b"), "name") == b"edge-name"
    replaced = datasync.copy_users(cloud, edge, ["b"])
    assert replaced.keys == kept.skipped
    assert edge.hget(keys.user("b"), "name") == b"tb"


def test_ttl_is_kept(pair):
    cloud, edge, *_ = pair
    cloud.set("session:{5}", "x", px=60_000)
    datasync.copy_users(cloud, edge, ["5"])
    assert 50_000 < edge.pttl("session:{5}") <= 60_000


def test_ttl_is_kept_by_merge_back(pair):
    cloud, edge, *_ = pair
    edge.set("session:{5}", "x", px=60_000)
    edge.hset(keys.user("5"), "xp", 1)
    back = datasync.merge_back(edge, cloud)
    assert back.keys == 2 and back.users == 1
    assert 50_000 < cloud.pttl("session:{5}") <= 60_000
    assert cloud.pttl(keys.user("5")) == -1


def unordered_values(client, uid: str) -> None:
    """Keys whose DUMP bytes follow a hash table's order: a set of strings and a big
    hash (their payloads differ between two servers holding equal values)."""
    client.sadd(f"caught:{{{uid}}}", *[f"spawn-{uid}-{i}" for i in range(40)])
    client.hset(f"big:{{{uid}}}", mapping={f"f{i}": f"v{i}" for i in range(300)})


def test_hash_table_encoded_values_copy_and_merge_back(pair):
    cloud, edge, *_ = pair
    ids = [str(u) for u in range(50)]
    for u in ids:
        unordered_values(cloud, u)
    assert cloud.object("encoding", "caught:{1}") == b"hashtable"
    r = datasync.copy_users(cloud, edge, ids)
    assert r.verified and r.keys == r.keys_verified == 100
    back = datasync.merge_back(edge, cloud)
    assert back.verified and back.keys == 100
    assert cloud.smembers("caught:{1}") == edge.smembers("caught:{1}")


def test_a_payload_damaged_on_the_way_is_refused_and_not_written(pair, monkeypatch):
    """RESTORE is the check of what the copy writes: a payload whose bytes changed after
    the source's DUMP (here one byte flipped, or the end cut off) fails the copy with a
    SyncError giving Redis's reason, and the damaged key is not on the destination."""
    cloud, edge, *_ = pair
    unordered_values(cloud, "1")
    cloud.hset("u:{1}", mapping={"id": "1", "xp": 3})
    real = payloads.restore
    for key, damage in ((b"caught:{1}", lambda p: p[:40] + bytes([p[40] ^ 1]) + p[41:]),
                        (b"big:{1}", lambda p: p[:-3]),
                        (b"u:{1}", lambda p: p[:-12] + bytes([p[-12] ^ 0x80]) + p[-11:])):
        def damaged(dst, dumped, replace, key=key, damage=damage, **kw):
            payload, ttl = dumped[key]
            return real(dst, {**dumped, key: (damage(payload), ttl)}, replace, **kw)

        monkeypatch.setattr(payloads, "restore", damaged)
        edge.flushall()
        with pytest.raises(datasync.SyncError, match="checksum"):
            datasync.copy_users(cloud, edge, ["1"])
        assert not edge.exists(key)


def test_a_key_that_expires_before_the_copy_ends_fails_verification(pair):
    """A key written with a TTL that runs out while later chunks are written is missing
    at the end: the copy is not verified."""
    from enorm.datasync.copy import copy_chunks

    cloud, edge, *_ = pair
    cloud.set("session:{1}", "x", px=400)
    cloud.hset("u:{1}", mapping={"id": "1"})

    def slow(dst, part, replace):
        done = payloads.restore(dst, part, replace)
        time.sleep(0.6)
        return done

    with pytest.raises(datasync.VerificationFailed) as err:
        copy_chunks(cloud, edge, [[b"session:{1}"], [b"u:{1}"]], True, datasync.SyncReport(),
                    restore=slow)  # fmt: skip
    assert err.value.keys == [b"session:{1}"]


def test_keys_evicted_during_the_copy_fail_verification(pair):
    """The destination evicts (maxmemory, allkeys-random) keys the copy wrote: the
    check after the last write finds them missing, and the copy is not verified."""
    cloud, edge, *_ = pair
    ids = [str(u) for u in range(3000)]  # 6 MB, 2 MB per script call
    pipe = cloud.pipeline(transaction=False)
    for u in ids:
        pipe.set(f"avatar:{{{u}}}", os.urandom(2048))
    pipe.execute()
    edge.config_set("maxmemory-policy", "allkeys-random")
    # Evict until under the limit however long it takes: Redis's default gives up after
    # a time limit, and on a loaded machine the next script would then meet the case of
    # the test below (a write refused) instead of keys evicted behind the copy's back.
    edge.config_set("maxmemory-eviction-tenacity", 100)
    edge.config_set("maxmemory", edge.info("memory")["used_memory"] + 4_000_000)
    with pytest.raises(datasync.VerificationFailed) as err:
        datasync.copy_users(cloud, edge, ids)
    assert edge.info("stats")["evicted_keys"] > 0
    assert err.value.keys and not any(edge.exists(k) for k in err.value.keys)


def test_a_destination_out_of_memory_fails_the_copy_by_name(pair):
    """A destination that refuses writes (maxmemory reached, noeviction) fails the copy
    with a SyncError that says so; the source is untouched."""
    cloud, edge, *_ = pair
    ids = [str(u) for u in range(3000)]
    pipe = cloud.pipeline(transaction=False)
    for u in ids:
        pipe.set(f"avatar:{{{u}}}", os.urandom(2048))
    pipe.execute()
    before = snapshot(cloud, all_user_keys(cloud))
    edge.config_set("maxmemory-policy", "noeviction")
    edge.config_set("maxmemory", edge.info("memory")["used_memory"] + 1_000_000)
    with pytest.raises(datasync.SyncError, match="destination Redis refused.*maxmemory"):
        datasync.copy_users(cloud, edge, ids)
    assert snapshot(cloud, all_user_keys(cloud)) == before


def test_unreachable_destination_raises_and_source_untouched(pair):
    cloud, _, _, edge_server = pair
    ids = [str(u) for u in range(100)]
    fill_users(cloud, ids)
    before = snapshot(cloud, all_user_keys(cloud))
    edge_server.stop()
    dead = datasync.connect(edge_server.url, timeout=1)
    with pytest.raises(datasync.DestinationUnreachable):
        datasync.copy_users(cloud, dead, ids)
    with pytest.raises(datasync.SyncError):
        datasync.merge_back(cloud, dead, shared_patterns=["region:*"])
    assert snapshot(cloud, all_user_keys(cloud)) == before


def test_verification_failure_is_reported(pair, monkeypatch):
    cloud, edge, *_ = pair
    fill_users(cloud, ["1", "2"])
    real = payloads.restore

    def lossy(client, dumped, replace):
        written = real(client, dumped, replace)
        client.delete(written[0])  # the destination loses a key after writing it
        return written

    monkeypatch.setattr(payloads, "restore", lossy)
    with pytest.raises(datasync.VerificationFailed) as err:
        datasync.copy_users(cloud, edge, ["1", "2"])
    assert len(err.value.keys) == 1


def test_a_copy_that_fails_half_way_leaves_no_manifest(pair, monkeypatch):
    """The manifest is written chunk by chunk as the copy dumps; a copy that fails after
    some chunks must not leave a manifest that a later merge would trust."""
    cloud, edge, *_ = pair
    ids = [str(u) for u in range(2000)]  # more keys than the first chunk
    fill_users(cloud, ids)
    real, calls = payloads.restore, []

    def fails_second(client, dumped, replace, **kw):
        calls.append(len(dumped))
        if len(calls) == 2:
            raise datasync.DestinationUnreachable("gone half-way")
        return real(client, dumped, replace, **kw)

    monkeypatch.setattr(payloads, "restore", fails_second)
    name = datasync.manifest_key("half")
    with pytest.raises(datasync.DestinationUnreachable):
        datasync.copy_users(cloud, edge, ids, manifest=name)
    assert len(calls) >= 2
    assert not cloud.exists(name)
    monkeypatch.setattr(payloads, "restore", real)
    report = datasync.copy_users(cloud, edge, ids, manifest=name)
    assert cloud.hlen(name) == report.keys


def test_cluster_copy_and_merge_back(redis_cluster, redis_server):
    cluster = datasync.connect(redis_cluster.url, cluster=True)
    single = datasync.connect(redis_server().url)
    ids = [str(u) for u in range(3000)]
    n = fill_users(cluster, ids)
    for u in ids[:30]:  # hash-table encoded: their DUMP bytes differ between the servers
        unordered_values(cluster, u)
    n += 60
    masters = transport.masters(cluster)
    assert len(masters) == 3 and all(m.dbsize() > 0 for m in masters)

    # cluster -> standalone (deployment onto an edge node)
    r = datasync.copy_users(cluster, single, ids)
    assert r.verified and r.keys == n == single.dbsize()

    # the edge plays, then everything goes back into the cluster
    single.hset(keys.user("42"), "xp", 777)
    single.sadd("region:gcpvj0", "user:42")
    cluster.sadd("region:gcpvj0", "user:1")
    back = datasync.merge_back(single, cluster, shared_patterns=keys.SHARED_PATTERNS)
    assert back.verified and back.keys == n and back.merged == 1
    assert cluster.hget(keys.user("42"), "xp") == b"777"
    assert cluster.smembers("region:gcpvj0") == {b"user:1", b"user:42"}
    assert cluster.object("encoding", "caught:{7}") == b"hashtable"
    assert cluster.smembers("caught:{7}") == single.smembers("caught:{7}")

    # cluster -> cluster path through a few users and the per-user scan
    few = datasync.copy_users(cluster, cluster, ["1", "2"])
    assert few.keys == len(datasync.user_keys(cluster, ["1", "2"]))


def test_cluster_unreachable(redis_cluster):
    cluster = datasync.connect(redis_cluster.url, cluster=True)
    fill_users(cluster, ["1"])
    with pytest.raises(datasync.DestinationUnreachable):
        datasync.copy_users(cluster, redis.Redis(port=1, socket_connect_timeout=0.5), ["1"])


@pytest.mark.parametrize("typ", [b"string", b"set", b"hash", b"zset", b"list", b"stream"])
def test_every_type_of_the_table_goes_out_and_back_whole(pair, typ):
    """A user's key of each type of the table (written by the table's own merge write)
    is copied to the edge whole, and the value the edge gave it goes back whole."""
    from enorm.datasync.redis_types import TYPES

    cloud, edge, *_ = pair
    one, other = {b"string": (b"a", b"b"), b"set": ({b"a"}, {b"a", b"b"}),
                  b"hash": ({b"f": b"1"}, {b"f": b"2"}),
                  b"zset": ([(b"a", 1.0)], [(b"a", 2.0)]),
                  b"list": ([b"x", b"y"], [b"y", b"x"]),
                  b"stream": ([[b"1-0", [b"f", b"a"]]], [[b"1-0", [b"f", b"b"]]])}[typ]  # fmt: skip
    row = TYPES[typ]
    pipe = cloud.pipeline()
    row.write(pipe, b"k:{1}", one)
    pipe.execute()
    assert cloud.type("k:{1}") == typ
    name = datasync.manifest_key("every-type")
    datasync.copy_users(cloud, edge, ["1"], manifest=name)
    assert datasync.digests(edge, [b"k:{1}"]) == datasync.digests(cloud, [b"k:{1}"])
    edge.delete("k:{1}")
    pipe = edge.pipeline()
    row.write(pipe, b"k:{1}", other)
    pipe.execute()
    back = datasync.merge_back(edge, cloud, user_ids=["1"], manifest=name)
    assert back.verified and back.keys == 1 and back.conflicts == 0
    assert datasync.digests(cloud, [b"k:{1}"]) == datasync.digests(edge, [b"k:{1}"])
    assert datasync.read_typed(cloud, [b"k:{1}"], "destination") == \
        datasync.read_typed(edge, [b"k:{1}"], "source")
