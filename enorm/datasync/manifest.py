"""What a copy gave out. The manifest: a digest of each user key as it went out to the
edge, kept on the cloud, so that the merge at termination can tell what the edge deleted
and what the cloud changed meanwhile (a conflict). The shared record: each shared key
copied to the edge as it was then (digest and expiry), kept on the edge beside it, so
that the merge leaves alone what the edge did not change (a stale copy of a string must
not win over the cloud's newer value)."""

from __future__ import annotations

from .payloads import ABSENT, DIGEST_FN, NO_TTL
from .redis_types import UNORDERED
from .transport import FLUSH, Client, Guard, by_node, no_args, roundtrip, run_script

_DIGESTS = (
    DIGEST_FN
    + """
local out = {}
for i, k in ipairs(KEYS) do out[i] = digest(k) end
return table.concat(out)
"""
)
MANIFEST_TTL_S = 30 * 86400  # a server that never terminates leaves no manifest for ever
# On the edge: shared key -> its digest and absolute expiry (ms, the edge's clock; -1:
# none) when copied there. In the library's namespace, so never merged as data; the
# tenant could change it, and gain nothing it could not do to its shared keys directly.
SHARED_RECORD = b"enorm:shared-copy"
_SHARED_STATE = (
    DIGEST_FN
    + """
local out = {}
for i, k in ipairs(KEYS) do out[i] = digest(k) .. ':' .. redis.call('PEXPIRETIME', k) end
return out
"""
)


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
            out[key] = None if d == ABSENT else d
    return out


def write_manifest(client: Client, name: str, dumped: dict[bytes, tuple[bytes, int]], *,
                   fresh: bool = True) -> int:  # fmt: skip
    """Record on `client` (the cloud) the digest of each key of `dumped` (key -> the DUMP
    payload that was copied and its TTL, 0: none), marked `NO_TTL` for a key without a
    TTL: the merge at termination tells from it what the edge deleted, what the cloud
    changed meanwhile, and which keys the edge left exactly as they went out. `fresh`:
    replace an older manifest (else add to it: a copy writes it chunk by chunk, as it
    dumps)."""
    found: dict[bytes, bytes] = {}
    ask: list[bytes] = []
    for k, (payload, ttl) in dumped.items():
        if payload[0] in UNORDERED:
            ask.append(k)
        elif ttl:
            found[k] = payload[-8:].hex().encode()
        else:
            found[k] = payload[-8:].hex().encode() + NO_TTL
    for k, d in digests(client, ask, "source").items():
        if d is not None:
            found[k] = d if dumped[k][1] else d + NO_TTL
    fields = [x for item in found.items() for x in item]
    step = FLUSH // 5  # field-value pairs of FLUSH // 10 keys per HSET
    commands = [["DEL", name]] if fresh else []
    commands += [["HSET", name, *fields[i : i + step]] for i in range(0, len(fields), step)]
    commands.append(["EXPIRE", name, MANIFEST_TTL_S])
    with Guard("source"):
        ((node, _),) = by_node(client, [name.encode()]).items()
        roundtrip(node, commands)
    return len(found)


def copied_digest(entry: bytes) -> bytes:
    """The digest of a manifest's entry (as `digests` gives it), without its mark."""
    return entry[:16]


def move_manifest(client: Client, src: str, dst: str) -> int:
    """A handover between nodes: the new server inherits what the old one was given (the
    users' data went edge -> edge; the cloud still holds what was copied out at first).
    Returns how many keys it names (0: the old server had none)."""
    m = read_manifest(client, src)
    with Guard("destination"):
        pipe = client.pipeline(transaction=False)
        pipe.delete(dst)
        if m:
            pipe.hset(dst, mapping=m)
            pipe.expire(dst, MANIFEST_TTL_S)
        pipe.delete(src)
        pipe.execute()
    return len(m or {})


def drop_manifest(client: Client, name: str) -> None:
    """Remove a manifest (a copy that failed half-way leaves none behind)."""
    with Guard("source"):
        client.delete(name)


def read_manifest(client: Client, name: str) -> dict[bytes, bytes] | None:
    """The manifest `name` on the cloud, or None when there is none."""
    with Guard("destination"):
        m = client.hgetall(name)
    return m or None


def shared_states(client: Client, keys: list[bytes], side: str) -> dict[bytes, bytes]:
    """key -> its digest and absolute expiry now (the shared record's form)."""
    out: dict[bytes, bytes] = {}
    for batch, states in run_script(client, keys, _SHARED_STATE, no_args, side):
        out.update(zip(batch, states, strict=True))
    return out


def record_shared(edge: Client, keys: list[bytes]) -> None:
    """After a copy: the shared keys as the edge now holds them (`SHARED_RECORD`)."""
    states = shared_states(edge, keys, "destination")
    with Guard("destination"):
        pipe = edge.pipeline(transaction=False)
        pipe.delete(SHARED_RECORD)
        if states:
            pipe.hset(SHARED_RECORD, mapping=states)
        pipe.execute()


def shared_unchanged(edge: Client, keys: list[bytes]) -> set[bytes]:
    """Of the edge's shared `keys`, those still as they were copied (value and expiry)."""
    with Guard("source"):
        copied = edge.hgetall(SHARED_RECORD) if keys else {}
    if not copied:
        return set()
    asked = [k for k in keys if k in copied]
    return {k for k, st in shared_states(edge, asked, "source").items() if copied[k] == st}
