"""Moving keys as DUMP payloads: scripts that dump a batch (or a SCAN step) into one
flat reply, and restore a batch (RESTORE checks each payload); the check after the last
write that every key is still there."""

from __future__ import annotations

from binascii import unhexlify
from collections.abc import Iterator, Mapping
from typing import Any

import redis

from .keys import SCAN_COUNT
from .redis_types import ELEMENTS_FN, UNORDERED
from .report import VerificationFailed
from .transport import Client, Guard, Job, by_node, eval_command, no_args, run_jobs, run_script

# Scripts move a batch as one flat array each way (per key its PTTL and payload), which
# the hiredis parser reads in C; a packed string cost the script a struct.pack per key
# and a copy of the whole batch (table.concat), and the restore a string.sub per key.
# A PTTL travels as Redis's own integer (a reply, RESTORE's argument: 64 bits on every
# build); an 8-byte integer of Lua's struct went through the C long of Redis's build, so
# a 32-bit Redis (armhf boards) sent the PTTL -1 of a key without TTL as 4294967295, and
# the key came back expiring in 49.7 days.

# TTL (RESTORE's: ms, 0 for none) and DUMP of KEYS; a key gone since the scan gets an
# empty payload.
_DUMP = """
local out = {}
for i, k in ipairs(KEYS) do
  local t = redis.call('PTTL', k)
  out[2 * i - 1] = t > 0 and t or 0
  out[2 * i] = redis.call('DUMP', k) or ''
end
return out
"""

# One SCAN step that also dumps what it finds (standalone sources only: a cluster node
# refuses a script touching keys of several slots): per key its name, TTL (as _DUMP's)
# and payload. @TABLE@ and @DIG@: what `_SCAN_DUMP_DIGEST` adds to the same step.
_SCAN_STEP = """
local r = redis.call('SCAN', ARGV[1], 'MATCH', ARGV[2], 'COUNT', ARGV[3])
local out, n, dig, m = {}, 0, {}, 0
for _, k in ipairs(r[2]) do
  local p = redis.call('DUMP', k)
  if p then
    local t = redis.call('PTTL', k)
    out[n + 1], out[n + 2], out[n + 3] = k, t > 0 and t or 0, p
    n = n + 3
@TABLE@
  end
end
return {r[1], out@DIG@}
"""
_SCAN_DUMP = _SCAN_STEP.replace("@TABLE@\n", "").replace("@DIG@", "")

# A digest of each key's value: the CRC-64 that ends its DUMP payload, free for the
# copy, which dumps every key anyway. Values whose DUMP follows a hash table's order
# (`redis_types`: sets and hashes of that encoding), which a rehash may change without a
# write, get the first 8 bytes of a SHA-1 of the RDB type and the sorted elements
# instead. `raw_digest` gives the 8 bytes (nil: no key), which the merge compares as
# they are; `digest` 16 hex digits, 16 dots for a key that does not exist (manifests).
DIGEST_FN = ELEMENTS_FN + f"""
local unordered = {{{", ".join(f"[{t}] = true" for t in sorted(UNORDERED))}}}
local function sorted_hex(k, t)
  local parts = elements(k, t)
  table.sort(parts)
  return string.sub(redis.sha1hex(t .. table.concat(parts, '')), 1, 16)
end
local function sorted_digest(k, t)
  return (string.gsub(sorted_hex(k, t), '..', function(h) return string.char(tonumber(h, 16)) end))
end
local function raw_digest(k)
  local p = redis.call('DUMP', k)
  if not p then return nil end
  local t = string.byte(p, 1)
  if not unordered[t] then return string.sub(p, -8) end
  return sorted_digest(k, t)
end
local function digest(k)
  local d = raw_digest(k)
  if not d then return '................' end
  return string.format(string.rep('%02x', 8), string.byte(d, 1, 8))
end
"""

# On the edge: hash table -> the CRC that ended its DUMP right after a copy with a
# manifest wrote it (in the same script as its RESTORE). At the merge the edge's scan
# compares its DUMP with it: the same bytes are the value copied out, so the table needs
# no digest (a sort and SHA-1 of every element); other bytes (a write, or only a rehash
# that changed the order) and the digest is taken. In the library's namespace, so never
# merged as data; the tenant could change it, and gain nothing it could not do to its
# own keys directly (a forged match drops its own write); a record that is not a hash
# is no record (`redis.pcall`: every table digested), not a failed copy or merge.
COPIED_TABLES = b"enorm:copied-tables"

# ARGV: replace flag ('1', '0'; 'r': replace and record each hash table written in
# `COPIED_TABLES`); at the merge, with the cloud's manifest of the copy, per key the
# digest it had when copied out (ARGV[2], 8 bytes each, as `raw_digest`) and a mark
# (ARGV[3]): 'n' not copied out (the cloud should not have it), '1' the edge left the
# value as copied out (its payload's digest is the manifest's), '0' otherwise; both
# empty without a manifest; then per key its TTL (ms, 0: none) and its payload (ARGV[2 +
# 2i], ARGV[3 + 2i]; empty for a key marked '1': never written).
# RESTORE is the check of what it writes: it refuses a payload whose RDB version or
# CRC-64 is wrong, or that does not decode, and otherwise writes the whole value, within
# this atomic script, so nobody changes the key between the two. A DUMP of it right
# after would only test Redis's own encoder against its decoder. Returns per key
# '1' (written), '0' (replace=0 and the destination had the key: kept, not written),
# and with a manifest:
# - for a key marked '1': 'u' (untouched: the cloud's value stands, whatever the cloud
#   did meanwhile), or '1' when the cloud still holds the value copied out and only the
#   edge's TTL is written (set or removed). One without a TTL on either side, or that
#   the cloud deleted, is untouched unlooked at (one PTTL): nothing would be written
#   either way; one with a TTL on either side is digested (no digest: the cloud deleted
#   it): only an unchanged value takes the edge's. (A key that went out without a TTL
#   and that the edge left so is not sent at all: `as_copied`.)
# - for the others, 'c' when the cloud's value is no longer the one copied out, or the
#   cloud has a key that was not copied out: not written, the caller decides (a conflict
#   if the edge changed it too).
# A payload RESTORE refuses fails the script: a SyncError with Redis's reason.
_RESTORE = DIGEST_FN + """
local replace, record, want, mark = ARGV[1] ~= '0', ARGV[1] == 'r', ARGV[2], ARGV[3]
local out = {}
local function changed(k, i) return raw_digest(k) ~= string.sub(want, 8 * i - 7, 8 * i) end
for i, k in ipairs(KEYS) do
  local m = want ~= '' and string.byte(mark, i) or 0
  if m == 49 then
    local ttl = tonumber(ARGV[2 * i + 2])
    if (ttl == 0 and redis.call('PTTL', k) < 0) or changed(k, i) then
      out[i] = 'u'
    elseif ttl > 0 then
      redis.call('PEXPIRE', k, ttl)
      out[i] = '1'
    else
      redis.call('PERSIST', k)
      out[i] = '1'
    end
  elseif (m == 110 and redis.call('EXISTS', k) == 1) or (m == 48 and changed(k, i)) then
    out[i] = 'c'
  elseif replace or redis.call('EXISTS', k) == 0 then
    redis.call('RESTORE', k, ARGV[2 * i + 2], ARGV[2 * i + 3], 'REPLACE')
    if record and unordered[string.byte(ARGV[2 * i + 3], 1)] then
      redis.pcall('HSET', '@TABLES@', k, string.sub(redis.call('DUMP', k), -8))
    end
    out[i] = '1'
  else
    out[i] = '0'
  end
end
return table.concat(out)
""".replace("@TABLES@", COPIED_TABLES.decode())

# `_SCAN_DUMP` for a merge: also the digest of each hash table dumped (16 hex digits, as
# a manifest holds it), which the node cannot take from the payload, so that it tells
# one the edge left as copied out without sending it: {cursor, the triples, {key,
# digest, ...}}; '=' for the digest of a table whose DUMP is the one `COPIED_TABLES`
# recorded (the value copied out: the manifest's digest).
_SCAN_DUMP_DIGEST = DIGEST_FN + _SCAN_STEP.replace("@TABLE@", """\
    local rdb = string.byte(p, 1)
    if unordered[rdb] then
      local same = redis.pcall('HGET', '@TABLES@', k) == string.sub(p, -8)
      dig[m + 1], dig[m + 2] = k, same and '=' or sorted_hex(k, rdb)
      m = m + 2
    end""").replace("@DIG@", ", dig").replace("@TABLES@", COPIED_TABLES.decode())

ABSENT = b"." * 16  # the digest of a key that does not exist
NOT_COPIED = b"0" * 16  # a manifest's slot for a key it does not name (marked 'n')
# A manifest's entry is the key's digest (16 hex digits, as `digest` gives it), followed
# by this mark when the key went out without a TTL (`manifest.write_manifest`). An entry
# without it (a key with a TTL, or a manifest written before the mark) says nothing of
# the TTL.
NO_TTL = b"p"
SAME = b"="  # `_SCAN_DUMP_DIGEST`'s digest of a table as copied out


def as_copied(dumped: dict[bytes, tuple], expect: Mapping[bytes, bytes],
              untouched: list[bytes] | None,
              digested: Mapping[bytes, bytes] | None = None) -> list[bytes]:  # fmt: skip
    """The keys of `dumped` the destination must see at a merge; the others go to
    `untouched`: those that went out without a TTL (`NO_TTL`) and that the source left
    exactly so (the same digest, still no TTL). Nothing would be written for them
    whatever the destination did meanwhile (its value, delete or TTL stands), so they
    cost it no call. A hash table's digest is not in its payload: it is taken from
    `digested` (the source's, `scan_dump`), and without one the key is sent."""
    send: list[bytes] = []
    left = (untouched if untouched is not None else []).append
    other = digested or {}
    for k, (payload, ttl) in dumped.items():
        w = expect.get(k)
        if ttl or w is None or w[16:] != NO_TTL:
            send.append(k)
            continue
        d = other.get(k) if payload[0] in UNORDERED else payload[-8:].hex().encode()
        if d == w[:16] or d == SAME:
            left(k)
        else:
            send.append(k)
    return send



def dump(client: Client, keys: list[bytes], side: str = "source") -> dict[bytes, tuple]:
    """key -> (payload, ttl for RESTORE) for the keys that still exist."""
    dumped: dict[bytes, tuple[bytes, int]] = {}
    for batch, flat in run_script(client, keys, _DUMP, no_args, side):
        it = iter(flat)
        dumped.update((key, (payload, ttl))
                      for key, ttl, payload in zip(batch, it, it, strict=True) if payload)
    return dumped


def scan_dump(client: redis.Redis, pattern: str, count: int = SCAN_COUNT, side: str = "source",
              digested: dict[bytes, bytes] | None = None,
              ) -> Iterator[dict[bytes, tuple]]:  # fmt: skip
    """SCAN MATCH `pattern` and DUMP what it finds in the same script calls: key ->
    (payload, ttl) per SCAN step. One pass over a standalone server instead of a scan
    and then a dump. With `digested`, the digest of each hash table dumped goes there
    (key -> 16 hex digits, as a manifest holds it)."""
    cursor: bytes | int = b"0"
    script = _SCAN_DUMP if digested is None else _SCAN_DUMP_DIGEST
    while True:
        with Guard(side):
            cursor, flat, *more = client.execute_command("EVAL", script, 0, cursor, pattern,
                                                         count)  # fmt: skip
        if more and more[0]:
            digested.update(zip(more[0][::2], more[0][1::2], strict=True))  # type: ignore[union-attr]
        yield dict(zip(flat[::3], zip(flat[2::3], flat[1::3], strict=True), strict=True))
        if cursor in (b"0", 0):
            return


def restore(client: Client, dumped: dict[bytes, tuple], replace: bool,
            expect: Mapping[bytes, bytes] | None = None,
            held: list[bytes] | None = None,
            untouched: list[bytes] | None = None,
            digested: Mapping[bytes, bytes] | None = None,
            record: bool = False) -> list[bytes]:  # fmt: skip
    """RESTORE the dumped keys on the destination; the keys written. With `record` (a
    copy with a manifest, to a standalone server) each hash table written is recorded
    in `COPIED_TABLES` by the script that restores it.

    With `expect` (the manifest: key -> the digest the destination's value had when
    copied out and the `NO_TTL` mark; a key it lacks was not copied out), a key the
    source left as copied out is not sent: one that went out and stayed without a TTL
    goes to `untouched` without a call (`as_copied`); for another the destination takes
    only the source's TTL, if its value is still the one copied out, else the key goes
    to `untouched` (as does one without a TTL on either side, looked at by one PTTL:
    its value stands either way); another key whose value the destination changed since
    the copy is not written but added to `held`; all in the same script call. A hash
    table's digest, which its payload does not give, comes from `digested` (the
    source's, as `scan_dump` gives it); without it such a key is sent.

    One pipelined pass per master. RESTORE checks each payload (RDB version, CRC-64)
    and writes the whole value or refuses it: a refusal raises SyncError with Redis's
    reason. That the keys are still there after the last write is `verify_present`'s.
    """
    flag = (b"r" if record else b"1") if replace else b"0"
    keys = list(dumped) if expect is None else as_copied(dumped, expect, untouched, digested)
    other = digested or {}

    def restore_args(batch: list[bytes]) -> list[Any]:
        if expect is None:
            args: list[Any] = [flag, b"", b""]
            for k in batch:
                payload, ttl = dumped[k]
                args += (ttl, payload)
            return args
        want = [expect.get(k) for k in batch]
        raw = unhexlify(b"".join((w or NOT_COPIED)[:16] for w in want))
        args = [flag, raw, b""]
        marks = bytearray(len(batch))
        for i, (k, w) in enumerate(zip(batch, want, strict=True)):
            payload, ttl = dumped[k]
            if w is None:
                marks[i] = 110  # 'n'
            elif (other.get(k) in (w[:16], SAME) if payload[0] in UNORDERED
                  else payload[-8:] == raw[8 * i : 8 * i + 8]):  # fmt: skip
                marks[i] = 49  # '1': left as copied out, never written
                payload = b""
            else:
                marks[i] = 48  # '0'
            args += (ttl, payload)
        args[2] = bytes(marks)
        return args

    (restored,) = run_jobs(client, [Job(keys, eval_command(_RESTORE, restore_args))],
                           "destination")  # fmt: skip
    written: list[bytes] = []
    for batch, flags in restored:
        for k, f in zip(batch, flags, strict=True):
            if f == 49:  # b"1": written (b"0": kept)
                written.append(k)
            elif f == 99:  # b"c": changed on both sides, held back
                if held is not None:
                    held.append(k)
            elif f == 117 and untouched is not None:  # b"u": the destination's stands
                untouched.append(k)
    return written


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
