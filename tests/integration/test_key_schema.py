"""Finding the offloaded users' keys by the app's key schema: the same keys a scan finds,
and no scan of the cloud's keyspace (standalone and a 3-master cluster)."""

from __future__ import annotations

import pytest
from test_datasync import fill_users

from enorm import datasync
from games.pokemon.app import key_schema

SERVED = [f"s{i}" for i in range(8)]


def scans(client) -> int:
    """SCAN calls so far on every master (Redis counts the ones scripts make too)."""
    nodes = client.get_primaries() if hasattr(client, "get_primaries") else [client]
    total = 0
    for n in nodes:
        r = n.redis_connection if hasattr(n, "redis_connection") else n
        total += r.info("commandstats").get("cmdstat_scan", {}).get("calls", 0)
    return total


@pytest.mark.parametrize("kind", ["standalone", "cluster"])
def test_schema_finds_what_a_scan_finds_without_scanning(kind, redis_server, request):
    if kind == "cluster":
        cloud = datasync.connect(request.getfixturevalue("redis_cluster").url, cluster=True)
    else:
        cloud = datasync.connect(redis_server().url)
    fill_users(cloud, SERVED + [f"o{i}" for i in range(2000)])  # a cloud of other users
    cloud.set("untagged:thing", "x")
    by_scan = set(datasync.user_keys(cloud, SERVED))
    assert by_scan, "the fill wrote the served users' keys"
    # Names the schema lists but a user does not have (no caught set yet, an index entry
    # whose hash was never written) are skipped by the copy, not invented.
    cloud.zadd("pms:{s0}", {"999": 1})
    before = scans(cloud)
    found = set(datasync.schema_keys(cloud, key_schema(), SERVED))
    assert b"pm:{s0}:999" in found
    assert {k for k in found if cloud.exists(k)} == by_scan
    edge = datasync.connect(redis_server().url)
    report = datasync.copy_users(cloud, edge, SERVED, schema=key_schema(),
                                 manifest=datasync.manifest_key("k1"))
    assert scans(cloud) == before  # no SCAN on the cloud at all
    assert report.verified and report.keys == len(by_scan)
    assert set(datasync.user_keys(edge)) == by_scan
    assert cloud.hlen(datasync.manifest_key("k1")) == report.keys
    # Without a schema the copy scans (the fallback for apps that declare none).
    datasync.copy_users(cloud, datasync.connect(redis_server().url), SERVED)
    assert scans(cloud) > before


def test_schema_names_must_carry_the_users_hash_tag():
    with pytest.raises(ValueError, match="hash tag"):
        datasync.KeySchema(fixed=("u:<user>",))
    with pytest.raises(ValueError, match="<member>"):
        datasync.KeySchema(families=(("pms:{<user>}", "pm:{<user>}"),))


def test_every_index_type_and_any_member_bytes(redis_server):
    """The index may be a set, sorted set, list or hash (its fields); members are bytes,
    not necessarily text; a key of another type, or none, names no member."""
    cloud = datasync.connect(redis_server().url)
    schema = datasync.KeySchema(families=(("idx:{<user>}", "m:{<user>}:<member>"),))
    cloud.sadd("idx:{a}", b"\xff\x00")
    cloud.zadd("idx:{b}", {"1": 1, "2": 2})
    cloud.rpush("idx:{c}", "x", "x")
    cloud.hset("idx:{d}", mapping={"f": "v"})
    cloud.set("idx:{e}", "not an index")
    found = datasync.schema_keys(cloud, schema, ["a", "b", "c", "d", "e", "f"])
    assert found == [b"m:{a}:\xff\x00", b"m:{b}:1", b"m:{b}:2", b"m:{c}:x", b"m:{d}:f"]
