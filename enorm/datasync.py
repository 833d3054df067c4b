"""Moving per-user Redis keys between two Redis servers, verified, with a merge policy.

Both sides use it: the cloud manager copies the served users' keys cloud -> edge when it
deploys a server, the edge manager merges the edge data back edge -> cloud when it
terminates one. The rules (docs/architecture.md, "Data rules"):

* A user's keys carry the user id as a Redis hash tag (`u:{42}`, `pm:{42}:7`), so they
  are found by pattern and live on one slot in Redis Cluster.
* User keys replace the destination's copy (the source is the newer one).
* Shared keys (`shared_patterns`, e.g. `region:*`) are merged as a union by type.
* Nothing here deletes on the source. The caller calls `delete_users` once a report says
  the copy was verified. If the destination cannot be reached, `SyncError` is raised and
  the source is untouched, so the caller can keep the data and retry.

Verification: every key written is read back on the destination (DUMP, in the same
script as its RESTORE) and compared byte for byte with the source's payload; keys whose
payload bytes follow a hash table's order (sets and hashes of the hash-table encoding)
or differ for another reason (another Redis version) are compared by value there. After
the last write every key is checked to be still there. Only then is a copy "verified".

Speed: keys move in batches through small Lua scripts (one EVAL per batch dumps, one
restores and reads back), so a batch costs one reply, not one per key; a whole chunk of
batches is one pipelined round trip (what an SSH port forward makes expensive). A thread
dumps the next chunk while two others restore the previous ones, each on its own
connection. In a cluster the batches are cut per slot and pipelined per master. On
termination the edge's keys are found and dumped in the same script calls (SCAN+DUMP).
"""

from __future__ import annotations

import fnmatch
import struct
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Union

import redis
from redis.backoff import ExponentialBackoff
from redis.cluster import RedisCluster
from redis.crc import key_slot
from redis.retry import Retry

Client = Union[redis.Redis, RedisCluster]  # noqa: UP007 (kept readable in signatures)

BATCH = 1000  # keys per script call
FLUSH = 50_000  # keys per pipeline flush (one round trip)
CHUNK = 10_000  # keys dumped ahead while the previous chunk is restored
FIRST_CHUNK = 2_500  # a smaller first chunk starts the destination sooner
RESTORERS = 2  # chunks in flight to the destination, each on its own connection
SCAN_COUNT = 2000
# Up to this many users a per-user SCAN MATCH is cheaper than one scan of all tagged keys.
PER_USER_SCAN_MAX = 8
_GLOB = str.maketrans({c: "\\" + c for c in "\\*?[]"})


class SyncError(Exception):
    """A sync did not complete; the source is untouched and the caller may retry."""


class DestinationUnreachable(SyncError):
    """The destination Redis did not answer (connection refused, timeout)."""


class SourceUnreachable(SyncError):
    """The source Redis did not answer."""


class VerificationFailed(SyncError):
    """Keys written to the destination do not match the source."""

    def __init__(self, message: str, keys: list[bytes]):
        super().__init__(message)
        self.keys = keys


@dataclass
class SyncReport:
    """What a copy or a merge did. Only a merge with a manifest deletes (`deleted`)."""

    users: int = 0
    keys: int = 0  # user keys written to the destination
    merged: int = 0  # shared keys merged into the destination
    skipped: int = 0  # replace=False: keys the destination already had
    keys_verified: int = 0  # keys checked on the destination after writing
    bytes: int = 0  # payload bytes moved
    seconds: float = 0.0
    verified: bool = False
    deleted: int = 0  # merge_back with a manifest: keys the edge deleted, removed on the cloud
    # merge_back: keys on the edge that belong to no served user (not merged), a sample
    not_owned: int = 0
    not_owned_sample: list[str] = field(default_factory=list)
    # merge_back with a manifest: served users' keys the cloud changed during the offload
    conflicts: int = 0
    conflict_sample: list[str] = field(default_factory=list)
    conflicts_cloud_won: int = 0  # of those, kept as the cloud had them (cloud_wins)
    manifest: bool = False  # a manifest of the copy was found (deletes and conflicts known)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- connecting --------------------------------------------------------------------------


def connect(url: str, cluster: bool = False, timeout: float = 5.0) -> Client:
    """A client for `url` with short timeouts, so an unreachable peer fails fast."""
    opts: dict[str, Any] = dict(
        socket_timeout=timeout,
        socket_connect_timeout=min(timeout, 2.0),
        decode_responses=False,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 1),
    )
    if cluster:
        try:
            return RedisCluster.from_url(url, **opts)
        except (redis.ConnectionError, redis.TimeoutError, redis.RedisClusterException) as exc:
            raise SyncError(f"cluster {url} is unreachable: {exc}") from exc
    return redis.Redis.from_url(url, **opts)


def _is_cluster(client: Client) -> bool:
    return isinstance(client, RedisCluster)


def _masters(client: Client) -> list[redis.Redis]:
    """Plain clients for every master: SCAN must visit each of them in a cluster."""
    if not _is_cluster(client):
        return [client]
    return [client.get_redis_connection(n) for n in client.get_primaries()]


def _by_node(client: Client, keys: Iterable[bytes]) -> dict[redis.Redis, list[bytes]]:
    """Keys grouped by the master that owns their slot (one group when not a cluster)."""
    if not _is_cluster(client):
        return {client: list(keys)}
    nodes: dict[str, redis.Redis] = {}
    out: dict[str, list[bytes]] = defaultdict(list)
    for key in keys:
        node = client.nodes_manager.get_node_from_slot(key_slot(key))
        nodes.setdefault(node.name, client.get_redis_connection(node))
        out[node.name].append(key)
    return {nodes[name]: ks for name, ks in out.items()}


def _batches(client: Client, keys: list[bytes], size: int) -> dict[redis.Redis, list[list]]:
    """Batches of at most `size` keys per master; in a cluster a batch holds one slot,
    because a script may only touch keys of one slot."""
    out: dict[redis.Redis, list[list[bytes]]] = {}
    for node, ks in _by_node(client, keys).items():
        if _is_cluster(client):
            slots: dict[int, list[bytes]] = defaultdict(list)
            for k in ks:
                slots[key_slot(k)].append(k)
            groups = list(slots.values())
        else:
            groups = [ks]
        out[node] = [g[i : i + size] for g in groups for i in range(0, len(g), size)]
    return out


class _Guard:
    """Turns connection errors into the SyncError subclass naming the side that failed."""

    def __init__(self, side: str):
        self.side = side

    def __enter__(self) -> None:
        return None

    def __exit__(self, typ: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is None or isinstance(exc, SyncError):
            return False
        if isinstance(exc, (redis.ConnectionError, redis.TimeoutError, OSError)):
            cls = DestinationUnreachable if self.side == "destination" else SourceUnreachable
            raise cls(f"{self.side} Redis is unreachable: {exc}") from exc
        if isinstance(exc, redis.RedisError):
            raise SyncError(f"{self.side} Redis refused: {exc}") from exc
        return False


def ping(client: Client, side: str = "destination") -> None:
    """Raise the matching SyncError unless every master of `client` answers."""
    with _Guard(side):
        for node in _masters(client):
            node.ping()


# -- finding a user's keys ---------------------------------------------------------------


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


def user_pattern(user_id: str) -> str:
    """SCAN pattern for one user's keys, with glob characters of the id escaped."""
    _check_id(user_id)
    return "*{" + user_id.translate(_GLOB) + "}*"


def _check_id(user_id: str) -> None:
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
    for node in _masters(client):
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
    return list(_iter_user_keys(client, user_ids))


def _iter_user_keys(client: Client, user_ids: Iterable[str] | None) -> Iterator[bytes]:
    """`user_keys` as the scan finds them."""
    if user_ids is None:
        return (k for k in scan(client, "*{?*}*") if hash_tag(k) is not None)
    ids = [str(u) for u in user_ids]
    for u in ids:
        _check_id(u)
    if len(ids) <= PER_USER_SCAN_MAX:
        return (k for u in ids for k in scan(client, user_pattern(u))
                if hash_tag(k) == u.encode())  # fmt: skip
    wanted = {u.encode() for u in ids}
    return (k for k in scan(client, "*{?*}*") if hash_tag(k) in wanted)


@dataclass(frozen=True)
class KeySchema:
    """Where one user's keys are, declared by the app, so that they are found by name
    rather than by a scan of the keyspace (whose cost grows with every other user).

    `fixed`: names every user may have, e.g. `u:{<user>}`. `families`: pairs (index,
    member key), e.g. (`pms:{<user>}`, `pm:{<user>}:<member>`): the members (or fields)
    of the index key, a set, sorted set, list or hash the app keeps, name the family's
    keys. Every name carries `{<user>}` as its hash tag, so a cluster finds them on one
    slot. A key the schema does not name is not copied: the app keeps it complete.
    """

    fixed: tuple[str, ...] = ()
    families: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        for t in (*self.fixed, *(x for f in self.families for x in f)):
            if "{<user>}" not in t or hash_tag(t.replace("<member>", "m").encode()) != b"<user>":
                raise ValueError(f"key schema: {t!r} must have {{<user>}} as its hash tag")
        for idx, member in self.families:
            if "<member>" not in member or "<member>" in idx:
                raise ValueError(f"key schema: family {idx!r} -> {member!r} needs <member> "
                                 "in the member key only")


_INDEX_READ = {b"set": "smembers", b"zset": "zrange", b"list": "lrange", b"hash": "hkeys"}


def schema_keys(client: Client, schema: KeySchema, user_ids: Iterable[str]) -> list[bytes]:
    """The users' keys by `schema`: two pipelined round trips (the index keys' types, then
    their members) whatever the size of the keyspace. Names that do not exist are left
    in (the copy skips keys that are gone)."""
    ids = [str(u) for u in user_ids]
    for u in ids:
        _check_id(u)
    keys = [t.replace("<user>", u).encode() for u in ids for t in schema.fixed]
    indexes = [(u, idx.replace("<user>", u), member) for u in ids
               for idx, member in schema.families]
    if not indexes:
        return keys
    pipe = client.pipeline(transaction=False)
    for _, idx, _ in indexes:
        pipe.type(idx)
    types = pipe.execute()
    pipe = client.pipeline(transaction=False)
    read = []
    for (u, idx, member), typ in zip(indexes, types, strict=True):
        op = _INDEX_READ.get(typ if isinstance(typ, bytes) else str(typ).encode())
        if op is None:
            continue
        args = (idx, 0, -1) if op in ("zrange", "lrange") else (idx,)
        getattr(pipe, op)(*args)
        read.append(member.replace("<user>", u))
    for template, members in zip(read, pipe.execute(), strict=True):
        keys += [template.replace("<member>", (m.decode() if isinstance(m, bytes) else m))
                 .encode() for m in members]
    return list(dict.fromkeys(keys))


def _chunked(keys: Iterable[bytes]) -> Iterator[list[bytes]]:
    """Lists of CHUNK keys (the first one of FIRST_CHUNK, to get the destination going)."""
    chunk: list[bytes] = []
    size = FIRST_CHUNK
    for k in keys:
        chunk.append(k)
        if len(chunk) >= size:
            yield chunk
            chunk, size = [], CHUNK
    if chunk:
        yield chunk


# -- moving keys -------------------------------------------------------------------------

# Scripts move a whole batch as one bulk string each way: per key a header
# (ttl: 8 bytes signed, length: 4 bytes, big-endian) and the DUMP payload. One reply
# per batch instead of one per key keeps the client's parsing out of the hot path.
_HEADER = struct.Struct(">qI")

# DUMP and PTTL of KEYS, packed; a key gone since the scan gets ttl -2 and no payload.
_DUMP = """
local out = {}
for i, k in ipairs(KEYS) do
  local p = redis.call('DUMP', k)
  if p then
    out[i] = struct.pack('>i8I4', redis.call('PTTL', k), #p) .. p
  else
    out[i] = struct.pack('>i8I4', -2, 0)
  end
end
return table.concat(out)
"""

# One SCAN step that also dumps what it finds (standalone sources only: a cluster node
# refuses a script touching keys of several slots): per key its length, PTTL, payload
# length (big-endian, 4 + 8 + 4 bytes), the key and the payload.
_SCAN_DUMP = """
local r = redis.call('SCAN', ARGV[1], 'MATCH', ARGV[2], 'COUNT', ARGV[3])
local out = {}
for _, k in ipairs(r[2]) do
  local p = redis.call('DUMP', k)
  if p then out[#out + 1] = struct.pack('>I4i8I4', #k, redis.call('PTTL', k), #p) .. k .. p end
end
return {r[1], table.concat(out)}
"""
_SCAN_HEADER = struct.Struct(">IqI")

# ARGV: replace flag and the packed batch. Each key is RESTOREd, then read back (DUMP)
# and compared byte for byte with the payload it was given. Returns per key '1' (written,
# read back equal), 'x' (written, read back different: compared by value afterwards) or
# '0' (replace=0 and the destination had the key: kept, not written).
_RESTORE = """
local replace = ARGV[1] == '1'
local blob = ARGV[2]
local pos = 1
local out = {}
for i, k in ipairs(KEYS) do
  local ttl, n, nxt = struct.unpack('>i8I4', blob, pos)
  pos = nxt + n
  if replace or redis.call('EXISTS', k) == 0 then
    local p = string.sub(blob, nxt, pos - 1)
    redis.call('RESTORE', k, ttl, p, 'REPLACE')
    if redis.call('DUMP', k) == p then out[i] = '1' else out[i] = 'x' end
  else
    out[i] = '0'
  end
end
return table.concat(out)
"""

# Verification by value, for payloads whose bytes depend on the server's memory layout
# (hash-table sets and hashes: their DUMP order is the table's) or that differ after a
# RESTORE (another Redis version, another encoding). KEYS: pairs (key, scratch key of the
# same slot); ARGV: the source's payloads. Each payload is restored into the scratch key
# and compared with the key by value, by type; the scratch key is deleted in the same
# script, so nobody ever sees it. Returns the positions (0-based) of the keys that differ.
_SAME = """
local function same(k, s)
  local t = redis.call('TYPE', k)['ok']
  if t ~= redis.call('TYPE', s)['ok'] then return false end
  if t == 'string' then return redis.call('GET', k) == redis.call('GET', s) end
  if t == 'set' then
    if redis.call('SCARD', k) ~= redis.call('SCARD', s) then return false end
    for _, m in ipairs(redis.call('SMEMBERS', s)) do
      if redis.call('SISMEMBER', k, m) == 0 then return false end
    end
    return true
  end
  if t == 'hash' then
    if redis.call('HLEN', k) ~= redis.call('HLEN', s) then return false end
    local kv = redis.call('HGETALL', s)
    for j = 1, #kv, 2 do
      if redis.call('HGET', k, kv[j]) ~= kv[j + 1] then return false end
    end
    return true
  end
  if t == 'zset' then
    if redis.call('ZCARD', k) ~= redis.call('ZCARD', s) then return false end
    local ms = redis.call('ZRANGE', s, 0, -1, 'WITHSCORES')
    for j = 1, #ms, 2 do
      if redis.call('ZSCORE', k, ms[j]) ~= ms[j + 1] then return false end
    end
    return true
  end
  if t == 'list' then
    local a, b = redis.call('LRANGE', k, 0, -1), redis.call('LRANGE', s, 0, -1)
    if #a ~= #b then return false end
    for j = 1, #a do if a[j] ~= b[j] then return false end end
    return true
  end
  return redis.call('DUMP', k) == redis.call('DUMP', s)
end
local bad = {}
for i = 1, #ARGV do
  local k, s = KEYS[2 * i - 1], KEYS[2 * i]
  redis.call('RESTORE', s, 0, ARGV[i], 'REPLACE')
  local ok = same(k, s)
  redis.call('DEL', s)
  if not ok then bad[#bad + 1] = i - 1 end
end
return table.concat(bad, ',')
"""

# RDB types of the payloads whose bytes follow a hash table's order (set, hash).
_UNORDERED = frozenset({2, 4})


@dataclass
class _Job:
    """A command run over `keys` in batches of at most `size` (one slot per batch in a
    cluster); `command` makes a batch's command words."""

    keys: list[bytes]
    command: Callable[[list[bytes]], list[Any]]
    size: int = BATCH


def _script(
    script: str,
    args: Callable[[list[bytes]], list[Any]] | None = None,
    keys_of: Callable[[list[bytes]], list[bytes]] | None = None,
) -> Callable[[list[bytes]], list[Any]]:
    """EVAL of `script` with the batch (or `keys_of(batch)`) as KEYS, `args(batch)` as
    ARGV. EVAL rather than EVALSHA: a pipeline of registered scripts first asks SCRIPT
    EXISTS, one more round trip each time; Redis caches the compiled body either way."""

    def command(batch: list[bytes]) -> list[Any]:
        keys = batch if keys_of is None else keys_of(batch)
        return ["EVAL", script, len(keys), *keys, *(args(batch) if args else ())]

    return command


def _exec(client: Client, jobs: list[_Job], side: str,
          flush: int = FLUSH) -> list[list[tuple[list[bytes], Any]]]:  # fmt: skip
    """Run the jobs' batches pipelined per master, in the jobs' order, a round trip per
    `flush` keys rather than per batch (over an SSH port forward a round trip costs tens
    of milliseconds); the (batch, reply) pairs of each job."""
    out: list[list[tuple[list[bytes], Any]]] = [[] for _ in jobs]
    with _Guard(side):
        work: dict[redis.Redis, list[tuple[int, list[bytes]]]] = defaultdict(list)
        for j, job in enumerate(jobs):
            for node, batches in _batches(client, job.keys, job.size).items():
                work[node] += [(j, b) for b in batches]
        for node, items in work.items():
            pipe = node.pipeline(transaction=False)
            pending: list[tuple[int, list[bytes]]] = []
            queued = 0
            for j, batch in items:
                pipe.execute_command(*jobs[j].command(batch))
                pending.append((j, batch))
                queued += len(batch)
                if queued >= flush:
                    for (jj, b), reply in zip(pending, pipe.execute(), strict=True):
                        out[jj].append((b, reply))
                    pending, queued = [], 0
            if pending:
                for (jj, b), reply in zip(pending, pipe.execute(), strict=True):
                    out[jj].append((b, reply))
    return out


def _run(
    client: Client,
    keys: list[bytes],
    script: str,
    args: Callable[[list[bytes]], list[Any]],
    side: str,
    size: int = BATCH,
) -> list[tuple[list[bytes], Any]]:
    """Run `script` over `keys` in batches, pipelined per master; (batch, reply) pairs."""
    return _exec(client, [_Job(keys, _script(script, args), size)], side)[0]


def _dump(client: Client, keys: list[bytes], side: str = "source") -> dict[bytes, tuple]:
    """key -> (payload, ttl for RESTORE) for the keys that still exist."""
    dumped: dict[bytes, tuple[bytes, int]] = {}
    unpack = _HEADER.unpack_from
    width = _HEADER.size
    for batch, blob in _run(client, keys, _DUMP, _no_args, side):
        pos = 0
        for key in batch:
            pttl, n = unpack(blob, pos)
            pos += width
            if pttl != -2:
                dumped[key] = (blob[pos : pos + n], max(pttl, 0))
            pos += n
    return dumped


def _no_args(batch: list[bytes]) -> list[Any]:
    return []


def _scan_dump(client: redis.Redis, pattern: str, count: int = SCAN_COUNT,
               side: str = "source") -> Iterator[dict[bytes, tuple]]:  # fmt: skip
    """SCAN MATCH `pattern` and DUMP what it finds in the same script calls: key ->
    (payload, ttl) per SCAN step. One pass over a standalone server instead of a scan
    and then a dump."""
    unpack, width = _SCAN_HEADER.unpack_from, _SCAN_HEADER.size
    cursor: bytes | int = b"0"
    while True:
        with _Guard(side):
            cursor, blob = client.execute_command("EVAL", _SCAN_DUMP, 0, cursor, pattern, count)
        part: dict[bytes, tuple[bytes, int]] = {}
        pos, end = 0, len(blob)
        while pos < end:
            nk, pttl, n = unpack(blob, pos)
            pos += width
            key = blob[pos : pos + nk]
            pos += nk
            part[key] = (blob[pos : pos + n], max(pttl, 0))
            pos += n
        yield part
        if cursor in (b"0", 0):
            return


def _restore(client: Client, dumped: dict[bytes, tuple], replace: bool) -> list[bytes]:
    """RESTORE the dumped keys and verify them on the destination; the keys written.

    One pipelined pass per master: the RESTORE batches (each key read back and compared
    with its payload in the same script), then the by-value check of the keys whose
    payload bytes follow a hash table's order (sets, hashes); keys read back different
    for another reason (another Redis version) are compared by value in one more pass.
    Raises VerificationFailed if a written key differs.
    """
    pack = _HEADER.pack
    flag = "1" if replace else "0"
    keys = list(dumped)
    unordered = [k for k in keys if dumped[k][0][0] in _UNORDERED]

    def restore_args(batch: list[bytes]) -> list[Any]:
        parts = []
        for k in batch:
            payload, ttl = dumped[k]
            parts += [pack(ttl, len(payload)), payload]
        return [flag, b"".join(parts)]

    restored, compared = _exec(client, [
        _Job(keys, _script(_RESTORE, restore_args)),
        _same_job(dumped, unordered),
    ], "destination")  # fmt: skip
    written: list[bytes] = []
    differ: list[bytes] = []
    for batch, flags in restored:
        for k, f in zip(batch, flags, strict=True):
            if f != 48:  # b"0": kept
                written.append(k)
                if f != 49:  # b"1": read back equal
                    differ.append(k)
    if differ:
        unequal = {k for b, r in compared for k in _positions(b, r)}
        checked = set(unordered)
        bad = [k for k in differ if k in unequal]
        again = [k for k in differ if k not in checked]
        if again:
            (second,) = _exec(client, [_same_job(dumped, again)], "destination")
            bad += [k for b, r in second for k in _positions(b, r)]
        if bad:
            raise _differ(bad)
    return written


def _differ(bad: list[bytes]) -> VerificationFailed:
    shown = ", ".join(k.decode(errors="replace") for k in bad[:5])
    return VerificationFailed(
        f"{len(bad)} keys differ on the destination after the copy: {shown}", bad
    )


def _positions(batch: list[bytes], reply: bytes) -> list[bytes]:
    """The keys of `batch` at the comma-separated positions of a check's reply."""
    return [batch[int(i)] for i in reply.split(b",") if i] if reply else []


def _scratch(key: bytes) -> bytes:
    """A scratch key in the slot of `key` (same hash tag)."""
    return b"__enorm_verify:{" + (hash_tag(key) or key) + b"}"


def _same_job(dumped: dict[bytes, tuple], keys: list[bytes]) -> _Job:
    def keys_of(batch: list[bytes]) -> list[bytes]:
        return [x for k in batch for x in (k, _scratch(k))]

    return _Job(keys, _script(_SAME, lambda b: [dumped[k][0] for k in b], keys_of), 200)


def _verify_present(client: Client, keys: list[bytes]) -> int:
    """After all writes: every key is still on the destination (none evicted or expired
    while later chunks were written). Raises VerificationFailed naming the missing."""
    (found,) = _exec(client, [_Job(keys, lambda b: ["EXISTS", *b])], "destination")
    if sum(n for _, n in found) == len(keys):
        return len(keys)
    missing: list[bytes] = []
    with _Guard("destination"):
        for batch, n in found:
            if n != len(batch):
                for node, ks in _by_node(client, batch).items():
                    pipe = node.pipeline(transaction=False)
                    for k in ks:
                        pipe.exists(k)
                    missing += [k for k, e in zip(ks, pipe.execute(), strict=True) if not e]
    raise VerificationFailed(
        f"{len(missing)} keys are missing on the destination after the copy: "
        + ", ".join(k.decode(errors="replace") for k in missing[:5]),
        missing,
    )


def copy_users(
    src: Client, dst: Client, user_ids: Iterable[str], *, replace: bool = True,
    manifest: str | None = None, schema: KeySchema | None = None,
) -> SyncReport:
    """Copy every key of `user_ids` from `src` to `dst`, then verify it on `dst`.

    With replace=False keys that `dst` already has are kept (and not verified).
    With `manifest` (see `manifest_key`), the digest of every copied key (as copied) is
    recorded on `src` under that name, for `merge_back` to find deletes and conflicts.
    With `schema` the keys are found by name (`schema_keys`), without it by a scan of
    `src`'s keyspace.
    Raises DestinationUnreachable before touching anything if `dst` does not answer,
    VerificationFailed if `dst` does not hold what was read from `src`.
    """
    started = time.perf_counter()
    ids = list(dict.fromkeys(str(u) for u in user_ids))
    report = SyncReport(users=len(ids))
    ping(dst)
    copied: dict[bytes, bytes] | None = {} if manifest is not None else None
    found = schema_keys(src, schema, ids) if schema else _iter_user_keys(src, ids)
    _copy_chunks(src, dst, _chunked(found), replace, report, copied=copied)
    if manifest is not None:
        # The digests come from the very payloads copied: no second read, no race.
        write_manifest(src, manifest, copied)
        report.manifest = True
    report.verified = True
    report.seconds = time.perf_counter() - started
    return report


def _copy_chunks(src: Client, dst: Client, chunks: Iterable, replace: bool,
                 report: SyncReport, copied: dict[bytes, bytes] | None = None,
                 prepare: Callable[[dict], None] | None = None) -> None:  # fmt: skip
    """Copy chunk by chunk: each item of `chunks` is a list of keys to dump from `src`,
    or a dict already dumped (key -> (payload, ttl)); `chunks` may be a generator that
    scans the source as it goes.

    Three stages overlap: a thread dumps chunk i+2 (scanning as needed) while two
    others restore and check chunks i and i+1 on `dst`, each over its own connection,
    so the destination works on one chunk while the next is packed and sent. After the
    last chunk every written key is checked to be still there (eviction, expiry).
    """
    written: list[bytes] = []
    it = iter(chunks)

    def next_dump() -> dict[bytes, tuple] | None:
        with _Guard("source"):
            for item in it:
                part = item if isinstance(item, dict) else _dump(src, item)
                if part:
                    return part
        return None

    def collect(part: dict[bytes, tuple], done: list[bytes]) -> None:
        written.extend(done)
        if copied is not None:
            copied.update((k, part[k][0]) for k in done)
        report.skipped += len(part) - len(done)
        report.bytes += sum(len(part[k][0]) for k in done)

    with (
        ThreadPoolExecutor(1, thread_name_prefix="datasync-dump") as dumper,
        ThreadPoolExecutor(RESTORERS, thread_name_prefix="datasync-restore") as restorer,
    ):
        ahead = dumper.submit(next_dump)
        inflight: deque[tuple[dict, Future]] = deque()
        while (part := ahead.result()) is not None:
            ahead = dumper.submit(next_dump)
            if len(inflight) >= RESTORERS:
                collect(inflight[0][0], inflight.popleft()[1].result())
            inflight.append((part, restorer.submit(_prepared_restore, dst, part, replace,
                                                   prepare)))
        while inflight:
            collect(inflight[0][0], inflight.popleft()[1].result())
    report.keys += len(written)
    report.keys_verified += _verify_present(dst, written)


def _prepared_restore(dst: Client, part: dict, replace: bool,
                      prepare: Callable[[dict], None] | None) -> list[bytes]:  # fmt: skip
    """`prepare(part)` (which may hold keys back), then the restore, in one restorer
    thread: the check runs beside the next chunk's dump instead of before it."""
    if prepare is not None:
        prepare(part)
    return _restore(dst, part, replace)


def count_existing(client: Client, keys: Iterable[bytes | str]) -> int:
    """How many of `keys` exist on `client` (multi-key EXISTS, pipelined per master)."""
    ks = [k.encode() if isinstance(k, str) else k for k in keys]
    (found,) = _exec(client, [_Job(ks, lambda b: ["EXISTS", *b])], "destination")
    return sum(n for _, n in found)


def delete_users(src: Client, user_ids: Iterable[str]) -> int:
    """Delete the users' keys on `src`. Call only after a verified copy: it is the one
    function here that removes data."""
    with _Guard("source"):
        keys = user_keys(src, [str(u) for u in user_ids])
        deleted = 0
        for node, ks in _by_node(src, keys).items():
            pipe = node.pipeline(transaction=False)
            for i in range(0, len(ks), BATCH):
                pipe.unlink(*ks[i : i + BATCH])
            deleted += sum(pipe.execute())
    return deleted


# -- the copy's manifest: what went out, as it was -------------------------------------

# A digest of each key's value: the CRC-64 that ends its DUMP payload (16 hex digits),
# free for the copy, which dumps every key anyway. Sets and hashes in hash-table encoding
# (RDB types 2 and 4) dump in their table's order, which a rehash may change without a
# write: theirs is a SHA-1 of the type and the sorted elements instead. A key that does
# not exist gets 16 dots.
_DIGEST_FN = """
local function lp(x) return struct.pack('>I4', #x) .. x end
local function digest(k)
  local p = redis.call('DUMP', k)
  if not p then return '................' end
  local t = string.byte(p, 1)
  if t ~= 2 and t ~= 4 then
    return string.format(string.rep('%02x', 8), string.byte(p, #p - 7, #p))
  end
  local parts = {}
  if t == 4 then
    local kv = redis.call('HGETALL', k)
    for j = 1, #kv, 2 do parts[#parts + 1] = lp(kv[j]) .. lp(kv[j + 1]) end
  else
    for _, m in ipairs(redis.call('SMEMBERS', k)) do parts[#parts + 1] = lp(m) end
  end
  table.sort(parts)
  return string.sub(redis.sha1hex(t .. table.concat(parts, '')), 1, 16)
end
"""
_DIGESTS = _DIGEST_FN + """
local out = {}
for i, k in ipairs(KEYS) do out[i] = digest(k) end
return table.concat(out)
"""
_ABSENT = b"." * 16
MANIFEST_TTL_S = 30 * 86400  # a server that never terminates leaves no manifest for ever


def payload_digest(payload: bytes) -> bytes | None:
    """The digest `_DIGESTS` gives, from a DUMP payload; None for the hash-table types,
    whose digest needs the server."""
    if payload[0] in _UNORDERED:
        return None
    return payload[-8:].hex().encode()


def manifest_key(server_id: str) -> str:
    """Where the cloud keeps what one edge server was given (no hash tag: not a user's)."""
    if not server_id or any(c in server_id for c in "{}*?[] "):
        raise ValueError(f"server id {server_id!r} cannot name a manifest")
    return f"enorm:manifest:{server_id}"


def digests(client: Client, keys: list[bytes],
            side: str = "destination") -> dict[bytes, bytes | None]:  # fmt: skip
    """key -> digest of its value now (None: the key does not exist)."""
    out: dict[bytes, bytes | None] = {}
    for batch, blob in _run(client, keys, _DIGESTS, _no_args, side):
        for i, key in enumerate(batch):
            d = blob[16 * i : 16 * i + 16]
            out[key] = None if d == _ABSENT else d
    return out


def write_manifest(client: Client, name: str, dumped: dict[bytes, bytes]) -> int:
    """Record on `client` (the cloud) the digest of each key of `dumped` (key -> the DUMP
    payload that was copied): the merge at termination tells from it what the edge
    deleted and what the cloud changed meanwhile. Replaces an older manifest."""
    found: dict[bytes, bytes] = {}
    ask = []
    for k, payload in dumped.items():
        d = payload_digest(payload)
        if d is None:
            ask.append(k)
        else:
            found[k] = d
    found.update((k, d) for k, d in digests(client, ask, "source").items() if d is not None)
    with _Guard("source"):
        pipe = client.pipeline(transaction=False)
        pipe.delete(name)
        items = list(found.items())
        for i in range(0, len(items), FLUSH // 10):
            pipe.hset(name, mapping=dict(items[i : i + FLUSH // 10]))
        pipe.expire(name, MANIFEST_TTL_S)
        pipe.execute()
    return len(found)


def read_manifest(client: Client, name: str) -> dict[bytes, bytes] | None:
    """The manifest `name` on the cloud, or None when there is none."""
    with _Guard("destination"):
        m = client.hgetall(name)
    return m or None


# -- merging back (termination) ----------------------------------------------------------

# Append the ARGV items the list lacks, counting duplicates (a multiset difference), in
# one step so a concurrent writer on the cloud cannot interleave.
_LIST_MERGE = """
local have = {}
for _, v in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do have[v] = (have[v] or 0) + 1 end
local n = 0
for _, v in ipairs(ARGV) do
  if (have[v] or 0) > 0 then have[v] = have[v] - 1
  else redis.call('RPUSH', KEYS[1], v); n = n + 1 end
end
return n
"""

_READ = {
    b"string": lambda p, k: p.get(k),
    b"hash": lambda p, k: p.hgetall(k),
    b"set": lambda p, k: p.smembers(k),
    b"zset": lambda p, k: p.zrange(k, 0, -1, withscores=True),
    b"list": lambda p, k: p.lrange(k, 0, -1),
}


def _read_typed(client: Client, keys: list[bytes], side: str) -> dict[bytes, tuple[bytes, Any]]:
    """key -> (type, value) for the keys of a merge-able type that exist."""
    out: dict[bytes, tuple[bytes, Any]] = {}
    with _Guard(side):
        for node, ks in _by_node(client, keys).items():
            for i in range(0, len(ks), BATCH):
                chunk = ks[i : i + BATCH]
                pipe = node.pipeline(transaction=False)
                for k in chunk:
                    pipe.type(k)
                types = pipe.execute()
                pipe = node.pipeline(transaction=False)
                kept = [(k, t) for k, t in zip(chunk, types, strict=True) if t in _READ]
                for k, t in kept:
                    _READ[t](pipe, k)
                for (k, t), v in zip(kept, pipe.execute(), strict=True):
                    out[k] = (t, v)
    return out


def merge_rule(typ: bytes, cloud: Any, edge: Any) -> Any:
    """The value the cloud should hold after merging `edge` into `cloud` (None: absent).

    The union rule, by type; where both sides hold the same element with different
    values the edge wins, because the edge served the users (and saw the newer writes)
    for the whole tenure:
      set    union of members
      hash   union of fields; a field on both sides takes the edge's value
      zset   union of members; a member on both sides keeps the higher score
      list   the cloud's list, then the edge's items the cloud lacks (multiset difference)
      string the edge's value
    `merge_back` applies the same rule with Redis commands; this pure form documents it
    and is what the tests check against.
    """
    if cloud is None:
        return edge
    if typ == b"set":
        return set(cloud) | set(edge)
    if typ == b"hash":
        return {**cloud, **edge}
    if typ == b"zset":
        merged = dict(cloud)
        for member, score in dict(edge).items():
            merged[member] = max(score, merged.get(member, score))
        return merged
    if typ == b"list":
        have = Counter(cloud)
        extra = []
        for item in edge:
            if have[item] > 0:
                have[item] -= 1
            else:
                extra.append(item)
        return list(cloud) + extra
    return edge


def _contains(typ: bytes, cloud: Any, edge: Any) -> bool:
    """True when `cloud` holds everything of `edge` under the merge rule."""
    if cloud is None:
        return False
    if typ == b"set":
        return set(edge) <= set(cloud)
    if typ == b"hash":
        return all(cloud.get(f) == v for f, v in edge.items())
    if typ == b"zset":
        c = dict(cloud)
        return all(m in c and c[m] >= s for m, s in edge)
    if typ == b"list":
        return not (Counter(edge) - Counter(cloud))
    return cloud == edge


def _merge_shared(edge: Client, cloud: Client, keys: list[bytes], report: SyncReport) -> None:
    values = _read_typed(edge, keys, "source")
    with _Guard("destination"):
        cloud_types: dict[bytes, bytes] = {}
        for node, ks in _by_node(cloud, list(values)).items():
            pipe = node.pipeline(transaction=False)
            for k in ks:
                pipe.type(k)
            cloud_types.update(zip(ks, pipe.execute(), strict=True))
        for node, ks in _by_node(cloud, list(values)).items():
            list_merge = node.register_script(_LIST_MERGE)
            pipe = node.pipeline(transaction=False)
            for k in ks:
                typ, value = values[k]
                if cloud_types[k] not in (b"none", typ):
                    pipe.delete(k)  # the types disagree: the edge's key wins
                if typ == b"string":
                    pipe.set(k, value)
                elif typ == b"set" and value:
                    pipe.sadd(k, *value)
                elif typ == b"hash" and value:
                    pipe.hset(k, mapping=value)
                elif typ == b"zset" and value:
                    pipe.zadd(k, dict(value), gt=True)
                elif typ == b"list" and value:
                    list_merge(keys=[k], args=value, client=pipe)
                report.bytes += _size(value)
            pipe.execute()
    report.merged += len(values)
    after = _read_typed(cloud, list(values), "destination")
    bad = [
        k for k, (typ, v) in values.items() if not _contains(typ, after.get(k, (typ, None))[1], v)
    ]
    if bad:
        raise VerificationFailed(f"{len(bad)} shared keys were not merged into the cloud", bad)
    report.keys_verified += len(values)


def _size(value: Any) -> int:
    if isinstance(value, bytes):
        return len(value)
    if isinstance(value, dict):
        return sum(len(f) + len(v) for f, v in value.items())
    if isinstance(value, list) and value and isinstance(value[0], tuple):
        return sum(len(m) + 8 for m, _ in value)
    return sum(len(v) for v in value)


SAMPLE = 10  # key names reported per kind of surprise


def _sample(into: list[str], key: bytes) -> None:
    if len(into) < SAMPLE:
        into.append(key.decode("utf-8", "replace"))


def _matches(key: bytes, patterns: list[str]) -> bool:
    name = key.decode("latin-1")
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _tagged_dumps(edge: redis.Redis, shared: Callable[[], set[bytes]], tags: set[bytes],
                  owns: Callable[[bytes], bool]) -> Iterator[dict[bytes, tuple]]:  # fmt: skip
    """The edge's user keys (hash-tagged, not shared, owned) dumped in one scan, in
    chunks of about CHUNK keys (a smaller first one, to get the destination going); the
    tags seen are added to `tags`. `shared()` gives the shared keys, waited for only
    once the first SCAN steps are done."""
    chunk: dict[bytes, tuple[bytes, int]] = {}
    size = FIRST_CHUNK
    skip: set[bytes] | None = None
    for part in _scan_dump(edge, "*{?*}*"):
        chunk.update(part)
        if len(chunk) >= size:
            if skip is None:
                skip = shared()
            yield _user_part(chunk, skip, tags, owns)
            chunk, size = {}, CHUNK
    if chunk:
        yield _user_part(chunk, shared() if skip is None else skip, tags, owns)


def _user_part(part: dict[bytes, tuple], shared: set[bytes], tags: set[bytes],
               owns: Callable[[bytes], bool]) -> dict:  # fmt: skip
    out = {}
    for key, value in part.items():
        tag = hash_tag(key)
        if tag is not None and key not in shared and owns(key):
            out[key] = value
            tags.add(tag)
    return out


def merge_back(
    edge: Client,
    cloud: Client,
    *,
    shared_patterns: Iterable[str] = (),
    user_ids: Iterable[str] | None = None,
    manifest: str | None = None,
    cloud_wins: Iterable[str] = (),
) -> SyncReport:
    """Termination: bring the edge's data home to the cloud, verified.

    User keys replace the cloud's copy; keys matching `shared_patterns` are merged by
    `merge_rule`. With `user_ids` (what a node always passes: the users of the setup
    request) only keys whose hash tag is one of them are written, shared keys included;
    every other hash-tagged key on the edge is counted and sampled, never merged: an edge
    server cannot write another user's data on the cloud.

    With `manifest` (written by `copy_users` at deploy, on the cloud) the served users'
    keys that the edge deleted are deleted on the cloud, and a key the cloud changed
    during the offload is a conflict: counted, sampled, and resolved by policy: the edge
    wins, except for keys matching a `cloud_wins` pattern, which keep the cloud's value.
    The manifest is removed once the merge is verified. Without a manifest nothing is
    deleted and conflicts cannot be told.
    """
    started = time.perf_counter()
    report = SyncReport()
    patterns, wins = list(shared_patterns), list(cloud_wins)
    owned = None if user_ids is None else {str(u).encode() for u in user_ids}
    ping(cloud)
    m = read_manifest(cloud, manifest) if manifest else None
    report.manifest = m is not None
    seen: set[bytes] = set()  # the edge's user keys that were offered to the cloud

    def owns(key: bytes) -> bool:
        tag = hash_tag(key)
        if owned is None or tag is None or tag in owned:
            return True
        report.not_owned += 1
        _sample(report.not_owned_sample, key)
        return False

    def scan_shared() -> list[bytes]:
        with _Guard("source"):
            return list(dict.fromkeys(k for p in patterns for k in scan(edge, p, SCAN_COUNT * 4)))

    def remembered(chunks: Iterable) -> Iterator[dict[bytes, tuple]]:
        for item in chunks:
            part = item if isinstance(item, dict) else _dump(edge, item)
            seen.update(part)
            yield part

    counting = threading.Lock()  # two restorer threads report conflicts

    def hold_back(part: dict) -> None:
        """Before a chunk is restored: its conflicts, and what the cloud wins stays."""
        if m is None or not part:
            return
        found = _conflicts(edge, cloud, m, list(part))
        with counting:
            _count(report, found)
            for k in found:
                if _matches(k, wins):
                    report.conflicts_cloud_won += 1
                    del part[k]

    with ThreadPoolExecutor(1, thread_name_prefix="datasync-shared") as pool:
        # The shared keys are scanned while the user keys' scan starts.
        pending = pool.submit(scan_shared)
        tags: set[bytes] = set()
        if not _is_cluster(edge):
            chunks: Iterable = _tagged_dumps(edge, lambda: set(pending.result()), tags, owns)
        else:
            shared_set = set(pending.result())
            with _Guard("source"):
                keys = [k for k in user_keys(edge, None) if k not in shared_set and owns(k)]
            tags = {t for k in keys if (t := hash_tag(k)) is not None}
            chunks = [keys[i : i + CHUNK] for i in range(0, len(keys), CHUNK)]
        _copy_chunks(edge, cloud, remembered(chunks), True, report, prepare=hold_back)
        shared = [k for k in pending.result() if owns(k)]
    report.users = len(tags) if owned is None else len(owned)
    _merge_shared(edge, cloud, shared, report)
    if m is not None:
        gone = [k for k in m if k not in seen and k not in shared
                and (owned is None or hash_tag(k) in owned)]
        kept = set(_conflicts(edge, cloud, m, gone))
        _count(report, kept)
        doomed = [k for k in gone if not (k in kept and _matches(k, wins))]
        report.conflicts_cloud_won += len(gone) - len(doomed)
        report.deleted = _unlink(cloud, doomed)
        with _Guard("destination"):
            cloud.delete(manifest)
    report.verified = True
    report.seconds = time.perf_counter() - started
    return report


def _count(report: SyncReport, conflicts: Iterable[bytes]) -> None:
    for k in conflicts:
        report.conflicts += 1
        _sample(report.conflict_sample, k)


def _conflicts(edge: Client, cloud: Client, m: dict[bytes, bytes],
               keys: list[bytes]) -> list[bytes]:  # fmt: skip
    """Of `keys`, those the cloud changed since the copy: its value is neither what was
    copied out nor already the edge's (a retried merge wrote that itself)."""
    if not keys:
        return []
    now = digests(cloud, keys)
    changed = [k for k in keys if now[k] != m.get(k)]
    if not changed:
        return []
    at_edge = digests(edge, changed, "source")
    out = [k for k in changed
           if (now[k] is not None and now[k] != at_edge[k])
           or (now[k] is None and at_edge[k] is not None and k in m)]
    return out


def _unlink(client: Client, keys: list[bytes]) -> int:
    """Delete `keys` on `client` (one slot per command in a cluster); how many existed."""
    if not keys:
        return 0
    (replies,) = _exec(client, [_Job(keys, lambda b: ["UNLINK", *b])], "destination")
    return sum(n for _, n in replies)
