"""The copy's manifest: a digest of each key as it went out to the edge, kept on the cloud,
so that the merge at termination can tell what the edge deleted and what the cloud
changed meanwhile (a conflict)."""

from __future__ import annotations

from .payloads import ABSENT, DIGEST_FN, payload_digest
from .transport import FLUSH, Client, Guard, no_args, run_script

_DIGESTS = (
    DIGEST_FN
    + """
local out = {}
for i, k in ipairs(KEYS) do out[i] = digest(k) end
return table.concat(out)
"""
)
MANIFEST_TTL_S = 30 * 86400  # a server that never terminates leaves no manifest for ever


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


def write_manifest(client: Client, name: str, dumped: dict[bytes, bytes], *,
                   fresh: bool = True) -> int:  # fmt: skip
    """Record on `client` (the cloud) the digest of each key of `dumped` (key -> the DUMP
    payload that was copied): the merge at termination tells from it what the edge
    deleted and what the cloud changed meanwhile. `fresh`: replace an older manifest
    (else add to it: a copy writes it chunk by chunk, as it dumps)."""
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
        if fresh:
            pipe.delete(name)
        items = list(found.items())
        for i in range(0, len(items), FLUSH // 10):
            pipe.hset(name, mapping=dict(items[i : i + FLUSH // 10]))
        pipe.expire(name, MANIFEST_TTL_S)
        pipe.execute()
    return len(found)


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
