"""The mobility bench's keys check (bench.mobility.keys_of): each group's users' keys on
the cloud, found by their hash tag in one SCAN of a real Redis, as one `*{uid}*` SCAN per
user found them."""

from __future__ import annotations

from bench import mobility as m
from enorm import datasync


def test_one_scan_finds_each_users_keys_as_a_scan_per_user_did(redis_server):
    cloud = datasync.connect(redis_server().url)
    for uid in ("7", "17", "70", "8"):
        cloud.hset(f"u:{{{uid}}}", "name", uid)
        cloud.sadd(f"pokedex:{{{uid}}}", 1)
        cloud.hset(f"pm:{{{uid}}}:3", "species", 25)
    cloud.sadd("regions", "gcey9")  # shared and cloud-only keys: nobody's
    cloud.set("id:bench:user7", "7")
    cloud.mset({f"filler:{i}": i for i in range(3000)})  # more than one SCAN step
    got = m.keys_of(cloud, {0: ["7", "70"], 1: ["17"], 2: ["99"]})
    per_user = {u: sorted(cloud.scan_iter(f"*{{{u}}}*")) for u in ("7", "70", "17")}
    assert got == {0: {"7": per_user["7"], "70": per_user["70"]}, 1: {"17": per_user["17"]},
                   2: {"99": []}}
    assert got[0]["7"] == [b"pm:{7}:3", b"pokedex:{7}", b"u:{7}"]  # not 70's, not 17's
