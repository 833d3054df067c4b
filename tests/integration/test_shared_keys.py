"""Shared keys of every Redis type, with their TTLs, both ways: copied to the edge with
the users' keys, merged back by their type's rule and TTL rule, on real Redis (the cloud
standalone and a 3-master cluster); a type without a rule (a module's) is counted and
sampled, never silently dropped."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from enorm import datasync
from enorm.datasync.redis_types import STREAM_MARK

MODULE = Path("/usr/lib/redis/modules/redisearch.so")  # scripts/setup.sh installs it
SHARED = ["board:*", "here:*", "cells", "cell:*", "latest:*", "log:*", "motd", "sugg:*",
          "new:*"]
COPIED = ["board:c1", "here:c1", "cells", "cell:c1", "latest:c1", "log:c1", "motd"]


def cloud_of(kind: str, redis_server, request) -> datasync.Client:
    if kind == "cluster":
        return datasync.connect(request.getfixturevalue("redis_cluster").url, cluster=True)
    return datasync.connect(redis_server().url)


def stream(client, key) -> list[tuple[bytes, tuple]]:
    return [(i, tuple(f)) for i, f in client.eval("return redis.call('XRANGE', KEYS[1], "
                                                  "'-', '+')", 1, key)]


def fill_cloud(cloud) -> None:
    cloud.xadd("board:c1", {"by": "c0", "text": "first"}, id="1-0")
    cloud.xadd("board:c1", {"by": "c0", "text": "second"}, id="2-0")
    cloud.sadd("here:c1", "c0")
    cloud.expire("here:c1", 300)  # a presence set with a TTL on both sides
    cloud.zadd("cells", {"c1": 3, "c2": 1})
    cloud.hset("cell:c1", mapping={"name": "square", "posts": 2})
    cloud.set("latest:c1", "2-0")
    cloud.rpush("log:c1", "c0")
    cloud.set("motd", "hello", ex=3600)
    cloud.hset("u:{a1}", "name", "a1")


@pytest.mark.parametrize("kind", ["standalone", "cluster"])
def test_shared_keys_of_every_type_come_back_with_their_ttls(kind, redis_server, request):
    cloud = cloud_of(kind, redis_server, request)
    edge = datasync.connect(redis_server("--loadmodule", str(MODULE)).url)
    fill_cloud(cloud)
    copy = datasync.copy_users(cloud, edge, ["a1"], manifest=datasync.manifest_key("s1"),
                               shared=COPIED)
    # Copied with their TTLs (the edge's way in), recorded as copied on the edge.
    assert copy.shared == len(COPIED) and copy.keys == 1
    assert 3500 < edge.ttl("motd") <= 3600 and 200 < edge.ttl("here:c1") <= 300
    assert stream(edge, "board:c1") == stream(cloud, "board:c1")

    # The edge plays: every type written, new shared keys with a TTL, a module's type.
    e1 = edge.xadd("board:c1", {"by": "a1", "text": "from the edge"})
    edge.sadd("here:c1", "a1")
    edge.expire("here:c1", 900)  # both sides have a TTL: the later wins
    edge.zincrby("cells", 5, "c1")
    edge.hset("cell:c1", "posts", 3)
    edge.set("latest:c1", e1, ex=600)  # a string: the edge's value with its TTL
    edge.rpush("log:c1", "a1")
    edge.set("new:str", "s", ex=600)
    edge.hset("new:hash", "f", "v")
    edge.expire("new:hash", 600)
    edge.sadd("new:set", "m")
    edge.expire("new:set", 600)
    edge.zadd("new:zset", {"m": 1})
    edge.rpush("new:list", "x")
    edge.xadd("new:stream", {"f": "v"})
    edge.expire("new:stream", 600)
    edge.execute_command("FT.SUGADD", "sugg:c1", "square", "1")  # a module's type
    # The cloud goes on meanwhile: its board moves past the edge's entry, its motd
    # changes (the edge never touched its copy: the stale copy must not win).
    time.sleep(0.01)
    c3 = cloud.xadd("board:c1", {"by": "c9", "text": "from the cloud"})
    cloud.set("motd", "newer", ex=3600)
    time.sleep(0.01)
    e2 = edge.xadd("board:c1", {"by": "a1", "text": "after the cloud's"})

    report = datasync.merge_back(edge, cloud, shared_patterns=SHARED, user_ids=["a1"],
                                 manifest=datasync.manifest_key("s1"))
    assert report.verified
    # Streams: the cloud's entries, then the edge's added since the copy; the first is
    # below the cloud's top now (renumbered to the first ID above it, its edge ID in
    # enorm:edge-id), the second above that (kept); the copied entries are not appended
    # again.
    board = stream(cloud, "board:c1")
    assert [i for i, _ in board[:3]] == [b"1-0", b"2-0", c3]
    assert board[3][1] == (b"by", b"a1", b"text", b"from the edge", STREAM_MARK, e1)
    ms, seq = c3.split(b"-")
    assert board[3][0] == ms + b"-" + str(int(seq) + 1).encode()
    assert board[4] == (e2, (b"by", b"a1", b"text", b"after the cloud's"))
    assert len(board) == 5 and report.renumbered == 1
    assert stream(cloud, "new:stream") == stream(edge, "new:stream")
    # The other types by their rules.
    assert cloud.smembers("here:c1") == {b"c0", b"a1"}
    assert cloud.zscore("cells", "c1") == 8 and cloud.zscore("cells", "c2") == 1
    assert cloud.hgetall("cell:c1") == {b"name": b"square", b"posts": b"3"}
    assert cloud.get("latest:c1") == e1 and cloud.lrange("log:c1", 0, -1) == [b"c0", b"a1"]
    assert cloud.get("motd") == b"newer" and report.shared_unchanged == 1
    for k in ("new:str", "new:hash", "new:set", "new:zset", "new:list"):
        assert cloud.type(k) == edge.type(k), k
    # TTLs: created on the edge with one -> kept; both sides -> the later; a string takes
    # the edge's; a union where the cloud has none stays persistent.
    for k in ("new:str", "new:hash", "new:set", "new:stream", "latest:c1"):
        assert 500 < cloud.ttl(k) <= 600, k
    assert 800 < cloud.ttl("here:c1") <= 900
    assert cloud.ttl("new:zset") == -1 and cloud.ttl("cells") == -1
    assert report.ttls == 6
    # A module's type: not merged, counted and named.
    assert report.not_merged == 1 and report.not_merged_sample == ["sugg:c1"]
    assert not cloud.exists("sugg:c1")
    assert report.merged == len(SHARED_WRITTEN)

    # A merge again (a termination resumed after a crash) adds nothing.
    before = {k: stream(cloud, k) for k in ("board:c1", "new:stream")}
    again = datasync.merge_back(edge, cloud, shared_patterns=SHARED, user_ids=["a1"])
    assert again.verified and again.renumbered == 0
    assert {k: stream(cloud, k) for k in before} == before
    assert cloud.lrange("log:c1", 0, -1) == [b"c0", b"a1"]


SHARED_WRITTEN = ["board:c1", "here:c1", "cells", "cell:c1", "latest:c1", "log:c1",
                  "new:str", "new:hash", "new:set", "new:zset", "new:list", "new:stream"]


def test_a_stream_the_cloud_trimmed_gets_only_what_the_edge_added(redis_server):
    """Entries copied out and dropped on the cloud meanwhile (MAXLEN) stay dropped; an
    entry whose ID the cloud gave another entry is renumbered, not lost."""
    cloud = datasync.connect(redis_server().url)
    edge = datasync.connect(redis_server().url)
    for i in range(1, 6):
        cloud.xadd("board:c1", {"n": str(i)}, id=f"{i}-0")
    datasync.copy_users(cloud, edge, [], shared=["board:c1"])
    cloud.xadd("board:c1", {"n": "cloud"}, id="7-0", maxlen=2,
               approximate=False)  # keeps 5-0, 7-0
    edge.xadd("board:c1", {"n": "edge"}, id="7-0")  # the same ID, another entry
    report = datasync.merge_back(edge, cloud, shared_patterns=["board:*"])
    got = stream(cloud, "board:c1")
    assert [f for _, f in got] == [(b"n", b"5"), (b"n", b"cloud"),
                                   (b"n", b"edge", STREAM_MARK, b"7-0")]
    assert report.renumbered == 1 and report.merged == 1


@pytest.mark.parametrize("kind", ["standalone", "cluster"])
def test_shared_keys_written_only_on_the_edge_reach_the_cloud_with_their_ttls(
        kind, redis_server, request):
    """The issue's case, without a copy: a shared stream, and a string and a hash with a
    600 s TTL, created on the edge."""
    cloud = cloud_of(kind, redis_server, request)
    edge = datasync.connect(redis_server().url)
    ids = [edge.xadd("board:c7", {"by": "a1", "n": str(n)}) for n in range(3)]
    edge.set("latest:c7", ids[-1], ex=600)
    edge.hset("cell:c7", "posts", 3)
    edge.expire("cell:c7", 600)
    report = datasync.merge_back(edge, cloud, shared_patterns=SHARED, user_ids=["a1"])
    assert [i for i, _ in stream(cloud, "board:c7")] == ids
    assert 500 < cloud.ttl("latest:c7") <= 600 and 500 < cloud.ttl("cell:c7") <= 600
    assert report.merged == 3 and report.ttls == 2 and report.not_merged == 0
