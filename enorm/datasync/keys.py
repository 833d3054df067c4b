"""Finding a user's keys: by the hash tag that names the user (a scan), or by the names
the app declares (`KeySchema`: a cost that follows the users, not the keyspace)."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from .redis_types import MEMBERS_FN
from .transport import Client, masters, no_args, run_script

SCAN_COUNT = 2000
# The library's own keys (the cloud manager's ledger and registry, the copy's manifest,
# the edge's records of the shared keys and hash tables it was given)
# start with this, whatever hash tag follows: no such key is ever a user's or shared, so
# none is found, copied, exported or merged as data, whatever the app declares or a user
# is called (`enorm:{cloud}:users` is not user `cloud`'s).
LIBRARY_PREFIX = b"enorm:"
# Up to this many users a per-user SCAN MATCH is cheaper than one scan of all tagged keys.
PER_USER_SCAN_MAX = 8
_GLOB = str.maketrans({c: "\\" + c for c in "\\*?[]"})


def hash_tag(key: bytes) -> bytes | None:
    """The hash tag of `key` as Redis Cluster defines it: between the first `{` and the
    next `}`, if not empty."""
    start = key.find(b"{")
    if start < 0:
        return None
    end = key.find(b"}", start + 1)
    if end <= start + 1:
        return None
    return key[start + 1 : end]


def is_library(key: bytes) -> bool:
    """A key of the library's namespace (`LIBRARY_PREFIX`): never a user's, never shared."""
    return key.startswith(LIBRARY_PREFIX)


def user_pattern(user_id: str) -> str:
    """SCAN pattern for one user's keys, with glob characters of the id escaped."""
    check_id(user_id)
    return "*{" + user_id.translate(_GLOB) + "}*"


def check_id(user_id: str) -> None:
    if not user_id or "{" in user_id or "}" in user_id:
        raise ValueError(f"user id {user_id!r} cannot be a hash tag")


# One SCAN step whose keys come back as one packed string (length-prefixed), so a
# 100k-key scan parses a hundred replies, not a hundred thousand.
_SCAN = """
local r = redis.call('SCAN', ARGV[1], 'MATCH', ARGV[2], 'COUNT', ARGV[3])
local out = {}
for i, k in ipairs(r[2]) do out[i] = struct.pack('>I4', #k) .. k end
return {r[1], table.concat(out)}
"""
_LEN = struct.Struct(">I")


def scan(client: Client, pattern: str, count: int = SCAN_COUNT) -> Iterator[bytes]:
    """SCAN MATCH over every master (a cluster's keys are spread over them)."""
    unpack, width = _LEN.unpack_from, _LEN.size
    for node in masters(client):
        step = node.register_script(_SCAN)
        cursor = b"0"
        while True:
            cursor, blob = step(keys=[], args=[cursor, pattern, count])
            pos, end = 0, len(blob)
            while pos < end:
                (n,) = unpack(blob, pos)
                pos += width
                yield blob[pos : pos + n]
                pos += n
            if cursor in (b"0", 0):
                break


def user_keys(client: Client, user_ids: Iterable[str] | None = None) -> list[bytes]:
    """Keys whose hash tag is one of `user_ids` (None: every hash-tagged key).

    The tag is compared exactly, so `x:{1}:{42}` belongs to user 1 only.
    """
    return list(iter_user_keys(client, user_ids))


def iter_user_keys(client: Client, user_ids: Iterable[str] | None) -> Iterator[bytes]:
    """`user_keys` as the scan finds them (never a key of the library's namespace)."""
    if user_ids is None:
        return (k for k in scan(client, "*{?*}*")
                if hash_tag(k) is not None and not is_library(k))  # fmt: skip
    ids = [str(u) for u in user_ids]
    for u in ids:
        check_id(u)
    if len(ids) <= PER_USER_SCAN_MAX:
        return (k for u in ids for k in scan(client, user_pattern(u))
                if hash_tag(k) == u.encode() and not is_library(k))  # fmt: skip
    wanted = {u.encode() for u in ids}
    return (k for k in scan(client, "*{?*}*") if hash_tag(k) in wanted and not is_library(k))


@dataclass(frozen=True)
class KeySchema:
    """Where one user's keys are, declared by the app, so that they are found by name
    rather than by a scan of the keyspace (whose cost grows with every other user).

    `fixed`: names every user may have, e.g. `u:{<user>}`. `families`: pairs (index,
    member key), e.g. (`pms:{<user>}`, `pm:{<user>}:<member>`): the members (or fields)
    of the index key, of any type `redis_types` gives members (set, sorted set, list,
    hash), name the family's keys. Every name carries `{<user>}` as its hash tag, so a
    cluster finds them on one slot. A key the schema does not name is not copied: the
    app keeps it complete. No name may start with the library's prefix (`enorm:`).
    """

    fixed: tuple[str, ...] = ()
    families: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        for t in (*self.fixed, *(x for f in self.families for x in f)):
            if "{<user>}" not in t or hash_tag(t.replace("<member>", "m").encode()) != b"<user>":
                raise ValueError(f"key schema: {t!r} must have {{<user>}} as its hash tag")
            if is_library(t.encode()):
                raise ValueError(f"key schema: {t!r} must not start with "
                                 f"{LIBRARY_PREFIX.decode()!r}: the library's keys")
        for idx, member in self.families:
            if "<member>" not in member or "<member>" in idx:
                raise ValueError(
                    f"key schema: family {idx!r} -> {member!r} needs <member> "
                    "in the member key only"
                )


# The members (or fields) of each index key in KEYS, whatever its type (`redis_types`):
# an array per key, in one reply (the hiredis parser reads it in C).
_INDEX_MEMBERS = MEMBERS_FN + """
local out = {}
for i, k in ipairs(KEYS) do out[i] = members(k) end
return out
"""


def schema_keys(client: Client, schema: KeySchema, user_ids: Iterable[str]) -> list[bytes]:
    """The users' keys by `schema`: the index keys' members read by a script, a batch of
    indexes per call, pipelined (one round trip for up to FLUSH indexes), whatever the
    size of the keyspace. Names that do not exist are left in (the copy skips keys that
    are gone)."""
    return list(iter_schema_keys(client, schema, user_ids))


def iter_schema_keys(client: Client, schema: KeySchema,
                     user_ids: Iterable[str]) -> Iterator[bytes]:  # fmt: skip
    """`schema_keys` as they are known: the fixed names at once, without a round trip,
    then the families' members once the indexes are read, so that a copy dumps the
    first chunk meanwhile."""
    ids = [str(u) for u in user_ids]
    for u in ids:
        check_id(u)
    fixed = list(dict.fromkeys(t.replace("<user>", u).encode()
                               for u in ids for t in schema.fixed))  # fmt: skip
    yield from (k for k in fixed if not is_library(k))
    # index key -> the member key templates it names, as (prefix, suffix) around <member>
    named: dict[bytes, list[tuple[bytes, bytes]]] = {}
    for u in ids:
        for idx, member in schema.families:
            pre, _, post = member.replace("<user>", u).encode().partition(b"<member>")
            named.setdefault(idx.replace("<user>", u).encode(), []).append((pre, post))
    if not named:
        return
    seen = set(fixed)
    for batch, reply in run_script(client, list(named), _INDEX_MEMBERS, no_args, "source"):
        for idx, members in zip(batch, reply, strict=True):
            for key in (pre + m + post for pre, post in named[idx] for m in members):
                if key not in seen and not is_library(key):
                    seen.add(key)
                    yield key
