"""The pure parts of enorm.datasync: hash tags, patterns, the merge rule."""

import pytest

from enorm import datasync
from enorm.datasync import hash_tag, keys, merge_rule, payloads, rules, user_pattern
from enorm.datasync.redis_types import ELEMENTS_FN, MEMBERS_FN, TYPES

# Two values per type of the table, as its `read` gives them: the cloud's and the edge's.
SAMPLES = {
    b"string": (b"old", b"new"),
    b"set": ({b"a", b"b"}, {b"b", b"c"}),
    b"hash": ({b"f": b"cloud", b"g": b"1"}, {b"f": b"edge"}),
    b"zset": ([(b"a", 3.0), (b"b", 9.0)], [(b"a", 5.0), (b"c", 1.0)]),
    b"list": ([b"y", b"z"], [b"x", b"y", b"y"]),
    # the cloud's stream went on after the copy (2-0); the edge added 3-0 and 9-0 after
    # the entry both hold (1-0): 3-0 is below the cloud's top, 9-0 above it
    b"stream": ([[b"1-0", [b"f", b"a"]], [b"5-0", [b"f", b"cloud"]]],
                [[b"1-0", [b"f", b"a"]], [b"3-0", [b"f", b"x"]], [b"9-0", [b"f", b"y"]]]),
}


@pytest.mark.parametrize(
    "key, tag",
    [
        (b"u:{42}", b"42"),
        (b"pm:{42}:7", b"42"),
        (b"x:{1}:{42}", b"1"),  # the first tag counts, as in Redis Cluster
        (b"u:{}", None),
        (b"u:42", None),
        (b"u:{42", None),
        (b"a}{b}", b"b"),
    ],
)
def test_hash_tag(key, tag):
    assert hash_tag(key) == tag


def test_user_pattern_escapes_glob():
    assert user_pattern("42") == "*{42}*"
    assert user_pattern("a*b?[c]\\") == "*{a\\*b\\?\\[c\\]\\\\}*"


@pytest.mark.parametrize("bad", ["", "a{b", "a}b"])
def test_user_ids_that_cannot_be_tags(bad):
    with pytest.raises(ValueError):
        user_pattern(bad)


def test_merge_rule_union_edge_wins():
    assert merge_rule(b"set", {b"a"}, {b"b"}) == {b"a", b"b"}
    assert merge_rule(b"hash", {b"f": b"cloud", b"g": b"1"}, {b"f": b"edge"}) == {
        b"f": b"edge",
        b"g": b"1",
    }
    assert merge_rule(b"zset", [(b"a", 3.0), (b"b", 9.0)], [(b"a", 5.0), (b"c", 1.0)]) == {
        b"a": 5.0,
        b"b": 9.0,
        b"c": 1.0,
    }
    assert merge_rule(b"list", [b"y", b"z"], [b"x", b"y", b"y"]) == [b"y", b"z", b"x", b"y"]
    assert merge_rule(b"string", b"old", b"new") == b"new"
    assert merge_rule(b"set", None, {b"a"}) == {b"a"}


def test_contains_matches_merge_rule():
    cases = [
        (b"set", {b"a"}, {b"b"}),
        (b"hash", {b"f": b"1"}, {b"f": b"2", b"g": b"3"}),
        (b"list", [b"a"], [b"a", b"a", b"b"]),
        (b"string", b"1", b"2"),
    ]
    for typ, cloud, edge in cases:
        merged = merge_rule(typ, cloud, edge)
        assert rules.contains(typ, merged, edge)
        assert not rules.contains(typ, cloud, edge)
    zmerged = list(merge_rule(b"zset", [(b"a", 3.0)], [(b"a", 5.0)]).items())
    assert rules.contains(b"zset", zmerged, [(b"a", 5.0)])
    assert not rules.contains(b"zset", [(b"a", 3.0)], [(b"a", 5.0)])


def test_report_never_deletes():
    r = datasync.SyncReport(keys=3)
    assert r.as_dict()["deleted"] == 0 and r.verified is False


def test_sync_errors_are_one_family():
    for cls in (
        datasync.DestinationUnreachable,
        datasync.SourceUnreachable,
        datasync.VerificationFailed,
    ):
        assert issubclass(cls, datasync.SyncError)


def test_every_type_of_the_table_merges_to_hold_the_edges_value():
    assert set(SAMPLES) == set(TYPES)  # a new row comes with its sample here
    for typ, (cloud, edge) in SAMPLES.items():
        merged = merge_rule(typ, cloud, edge)
        as_read = list(merged.items()) if isinstance(merged, dict) and typ == b"zset" else merged
        assert rules.contains(typ, as_read, edge), typ
        assert not rules.contains(typ, cloud, edge), typ
        assert merge_rule(typ, None, edge) == edge
        assert TYPES[typ].size(edge) > 0
    # A type the table does not know: the edge's value, compared whole.
    assert merge_rule(b"ReJSON-RL", b"1", b"2") == b"2"
    assert rules.contains(b"ReJSON-RL", b"2", b"2") and not rules.contains(b"ReJSON-RL", b"1", b"2")


def test_the_scripts_are_built_from_the_table():
    for row in TYPES.values():
        assert row.members is None or f"return {row.members}" in MEMBERS_FN
        assert row.hashtable is None or f"t == {row.hashtable[0]} then" in ELEMENTS_FN
    assert keys._INDEX_MEMBERS.startswith(MEMBERS_FN)
    assert payloads.DIGEST_FN.startswith(ELEMENTS_FN) and payloads.UNORDERED == {2, 4}


def test_a_shared_stream_takes_the_entries_the_edge_added_since_the_copy():
    """Above the newest entry both hold: kept IDs while above the cloud's top, then new
    IDs carrying the edge's in `enorm:edge-id`; entries the cloud dropped after the copy
    (below that entry) do not come back; a merge again adds nothing."""
    from enorm.datasync.redis_types import STREAM_MARK

    copied = [[b"1-0", [b"f", b"a"]], [b"2-0", [b"f", b"b"]]]
    cloud = [[b"2-0", [b"f", b"b"]], [b"6-0", [b"f", b"c"]]]  # 1-0 trimmed, 6-0 new
    edge = [*copied, [b"4-0", [b"f", b"e1"]], [b"7-0", [b"f", b"e2"]]]
    merged = merge_rule(b"stream", cloud, edge)
    assert [i for i, _ in merged] == [b"2-0", b"6-0", b"6-1", b"7-0"]
    assert [f for _, f in merged[2:]] == [(b"f", b"e1", STREAM_MARK, b"4-0"), (b"f", b"e2")]
    assert rules.contains(b"stream", merged, edge)
    assert merge_rule(b"stream", merged, edge) == merged
    # nothing on the cloud: the edge's entries with their IDs
    above = merge_rule(b"stream", [[b"1-0", [b"f", b"a"]]], edge)
    assert [i for i, _ in above] == [b"1-0", b"2-0", b"4-0", b"7-0"]


def test_no_script_packs_a_number_through_the_servers_c_long() -> None:
    """Redis's Lua struct library packs integers of more than 4 bytes (`i8`, `l`)
    through the C long of its build: on a 32-bit Redis (an armhf board's) the PTTL -1 of
    a key without TTL went out as 4294967295 and the key came back on the cloud expiring
    in 49.7 days. Every Lua script of the package packs wider numbers as doubles."""
    import re
    from importlib import import_module
    from pkgutil import iter_modules

    formats = []
    for mod in iter_modules(datasync.__path__):
        source = vars(import_module(f"enorm.datasync.{mod.name}"))
        for name, text in source.items():
            if isinstance(text, str) and "redis.call" in text:
                formats += [(mod.name, name, f) for f in
                            re.findall(r"struct\.(?:un)?pack\('([^']*)'", text)]
    assert formats, "the scripts' struct formats were not found"
    wide = [(m, n, f) for m, n, f in formats if re.search(r"[iIlL](?:[5-9]|$|[^0-9])", f)]
    assert wide == []
    # the batches' TTLs go as Redis's own integers (a reply, RESTORE's argument), unpacked
    for script in (payloads._DUMP, payloads._SCAN_DUMP, payloads._RESTORE):
        assert "struct." not in script.replace(payloads.DIGEST_FN, "")


def test_a_batch_is_packed_the_same_with_and_without_hiredis(monkeypatch):
    """A batch's command goes out packed by hiredis in one call; without hiredis 2.1,
    redis-py's packer sends the same bytes."""
    import redis
    from redis.connection import Encoder, PythonRespSerializer

    from enorm.datasync import transport

    args = ["EVAL", "return 1", 2, b"k:{1}", b"k:{2}", b"\x00\xff\r\n", b"", 0, -1,
            2_592_000_000, "\u00e9"]  # fmt: skip
    python = PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode)
    expected = b"".join(python.pack(*args))
    assert transport._pack(redis.Connection(), args) == expected
    monkeypatch.setattr(transport, "_hiredis_pack", None)
    assert transport._pack(redis.Connection(), args) == expected
