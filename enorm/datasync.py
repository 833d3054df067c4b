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

Speed: keys move in batches through small Lua scripts (one EVALSHA per batch dumps, one
restores, one digests), so a batch costs one round trip and one reply, not one per key.
In a cluster the batches are cut per slot and pipelined per master.
"""

from __future__ import annotations

import hashlib
import struct
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Union

import redis
from redis.backoff import ExponentialBackoff
from redis.cluster import RedisCluster
from redis.crc import key_slot
from redis.retry import Retry

Client = Union[redis.Redis, RedisCluster]  # noqa: UP007 (kept readable in signatures)

BATCH = 1000  # keys per script call
FLUSH = 20_000  # keys per pipeline flush (one round trip)
CHUNK = 10_000  # keys dumped ahead while the previous chunk is restored
SCAN_COUNT = 1000
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
    """What a copy or a merge did. `deleted` is always 0: syncing never deletes."""

    users: int = 0
    keys: int = 0  # user keys written to the destination
    merged: int = 0  # shared keys merged into the destination
    skipped: int = 0  # replace=False: keys the destination already had
    keys_verified: int = 0  # keys checked on the destination after writing
    bytes: int = 0  # payload bytes moved
    seconds: float = 0.0
    verified: bool = False
    deleted: int = 0

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
    if user_ids is None:
        return [k for k in scan(client, "*{?*}*") if hash_tag(k) is not None]
    ids = [str(u) for u in user_ids]
    for u in ids:
        _check_id(u)
    wanted = {u.encode() for u in ids}
    if len(ids) <= PER_USER_SCAN_MAX:
        found: list[bytes] = []
        for u in ids:
            found += [k for k in scan(client, user_pattern(u)) if hash_tag(k) == u.encode()]
        return found
    return [k for k in scan(client, "*{?*}*") if hash_tag(k) in wanted]


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

# ARGV: replace flag and the packed batch. Returns '1' per key written, '0' if kept.
_RESTORE = """
local replace = ARGV[1] == '1'
local blob = ARGV[2]
local pos = 1
local out = {}
for i, k in ipairs(KEYS) do
  local ttl, n, nxt = struct.unpack('>i8I4', blob, pos)
  pos = nxt + n
  if replace or redis.call('EXISTS', k) == 0 then
    redis.call('RESTORE', k, ttl, string.sub(blob, nxt, pos - 1), 'REPLACE')
    out[i] = '1'
  else
    out[i] = '0'
  end
end
return table.concat(out)
"""

# Verification on the destination itself: ARGV[1] holds the SHA-1 (hex) of each key's
# DUMP payload as read from the source; returns the (0-based, comma-separated) positions
# of the keys whose payload here differs or that are missing. Only those come back.
_CHECK = """
local want = ARGV[1]
local bad = {}
for i, k in ipairs(KEYS) do
  local p = redis.call('DUMP', k)
  if not p or redis.sha1hex(p) ~= string.sub(want, 40 * i - 39, 40 * i) then
    bad[#bad + 1] = i - 1
  end
end
return table.concat(bad, ',')
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
    """One script run over `keys` in batches; `args` makes a batch's ARGV, `keys_of` its
    KEYS (default: the batch itself)."""

    script: str
    keys: list[bytes]
    args: Callable[[list[bytes]], list[Any]]
    keys_of: Callable[[list[bytes]], list[bytes]] | None = None
    size: int = BATCH


def _exec(client: Client, jobs: list[_Job], side: str,
          flush: int = FLUSH) -> list[list[tuple[list[bytes], Any]]]:  # fmt: skip
    """Run the jobs' batches pipelined per master, a round trip per `flush` keys (not per
    batch: over an SSH port forward a round trip costs tens of milliseconds); the
    (batch, reply) pairs of each job, in the jobs' order.

    Scripts go as EVAL: a pipeline of registered scripts would first ask SCRIPT EXISTS,
    one more round trip each time; Redis caches the compiled body either way.
    """
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
                job = jobs[j]
                keys = batch if job.keys_of is None else job.keys_of(batch)
                pipe.execute_command("EVAL", job.script, len(keys), *keys, *job.args(batch))
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
    return _exec(client, [_Job(script, keys, args, size=size)], side)[0]


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


def _restore(client: Client, dumped: dict[bytes, tuple], replace: bool) -> list[bytes]:
    """RESTORE the dumped keys; the keys actually written."""
    pack = _HEADER.pack
    flag = "1" if replace else "0"

    def args(batch: list[bytes]) -> list[Any]:
        parts = []
        for k in batch:
            payload, ttl = dumped[k]
            parts += [pack(ttl, len(payload)), payload]
        return [flag, b"".join(parts)]

    written: list[bytes] = []
    for batch, flags in _run(client, list(dumped), _RESTORE, args, "destination"):
        written += [k for k, f in zip(batch, flags, strict=True) if f == 49]  # b"1"
    return written


def _positions(batch: list[bytes], reply: bytes) -> list[bytes]:
    return [batch[int(i)] for i in reply.split(b",") if i] if reply else []


def _scratch(key: bytes) -> bytes:
    """A scratch key in the slot of `key` (same hash tag)."""
    return b"__enorm_verify:{" + (hash_tag(key) or key) + b"}"


def _same_job(dumped: dict[bytes, tuple], keys: list[bytes]) -> _Job:
    def keys_of(batch: list[bytes]) -> list[bytes]:
        return [x for k in batch for x in (k, _scratch(k))]

    return _Job(_SAME, keys, lambda b: [dumped[k][0] for k in b], keys_of)


def _verify_dumps(client: Client, dumped: dict[bytes, tuple], keys: list[bytes]) -> int:
    """Check on the destination that every key in `keys` holds what was dumped.

    The destination compares the SHA-1 of its own DUMP payload with the source's, and
    answers only with the keys that differ; keys whose payload bytes depend on a hash
    table's order (and any key whose digest differs, e.g. across Redis versions) are
    compared by value there instead. One pipelined pass, plus one for digest misses.
    """
    sha1 = hashlib.sha1
    ordered: list[bytes] = []
    unordered: list[bytes] = []
    for k in keys:
        (unordered if dumped[k][0][0] in _UNORDERED else ordered).append(k)

    def digests(batch: list[bytes]) -> list[Any]:
        return [b"".join(sha1(dumped[k][0]).hexdigest().encode() for k in batch)]

    check, same = _exec(client, [_Job(_CHECK, ordered, digests),
                                 _same_job(dumped, unordered)], "destination")  # fmt: skip
    missed = [k for batch, reply in check for k in _positions(batch, reply)]
    bad = [k for batch, reply in same for k in _positions(batch, reply)]
    if missed:
        (again,) = _exec(client, [_same_job(dumped, missed)], "destination")
        bad += [k for batch, reply in again for k in _positions(batch, reply)]
    if bad:
        shown = ", ".join(k.decode(errors="replace") for k in bad[:5])
        raise VerificationFailed(
            f"{len(bad)} keys differ on the destination after the copy: {shown}", bad
        )
    return len(keys)


def copy_users(
    src: Client, dst: Client, user_ids: Iterable[str], *, replace: bool = True
) -> SyncReport:
    """Copy every key of `user_ids` from `src` to `dst`, then verify it on `dst`.

    With replace=False keys that `dst` already has are kept (and not verified).
    Raises DestinationUnreachable before touching anything if `dst` does not answer,
    VerificationFailed if `dst` does not hold what was read from `src`.
    """
    started = time.perf_counter()
    ids = list(dict.fromkeys(str(u) for u in user_ids))
    report = SyncReport(users=len(ids))
    ping(dst)
    with _Guard("source"):
        keys = user_keys(src, ids)
    _copy_keys(src, dst, keys, replace, report)
    report.verified = True
    report.seconds = time.perf_counter() - started
    return report


def _copy_keys(src: Client, dst: Client, keys: list[bytes], replace: bool, report: SyncReport):
    """Dump, restore, then verify. The source dumps chunk i+1 while the destination
    restores chunk i (two servers, two cores); verification reads back after all writes,
    so it also catches a key lost while later chunks were written (eviction)."""
    chunks = [keys[i : i + CHUNK] for i in range(0, len(keys), CHUNK)]
    dumped: dict[bytes, tuple[bytes, int]] = {}
    written: list[bytes] = []
    with ThreadPoolExecutor(1, thread_name_prefix="datasync-dump") as pool:
        ahead = pool.submit(_dump, src, chunks[0]) if chunks else None
        for i in range(len(chunks)):
            part = ahead.result()
            if i + 1 < len(chunks):
                ahead = pool.submit(_dump, src, chunks[i + 1])
            written += _restore(dst, part, replace)
            dumped.update(part)
    report.keys += len(written)
    report.skipped += len(dumped) - len(written)
    report.bytes += sum(len(dumped[k][0]) for k in written)
    report.keys_verified += _verify_dumps(dst, dumped, written)


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


def merge_back(
    edge: Client,
    cloud: Client,
    *,
    shared_patterns: Iterable[str] = (),
    user_ids: Iterable[str] | None = None,
) -> SyncReport:
    """Termination: bring the edge's data home to the cloud, verified, deleting nothing.

    User keys (every hash-tagged key on the edge, or those of `user_ids`) replace the
    cloud's stale copy; keys matching `shared_patterns` are merged by `merge_rule`.
    A key matching a shared pattern is treated as shared even if it has a hash tag.
    """
    started = time.perf_counter()
    report = SyncReport()
    patterns = list(shared_patterns)
    ping(cloud)
    with _Guard("source"):
        shared = list(dict.fromkeys(k for p in patterns for k in scan(edge, p)))
        ids = None if user_ids is None else [str(u) for u in user_ids]
        keys = user_keys(edge, ids)
    shared_set = set(shared)
    keys = [k for k in keys if k not in shared_set]
    report.users = len({hash_tag(k) for k in keys}) if ids is None else len(ids)
    _copy_keys(edge, cloud, keys, True, report)
    _merge_shared(edge, cloud, shared, report)
    report.verified = True
    report.seconds = time.perf_counter() - started
    return report
