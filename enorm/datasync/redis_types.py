"""The Redis types datasync knows, one row each (`TYPES`), and the Lua built from them.

A row says, for one type: how a whole value is read (redis-py, queued on a pipeline),
how the merge writes the edge's value into the cloud's (the union, as commands), the
merge rule itself and its check (pure: what the cloud holds after a merge), the bytes a
value counts for, what an index key of the type names (its members or fields:
`KeySchema` families), and, for the types whose DUMP follows a hash table's order, the
elements a digest sorts. `rules`, `merge`, `payloads` (the digest) and `keys` (the index
members) take all of it from here, so a new type is one row (and its tests).

A type without a row (a module's) still moves as a user's key: DUMP/RESTORE copy any
value as bytes, RESTORE checking the payload. The table says what else can be done with
it: merged as a shared key (a shared key of a type without a row is not merged: counted
and sampled as `not_merged`), used as an index.

A shared key's TTL after the merge (`ttl`): a value the edge's wins whole (a string)
keeps the edge's TTL, or none; a union (every other type) lives as long as the
longer-lived side wanted: the later of the two expiries, none if either side has none,
the edge's if the cloud had no such key.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Pipe = Any  # a redis-py pipeline (standalone or one master's)

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


@dataclass(frozen=True)
class RedisType:
    name: bytes  # what TYPE answers
    # Queue a read of the whole value; the reply is the value the functions below take.
    read: Callable[[Pipe, bytes], Any]
    # Queue the merge's write of the edge's value into the cloud's key (the union).
    write: Callable[[Pipe, bytes, Any], Any]
    # The value the cloud holds after `edge` is merged into `cloud` (both present).
    merge: Callable[[Any, Any], Any]
    # True when `cloud` holds all of `edge` under the merge rule.
    contains: Callable[[Any, Any], bool]
    # The bytes a value counts for in a report.
    size: Callable[[Any], int]
    # Lua: the members an index key of this type names (None: not an index type).
    members: str | None = None
    # The RDB type of the encoding whose DUMP follows a hash table's order, and the Lua
    # that lists its elements into `parts` for a digest (None: DUMP is deterministic).
    hashtable: tuple[int, str] | None = None
    # A shared key's TTL after the merge: "edge" (the edge's value wins, with its TTL) or
    # "later" (a union: the later expiry; none if either side has none).
    ttl: str = "later"
    # What the merge's write answered, as report counters (e.g. stream entries renumbered).
    tally: Callable[[Any], dict[str, int]] | None = None


def _list_merge(cloud: list, edge: list) -> list:
    have = Counter(cloud)
    extra = []
    for item in edge:
        if have[item] > 0:
            have[item] -= 1
        else:
            extra.append(item)
    return list(cloud) + extra


def _zset_merge(cloud: list, edge: list) -> dict:
    merged = dict(cloud)
    for member, score in dict(edge).items():
        merged[member] = max(score, merged.get(member, score))
    return merged


def _zset_contains(cloud: Any, edge: list) -> bool:
    c = dict(cloud)
    return all(m in c and c[m] >= s for m, s in edge)


# -- streams ---------------------------------------------------------------------------
# A shared stream is merged by appending the entries the edge added since the copy: those
# above the newest edge entry the cloud holds as it is (what was copied out, or merged
# before), in the edge's order. Such an entry keeps its ID when it is above the cloud's
# last ID; otherwise (the cloud's stream moved past it meanwhile) it takes the first ID
# above that one (its time stays near its own, and the edge's later entries can keep
# theirs) and carries its edge ID in a last field `enorm:edge-id`, by which a merge
# retried finds it there.
STREAM_MARK = b"enorm:edge-id"

_XRANGE = "return redis.call('XRANGE', KEYS[1], '-', '+')"

# KEYS[1]: the cloud's stream; ARGV: the edge's entries in ID order, each as its ID, its
# number of fields and values, then those (as XRANGE gives them). Returns {kept, renumbered}.
_STREAM_MERGE = """
local k, mark = KEYS[1], '""" + STREAM_MARK.decode() + """'
local function less(a, b)  -- stream ID a < b, exactly (digit strings, no overflow)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  if am ~= bm then
    if #am ~= #bm then return #am < #bm end
    return am < bm
  end
  if #as ~= #bs then return #as < #bs end
  return as < bs
end
local function same(a, b)
  if #a ~= #b then return false end
  for j = 1, #a do if a[j] ~= b[j] then return false end end
  return true
end
local entries, i = {}, 1
while i <= #ARGV do
  local n = tonumber(ARGV[i + 1])
  local f = {}
  for j = 1, n do f[j] = ARGV[i + 1 + j] end
  entries[#entries + 1] = {ARGV[i], f}
  i = i + 2 + n
end
local from, top, marked = 1, '0-0', {}
if redis.call('EXISTS', k) == 1 then
  for e = #entries, 1, -1 do
    local got = redis.call('XRANGE', k, entries[e][1], entries[e][1])
    if #got == 1 and same(got[1][2], entries[e][2]) then from = e + 1; break end
  end
  if from <= #entries then
    for _, c in ipairs(redis.call('XRANGE', k, '(' .. entries[from][1], '+')) do
      local f = c[2]
      if #f >= 2 and f[#f - 1] == mark then marked[f[#f]] = true end
    end
  end
  local info = redis.call('XINFO', 'STREAM', k)
  for j = 1, #info, 2 do if info[j] == 'last-generated-id' then top = info[j + 1] end end
end
local kept, renumbered = 0, 0
for e = from, #entries do
  local id, f = entries[e][1], entries[e][2]
  if not marked[id] then
    if less(top, id) then
      redis.call('XADD', k, id, unpack(f))
      top, kept = id, kept + 1
    else  -- the first ID above the top (near its own time; the clock's past 2^52)
      local ms, seq = string.match(top, '^(%d+)-(%d+)$')
      local nxt = '*'
      if tonumber(seq) < 2 ^ 52 then nxt = ms .. '-' .. string.format('%d', seq + 1) end
      f[#f + 1] = mark
      f[#f + 1] = id
      top, renumbered = redis.call('XADD', k, nxt, unpack(f)), renumbered + 1
    end
  end
end
return {kept, renumbered}
"""


def _entries(v: Any) -> list[tuple[bytes, tuple[bytes, ...]]]:
    """A stream as XRANGE gives it: (ID, fields and values) per entry."""
    return [(bytes(e[0]), tuple(e[1])) for e in v]


def _id(i: bytes) -> tuple[int, int]:
    ms, _, seq = i.partition(b"-")
    return int(ms), int(seq)


def _stream_new(cloud: list, edge: list) -> tuple[list, dict, set]:
    """The edge's entries added since the copy (above the newest one the cloud holds as
    it is), the cloud's entries by ID, and the edge IDs of entries a merge renumbered."""
    have = dict(cloud)
    start = next((i + 1 for i in range(len(edge) - 1, -1, -1)
                  if have.get(edge[i][0]) == edge[i][1]), 0)
    marked = {f[-1]: f[:-2] for _, f in cloud if len(f) >= 2 and f[-2] == STREAM_MARK}
    return edge[start:], have, marked


def _stream_merge(cloud: Any, edge: Any) -> list:
    c, e = _entries(cloud), _entries(edge)
    new, _, marked = _stream_new(c, e)
    top = max((_id(i) for i, _ in c), default=(0, 0))
    out = list(c)
    for i, f in new:
        if i in marked:
            continue
        if _id(i) > top:
            top = _id(i)
            out.append((i, f))
        else:  # the first ID above the top
            top = (top[0], top[1] + 1)
            out.append((b"%d-%d" % top, (*f, STREAM_MARK, i)))
    return out


def _stream_contains(cloud: Any, edge: Any) -> bool:
    new, have, marked = _stream_new(_entries(cloud), _entries(edge))
    return all(have.get(i) == f or marked.get(i) == f for i, f in new)


def _stream_args(v: Any) -> list[bytes | int]:
    out: list[bytes | int] = []
    for i, f in _entries(v):
        out += [i, len(f), *f]
    return out


TYPES: dict[bytes, RedisType] = {t.name: t for t in (
    RedisType(
        name=b"string",
        read=lambda p, k: p.get(k),
        write=lambda p, k, v: p.set(k, v),
        merge=lambda cloud, edge: edge,  # the edge wins
        contains=lambda cloud, edge: cloud == edge,
        size=len,
        ttl="edge",
    ),
    RedisType(
        name=b"set",
        read=lambda p, k: p.smembers(k),
        write=lambda p, k, v: v and p.sadd(k, *v),
        merge=lambda cloud, edge: set(cloud) | set(edge),  # union of members
        contains=lambda cloud, edge: set(edge) <= set(cloud),
        size=lambda v: sum(len(m) for m in v),
        members="redis.call('SMEMBERS', k)",
        hashtable=(2, """
    for _, m in ipairs(redis.call('SMEMBERS', k)) do parts[#parts + 1] = lp(m) end"""),
    ),
    RedisType(
        name=b"hash",
        read=lambda p, k: p.hgetall(k),
        write=lambda p, k, v: v and p.hset(k, mapping=v),
        # union of fields; a field on both sides takes the edge's value
        merge=lambda cloud, edge: {**cloud, **edge},
        contains=lambda cloud, edge: all(cloud.get(f) == v for f, v in edge.items()),
        size=lambda v: sum(len(f) + len(x) for f, x in v.items()),
        members="redis.call('HKEYS', k)",
        hashtable=(4, """
    local kv = redis.call('HGETALL', k)
    for j = 1, #kv, 2 do parts[#parts + 1] = lp(kv[j]) .. lp(kv[j + 1]) end"""),
    ),
    RedisType(
        name=b"zset",
        read=lambda p, k: p.zrange(k, 0, -1, withscores=True),
        write=lambda p, k, v: v and p.zadd(k, dict(v), gt=True),
        merge=_zset_merge,  # union of members; one on both sides keeps the higher score
        contains=_zset_contains,
        size=lambda v: sum(len(m) + 8 for m, _ in v),
        members="redis.call('ZRANGE', k, 0, -1)",
    ),
    RedisType(
        name=b"list",
        read=lambda p, k: p.lrange(k, 0, -1),
        write=lambda p, k, v: v and p.eval(_LIST_MERGE, 1, k, *v),
        # the cloud's list, then the edge's items the cloud lacks (multiset difference)
        merge=_list_merge,
        contains=lambda cloud, edge: not (Counter(edge) - Counter(cloud)),
        size=lambda v: sum(len(x) for x in v),
        members="redis.call('LRANGE', k, 0, -1)",
    ),
    RedisType(
        name=b"stream",
        read=lambda p, k: p.eval(_XRANGE, 1, k),
        write=lambda p, k, v: v and p.eval(_STREAM_MERGE, 1, k, *_stream_args(v)),
        # the cloud's entries, then the edge's added since the copy (above)
        merge=_stream_merge,
        contains=_stream_contains,
        size=lambda v: sum(len(i) + sum(len(x) for x in f) for i, f in _entries(v)),
        tally=lambda reply: {"renumbered": int(reply[1])},
    ),
)}


# -- the Lua the scripts are built from ---------------------------------------------------
def _chain(var: str, arms: dict[str, str], otherwise: str | None = None) -> str:
    """A Lua if/elseif chain: `var == cond` -> body."""
    parts = [f"{'if' if i == 0 else 'elseif'} {var} == {cond} then\n    {body.strip()}"
             for i, (cond, body) in enumerate(arms.items())]
    if otherwise is not None:
        parts.append(f"else\n    {otherwise}")
    return "\n  ".join(parts) + "\n  end"


# members(k): what index key `k` names (its members or fields), whatever its type.
MEMBERS_FN = f"""
local function members(k)
  local t = redis.call('TYPE', k)['ok']
  {_chain("t", {f"'{t.name.decode()}'": f"return {t.members}"
                for t in TYPES.values() if t.members})}
  return {{}}
end
"""

# elements(k, t): for a value whose DUMP (RDB type `t`) follows a hash table's order, its
# elements, length-prefixed, for a digest to sort; nil for any other.
ELEMENTS_FN = f"""
local function lp(x) return struct.pack('>I4', #x) .. x end
local function elements(k, t)
  local parts = {{}}
  {_chain("t", {str(t.hashtable[0]): t.hashtable[1] for t in TYPES.values() if t.hashtable},
          "return nil")}
  return parts
end
"""

# RDB types of the payloads whose bytes follow a hash table's order.
UNORDERED = frozenset(t.hashtable[0] for t in TYPES.values() if t.hashtable)
