"""Moving keys as DUMP payloads: scripts that dump a batch (or a SCAN step) into one
packed reply, and restore a batch while reading each key back to verify it, byte for
byte, or by value where the bytes follow a hash table's order."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import redis

from .keys import SCAN_COUNT, hash_tag
from .redis_types import ELEMENTS_FN, SAME_FN, UNORDERED
from .report import VerificationFailed
from .transport import Client, Guard, Job, by_node, eval_command, no_args, run_jobs, run_script

# Scripts move a whole batch as one bulk string each way: per key a header
# (ttl: a double, length: 4 bytes, big-endian) and the DUMP payload. One reply per batch
# instead of one per key keeps the client's parsing out of the hot path. A double is
# Lua's own number, exact to 2^53 ms on every build; an 8-byte integer goes through the
# C long of Redis's build, so a 32-bit Redis (armhf boards) sent the PTTL -1 of a key
# without TTL as 4294967295, and the key came back expiring in 49.7 days.
_HEADER = struct.Struct(">dI")

# DUMP and PTTL of KEYS, packed; a key gone since the scan gets ttl -2 and no payload.
_DUMP = """
local out = {}
for i, k in ipairs(KEYS) do
  local p = redis.call('DUMP', k)
  if p then
    out[#out + 1] = struct.pack('>dI4', redis.call('PTTL', k), #p)
    out[#out + 1] = p
  else
    out[#out + 1] = struct.pack('>dI4', -2, 0)
  end
end
return table.concat(out)
"""

# One SCAN step that also dumps what it finds (standalone sources only: a cluster node
# refuses a script touching keys of several slots): per key its length, PTTL (a double),
# payload length (big-endian, 4 + 8 + 4 bytes), the key and the payload.
_SCAN_DUMP = """
local r = redis.call('SCAN', ARGV[1], 'MATCH', ARGV[2], 'COUNT', ARGV[3])
local out = {}
for _, k in ipairs(r[2]) do
  local p = redis.call('DUMP', k)
  if p then
    out[#out + 1] = struct.pack('>I4dI4', #k, redis.call('PTTL', k), #p) .. k
    out[#out + 1] = p
  end
end
return {r[1], table.concat(out)}
"""
_SCAN_HEADER = struct.Struct(">IdI")

# A digest of each key's value: the CRC-64 that ends its DUMP payload (16 hex digits),
# free for the copy, which dumps every key anyway. Values whose DUMP follows a hash
# table's order (`redis_types`: sets and hashes of that encoding), which a rehash may
# change without a write, get a SHA-1 of the RDB type and the sorted elements instead. A
# key that does not exist gets 16 dots.
DIGEST_FN = ELEMENTS_FN + """
local function digest(k)
  local p = redis.call('DUMP', k)
  if not p then return '................' end
  local t = string.byte(p, 1)
  local parts = elements(k, t)
  if not parts then
    return string.format(string.rep('%02x', 8), string.byte(p, #p - 7, #p))
  end
  table.sort(parts)
  return string.sub(redis.sha1hex(t .. table.concat(parts, '')), 1, 16)
end
"""

# ARGV: replace flag and the packed batch; at the merge, with the cloud's manifest of the
# copy, also per key the digest it had when copied out (ARGV[3], 16 dots: not copied)
# and '1' when the edge's value is still that one and has no TTL (ARGV[4]). Each key is
# RESTOREd, then read back (DUMP) and compared byte for byte with the payload it was
# given. Returns per key '1' (written, read back equal), 'x' (written, read back
# different: compared by value afterwards), '0' (replace=0 and the destination had the
# key: kept, not written), and with a manifest 'c' (the destination's value is no longer
# the one copied out: changed there meanwhile, not written; the caller decides, a
# conflict) or 's' (neither side changed it and neither has a TTL: already there, as its
# digest just showed; not written again).
_RESTORE = DIGEST_FN + """
local replace, blob, want, same = ARGV[1] == '1', ARGV[2], ARGV[3], ARGV[4]
local pos = 1
local out = {}
for i, k in ipairs(KEYS) do
  local ttl, n, nxt = struct.unpack('>dI4', blob, pos)
  pos = nxt + n
  if want and digest(k) ~= string.sub(want, 16 * i - 15, 16 * i) then
    out[i] = 'c'
  elseif want and string.byte(same, i) == 49 and redis.call('PTTL', k) == -1 then
    out[i] = 's'
  elseif replace or redis.call('EXISTS', k) == 0 then
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
# and compared with the key by value (`redis_types.SAME_FN`, by type); the scratch key is
# deleted in the same script, so nobody ever sees it. Returns the positions (0-based) of
# the keys that differ.
_SAME = SAME_FN + """
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

ABSENT = b"." * 16  # the digest of a key that does not exist


def payload_digest(payload: bytes) -> bytes | None:
    """The digest DIGEST_FN gives, from a DUMP payload; None for the hash-table types,
    whose digest needs the server."""
    if payload[0] in UNORDERED:
        return None
    return payload[-8:].hex().encode()



def dump(client: Client, keys: list[bytes], side: str = "source") -> dict[bytes, tuple]:
    """key -> (payload, ttl for RESTORE) for the keys that still exist."""
    dumped: dict[bytes, tuple[bytes, int]] = {}
    unpack = _HEADER.unpack_from
    width = _HEADER.size
    for batch, blob in run_script(client, keys, _DUMP, no_args, side):
        pos = 0
        for key in batch:
            pttl, n = unpack(blob, pos)
            pos += width
            if pttl != -2:
                dumped[key] = (blob[pos : pos + n], max(int(pttl), 0))
            pos += n
    return dumped


def scan_dump(client: redis.Redis, pattern: str, count: int = SCAN_COUNT,
               side: str = "source") -> Iterator[dict[bytes, tuple]]:  # fmt: skip
    """SCAN MATCH `pattern` and DUMP what it finds in the same script calls: key ->
    (payload, ttl) per SCAN step. One pass over a standalone server instead of a scan
    and then a dump."""
    unpack, width = _SCAN_HEADER.unpack_from, _SCAN_HEADER.size
    cursor: bytes | int = b"0"
    while True:
        with Guard(side):
            cursor, blob = client.execute_command("EVAL", _SCAN_DUMP, 0, cursor, pattern, count)
        part: dict[bytes, tuple[bytes, int]] = {}
        pos, end = 0, len(blob)
        while pos < end:
            nk, pttl, n = unpack(blob, pos)
            pos += width
            key = blob[pos : pos + nk]
            pos += nk
            part[key] = (blob[pos : pos + n], max(int(pttl), 0))
            pos += n
        yield part
        if cursor in (b"0", 0):
            return


def restore(client: Client, dumped: dict[bytes, tuple], replace: bool,
            expect: dict[bytes, bytes | None] | None = None,
            held: list[bytes] | None = None,
            same: list[bytes] | None = None) -> list[bytes]:  # fmt: skip
    """RESTORE the dumped keys and verify them on the destination; the keys written.

    With `expect` (key -> the digest the destination's value should still have, None:
    absent), a key whose value changed there is not written but added to `held`, and a
    key that is the same on both sides (the digest, no TTL) is not written again but
    counted as written and added to `same`, in the same script call.

    One pipelined pass per master: the RESTORE batches (each key read back and compared
    with its payload in the same script), then the by-value check of the keys whose
    payload bytes follow a hash table's order (sets, hashes); keys read back different
    for another reason (another Redis version) are compared by value in one more pass.
    Raises VerificationFailed if a written key differs.
    """
    pack = _HEADER.pack
    flag = "1" if replace else "0"
    keys = list(dumped)
    unordered = [k for k in keys if dumped[k][0][0] in UNORDERED]

    def restore_args(batch: list[bytes]) -> list[Any]:
        parts = []
        for k in batch:
            payload, ttl = dumped[k]
            parts += [pack(ttl, len(payload)), payload]
        if expect is None:
            return [flag, b"".join(parts)]
        want = [expect.get(k) or ABSENT for k in batch]
        unchanged = [b"1" if dumped[k][1] == 0 and payload_digest(dumped[k][0]) == w else b"0"
                     for k, w in zip(batch, want, strict=True)]  # fmt: skip
        return [flag, b"".join(parts), b"".join(want), b"".join(unchanged)]


    restored, compared = run_jobs(client, [
        Job(keys, eval_command(_RESTORE, restore_args)),
        _same_job(dumped, unordered),
    ], "destination")  # fmt: skip
    written: list[bytes] = []
    differ: list[bytes] = []
    for batch, flags in restored:
        for k, f in zip(batch, flags, strict=True):
            if f == 99:  # b"c": changed on the destination, held back
                if held is not None:
                    held.append(k)
            elif f == 115:  # b"s": the same on both sides already
                written.append(k)
                if same is not None:
                    same.append(k)
            elif f != 48:  # b"0": kept
                written.append(k)
                if f != 49:  # b"1": read back equal
                    differ.append(k)
    if differ:
        unequal = {k for b, r in compared for k in _positions(b, r)}
        checked = set(unordered)
        bad = [k for k in differ if k in unequal]
        again = [k for k in differ if k not in checked]
        if again:
            (second,) = run_jobs(client, [_same_job(dumped, again)], "destination")
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
    return b"enorm:verify:{" + (hash_tag(key) or key) + b"}"


def _same_job(dumped: dict[bytes, tuple], keys: list[bytes]) -> Job:
    def keys_of(batch: list[bytes]) -> list[bytes]:
        return [x for k in batch for x in (k, _scratch(k))]

    return Job(keys, eval_command(_SAME, lambda b: [dumped[k][0] for k in b], keys_of), 200)


def verify_present(client: Client, keys: list[bytes]) -> int:
    """After all writes: every key is still on the destination (none evicted or expired
    while later chunks were written). Raises VerificationFailed naming the missing."""
    (found,) = run_jobs(client, [Job(keys, lambda b: ["EXISTS", *b])], "destination")
    if sum(n for _, n in found) == len(keys):
        return len(keys)
    missing: list[bytes] = []
    with Guard("destination"):
        for batch, n in found:
            if n != len(batch):
                for node, ks in by_node(client, batch).items():
                    pipe = node.pipeline(transaction=False)
                    for k in ks:
                        pipe.exists(k)
                    missing += [k for k, e in zip(ks, pipe.execute(), strict=True) if not e]
    raise VerificationFailed(
        f"{len(missing)} keys are missing on the destination after the copy: "
        + ", ".join(k.decode(errors="replace") for k in missing[:5]),
        missing,
    )
