"""The copy's manifest: a digest of each key as it went out to the edge, kept on the cloud,
so that the merge at termination can tell what the edge deleted and what the cloud
changed meanwhile (a conflict)."""

from __future__ import annotations

from .payloads import UNORDERED
from .transport import FLUSH, Client, Guard, no_args, run_script

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
_DIGESTS = (
    _DIGEST_FN
    + """
local out = {}
for i, k in ipairs(KEYS) do out[i] = digest(k) end
return table.concat(out)
"""
)
_ABSENT = b"." * 16
MANIFEST_TTL_S = 30 * 86400  # a server that never terminates leaves no manifest for ever


def payload_digest(payload: bytes) -> bytes | None:
    """The digest `_DIGESTS` gives, from a DUMP payload; None for the hash-table types,
    whose digest needs the server."""
    if payload[0] in UNORDERED:
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
    for batch, blob in run_script(client, keys, _DIGESTS, no_args, side):
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
    with Guard("source"):
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
    with Guard("destination"):
        m = client.hgetall(name)
    return m or None
