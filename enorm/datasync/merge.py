"""Termination: the edge's data merged back into the cloud, verified; only the served
users' keys, deletes and conflicts told from the copy's manifest; the shared keys by
their type's rule and TTL; everything else on the edge counted and sampled, never
silently dropped."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import redis

from . import payloads
from .copy import CHUNK, FIRST_CHUNK, copy_chunks, unlink
from .keys import LIBRARY_PREFIX, hash_tag, is_library, scan
from .manifest import SHARED_RECORD, copied_digest, digests, read_manifest, shared_unchanged
from .payloads import dump, scan_dump
from .redis_types import TYPES
from .report import SyncReport, VerificationFailed
from .rules import contains, matcher, matches
from .transport import BATCH, Client, Guard, by_node, is_cluster, ping

# Before a shared key is merged: a key of another type on the cloud is replaced by the
# edge's (deleted here); the cloud's PTTL is returned (-2: no key), for the TTL rule.
_PREPARE = """
local t = redis.call('TYPE', KEYS[1]).ok
if t ~= 'none' and t ~= ARGV[1] then redis.call('DEL', KEYS[1]) end
return redis.call('PTTL', KEYS[1])
"""

# After a shared key is merged: its expiry by its type's rule (`redis_types`). ARGV: the
# rule ('edge' | 'later'), the edge's PTTL (-1: none), the cloud's before the merge (-2:
# no key, -1: none). Returns 1 when the expiry was set or removed.
_EXPIRE = """
local k, rule, e, c0 = KEYS[1], ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local c = redis.call('PTTL', k)
if c == -2 then return 0 end
if e < 0 then
  if c >= 0 and (rule == 'edge' or c0 ~= -1) then redis.call('PERSIST', k); return 1 end
  return (rule == 'edge' and c0 >= 0) and 1 or 0
end
if rule == 'edge' or c0 == -2 then
  if c == -1 or c < e then redis.call('PEXPIRE', k, e); return 1 end
  return 0
end
if c >= 0 and c < e then redis.call('PEXPIRE', k, e); return 1 end
return 0
"""


def read_typed(client: Client, keys: list[bytes], side: str) -> dict[bytes, tuple[bytes, Any]]:
    """key -> (type, value) for the keys of a type the table knows that exist."""
    return {k: (t, v) for k, (t, v, _) in _read(client, keys, side).items() if t in TYPES}


def _read(client: Client, keys: list[bytes], side: str,
          ttl: bool = False) -> dict[bytes, tuple[bytes, Any, int]]:  # fmt: skip
    """key -> (type, value, PTTL if `ttl`) for the keys that exist; the value is None for
    a type the table does not know."""
    out: dict[bytes, tuple[bytes, Any, int]] = {}
    with Guard(side):
        for node, ks in by_node(client, keys).items():
            for i in range(0, len(ks), BATCH):
                chunk = ks[i : i + BATCH]
                pipe = node.pipeline(transaction=False)
                for k in chunk:
                    pipe.type(k)
                types = pipe.execute()
                pipe = node.pipeline(transaction=False)
                kept = [(k, t) for k, t in zip(chunk, types, strict=True) if t != b"none"]
                for k, t in kept:
                    if t in TYPES:
                        TYPES[t].read(pipe, k)
                    else:
                        pipe.exists(k)
                    if ttl:
                        pipe.pttl(k)
                replies = iter(pipe.execute())
                for k, t in kept:
                    v = next(replies)
                    out[k] = (t, v if t in TYPES else None, next(replies) if ttl else -1)
    return out


def _merge_shared(edge: Client, cloud: Client, keys: list[bytes], report: SyncReport) -> None:
    """The shared keys into the cloud, each by its type's rule (`redis_types`) and TTL;
    those the edge left as they were copied are not merged again, those of a type
    without a rule are counted and sampled (`not_merged`)."""
    same = shared_unchanged(edge, keys)
    report.shared_unchanged += len(same)
    values = _read(edge, [k for k in keys if k not in same], "source", ttl=True)
    for k, (typ, _, _) in values.items():
        if typ not in TYPES:
            report.not_merged += 1
            _sample(report.not_merged_sample, k)
    values = {k: v for k, v in values.items() if v[0] in TYPES}
    with Guard("destination"):
        before: dict[bytes, int] = {}
        for node, ks in by_node(cloud, list(values)).items():
            pipe = node.pipeline(transaction=False)
            for k in ks:
                pipe.eval(_PREPARE, 1, k, values[k][0])
            before.update(zip(ks, pipe.execute(), strict=True))
        after: dict[bytes, Any] = {}
        for node, ks in by_node(cloud, list(values)).items():
            pipe = node.pipeline(transaction=False)
            reads: list[tuple[bytes, int, int | None, int]] = []
            for k in ks:
                typ, value, pttl = values[k]
                row = TYPES[typ]
                wrote = len(pipe)
                row.write(pipe, k, value)
                wrote = wrote if len(pipe) > wrote else None
                pipe.eval(_EXPIRE, 1, k, row.ttl, pttl, before[k])
                report.bytes += row.size(value)
                # read back in the same round trip: the verification below
                reads.append((k, len(pipe), wrote, len(pipe) - 1))
                row.read(pipe, k)
            replies = pipe.execute(raise_on_error=False)
            for k, i, wrote, expired in reads:
                after[k] = replies[i]
                row = TYPES[values[k][0]]
                if row.tally is not None and wrote is not None and \
                        not isinstance(replies[wrote], Exception):
                    for name, n in row.tally(replies[wrote]).items():
                        setattr(report, name, getattr(report, name) + n)
                if replies[expired] == 1:
                    report.ttls += 1
    report.merged += len(values)
    bad = [k for k, (typ, v, _) in values.items()
           if isinstance(after.get(k), Exception) or not contains(typ, after.get(k), v)]
    if bad:
        raise VerificationFailed(f"{len(bad)} shared keys were not merged into the cloud", bad)
    report.keys_verified += len(values)


SAMPLE = 10  # key names reported per kind of surprise
_OWN = (SHARED_RECORD, payloads.COPIED_TABLES)  # the library's records on the edge


def _sample(into: list[str], key: bytes) -> None:
    if len(into) < SAMPLE:
        into.append(key.decode("utf-8", "replace"))


class _Sorter:
    """Sorts the edge's keys as the scan finds them: the served users' keys (hash-tagged
    with one of them, shared-looking or not unless a shared pattern names them), the
    shared keys (untagged, or tagged with a served user, matching a shared pattern), and
    the rest, which is not the server's to give back: counted and sampled as `not_owned`
    (another user's, the library's namespace, neither a user's nor shared)."""

    def __init__(self, report: SyncReport, patterns: list[str], owned: set[bytes] | None,
                 handed: set[bytes]) -> None:  # fmt: skip
        self.report, self.owned, self.handed = report, owned, handed
        self.is_shared = matcher(tuple(patterns))
        self.shared: list[bytes] = []
        self.tags: set[bytes] = set()

    def users(self, keys: Iterable[bytes]) -> list[bytes]:
        """The user keys to merge among `keys`, a scan step's at a time; shared keys are
        set aside, the rest counted."""
        out: list[bytes] = []
        owned, handed, is_shared, seen = self.owned, self.handed, self.is_shared, self.tags.add
        for key in keys:  # is_library and hash_tag inline: a merge asks it of every key
            if key.startswith(LIBRARY_PREFIX):
                if key not in _OWN:  # the library's own, read by the merge
                    self._refuse(key)
                continue
            start = key.find(b"{")
            end = key.find(b"}", start + 1) if start >= 0 else -1
            tag = key[start + 1 : end] if end > start + 1 else None
            if tag is not None and (tag in handed or (owned is not None and tag not in owned)):
                if tag not in handed:
                    self._refuse(key)
            elif is_shared(key):
                self.shared.append(key)
            elif tag is None:
                self._refuse(key)
            else:
                out.append(key)
                seen(tag)
        return out

    def _refuse(self, key: bytes) -> None:
        self.report.not_owned += 1
        _sample(self.report.not_owned_sample, key)


def _dumps(edge: redis.Redis, sorter: _Sorter,
           digested: dict[bytes, bytes] | None = None) -> Iterator[dict[bytes, tuple]]:  # fmt: skip
    """The edge's user keys dumped in one scan of its whole keyspace (it holds only the
    served users), in chunks of about CHUNK keys (a smaller first one, to get the
    destination going); the other keys are sorted aside as the scan finds them. With
    `digested` the hash tables' digests go there (`scan_dump`)."""
    chunk: dict[bytes, tuple[bytes, int]] = {}
    size = FIRST_CHUNK
    for part in scan_dump(edge, "*", digested=digested):
        chunk.update((k, part[k]) for k in sorter.users(part))
        if len(chunk) >= size:
            yield chunk
            chunk, size = {}, CHUNK
    if chunk:
        yield chunk


def export_users(edge: Client, user_ids: Iterable[str],
                 shared_patterns: Iterable[str] = ()) -> tuple[dict[bytes, tuple], int]:
    """A handover's data: the keys of `user_ids` on `edge` (hash-tagged with one of
    them, not shared) as DUMP payloads with their TTLs, in one scan of a standalone
    server; and how many tagged keys of other users were left out (never handed on)."""
    owned = {str(u).encode() for u in user_ids}
    patterns = list(shared_patterns)
    out: dict[bytes, tuple] = {}
    others = 0
    for part in scan_dump(edge, "*{?*}*"):
        for key, value in part.items():
            if hash_tag(key) not in owned or is_library(key):
                others += 1
            elif not matches(key, patterns):
                out[key] = value
    return out, others


def merge_back(
    edge: Client,
    cloud: Client,
    *,
    shared_patterns: Iterable[str] = (),
    user_ids: Iterable[str] | None = None,
    manifest: str | None = None,
    cloud_wins: Iterable[str] = (),
    handed: Iterable[str] = (),
) -> SyncReport:
    """Termination: bring the edge's data home to the cloud, verified.

    User keys replace the cloud's copy; keys matching `shared_patterns` are merged by
    `merge_rule` and their type's TTL rule (`redis_types`); a shared key the edge left as
    it was copied there is not merged again, one of a type without a rule is counted and
    sampled (`not_merged`). With `user_ids` (what a node always passes: the users of the
    setup request) only keys whose hash tag is one of them are written, shared keys
    included; every other key on the edge (another user's, the library's namespace
    `enorm:`, or neither a user's nor shared) is counted and sampled (`not_owned`), never
    merged: an edge server cannot write another user's data, or the library's, on the
    cloud.

    With `manifest` (written by `copy_users` at deploy, on the cloud) the served users'
    keys that the edge deleted are deleted on the cloud; a key the edge left as it was
    copied out is `untouched`: the cloud's value stands, whatever the cloud did meanwhile
    (changed, deleted, nothing). One that went out without a TTL and that the edge left
    without one is not even looked at: a TTL the cloud gave it meanwhile stands too
    (the edge changed nothing of it). Of the others only the edge's TTL is set, where
    either side has one and the cloud's value is still the one copied out (the digest
    leaves out the TTL); a manifest written before the copy marked the keys without a
    TTL (`payloads.NO_TTL`) says nothing of TTLs: every such key is asked. A
    key both sides changed is a conflict: counted, sampled, and resolved by policy: the
    edge wins, except for keys matching a `cloud_wins` pattern, which keep the cloud's
    value.
    The manifest is removed once the merge is verified. Without a manifest nothing is
    deleted and conflicts cannot be told.

    `handed`: users whose keys went to another edge server (a handover between nodes):
    their keys are left alone here, neither merged nor counted as not owned, and the
    manifest stays: the cloud manager moves it to the server that took them, which
    merges them in its turn.
    """
    started = time.perf_counter()
    report = SyncReport()
    wins = list(cloud_wins)
    owned = None if user_ids is None else {str(u).encode() for u in user_ids}
    gone_users = {str(u).encode() for u in handed}
    sorter = _Sorter(report, list(shared_patterns), owned, gone_users)
    if not manifest or is_cluster(cloud):
        ping(cloud)  # else reading the manifest is the check (one round trip less)
    m = read_manifest(cloud, manifest) if manifest else None
    report.manifest = m is not None
    seen: set[bytes] = set()  # the edge's user keys that were offered to the cloud

    def remembered(chunks: Iterable) -> Iterator[dict[bytes, tuple]]:
        for item in chunks:
            part = item if isinstance(item, dict) else dump(edge, item)
            seen.update(part)
            yield part

    counting = threading.Lock()  # two restorer threads report conflicts

    def restore_tracked(dst: Client, part: dict, replace: bool) -> list[bytes]:
        """A chunk written against the manifest: a key the edge left as copied out is
        untouched (its TTL aside), the cloud's value stands; a key the cloud changed
        meanwhile is held back by the same script, and if the edge changed it too it is
        a conflict (not the edge's value already): counted, and kept as the cloud has it
        when the cloud wins that key. Those two leave `part`: neither written nor skipped."""
        assert m is not None
        held: list[bytes] = []
        untouched: list[bytes] = []
        written = payloads.restore(dst, part, replace, expect=m, held=held,
                                   untouched=untouched, digested=digested)  # fmt: skip
        found: list[bytes] = []
        if held:
            found, cloud_only = _changed(edge, cloud, m, held)
            untouched += cloud_only
        won = [k for k in found if matches(k, wins)]
        for k in untouched + won:
            del part[k]
        with counting:
            report.untouched += len(untouched)
            report.conflicts_cloud_won += len(won)
            _count(report, found)
        if not held:
            return written
        return written + payloads.restore(dst, {k: part[k] for k in held if k in part}, replace)

    # The edge's digests of its hash tables, taken as they are dumped (with a manifest)
    digested: dict[bytes, bytes] | None = {} if m is not None else None
    if not is_cluster(edge):
        chunks: Iterable = _dumps(edge, sorter, digested)
    else:
        with Guard("source"):
            keys = sorter.users(scan(edge, "*"))
        chunks = [keys[i : i + CHUNK] for i in range(0, len(keys), CHUNK)]
    copy_chunks(edge, cloud, remembered(chunks), True, report,
                restore=None if m is None else restore_tracked)
    report.users = len(sorter.tags) if owned is None else len(owned)
    _merge_shared(edge, cloud, sorter.shared, report)
    if m is not None:
        shared = set(sorter.shared)
        gone = [
            k
            for k in m
            if k not in seen and k not in shared
            and (tag := hash_tag(k)) is not None and not is_library(k)
            and (owned is None or tag in owned) and tag not in gone_users
        ]
        kept = set(_changed(edge, cloud, m, gone)[0])
        _count(report, kept)
        doomed = [k for k in gone if not (k in kept and matches(k, wins))]
        report.conflicts_cloud_won += len(gone) - len(doomed)
        report.deleted = unlink(cloud, doomed)
        if not gone_users:  # else the server the users went to inherits it
            with Guard("destination"):
                cloud.unlink(manifest)  # 100k fields: freed in Redis's background
    report.verified = True
    report.seconds = time.perf_counter() - started
    return report


def _count(report: SyncReport, conflicts: Iterable[bytes]) -> None:
    for k in conflicts:
        report.conflicts += 1
        _sample(report.conflict_sample, k)


def _changed(edge: Client, cloud: Client, m: dict[bytes, bytes],
             keys: list[bytes]) -> tuple[list[bytes], list[bytes]]:  # fmt: skip
    """Of `keys`, those the cloud changed since the copy, as (conflicts, cloud only).
    A conflict: the edge changed it too, so the cloud's value is neither what was copied
    out nor already the edge's (a retried merge wrote that itself). Cloud only: the edge
    still holds what was copied out (its digest is the manifest's), so the cloud's value
    is the newer one and stays: written back, the edge's stale copy would undo it."""
    if not keys:
        return [], []
    now = digests(cloud, keys)
    copied = {k: copied_digest(m[k]) for k in keys if k in m}
    changed = [k for k in keys if now[k] != copied.get(k)]
    if not changed:
        return [], []
    at_edge = digests(edge, changed, "source")
    cloud_only = [k for k in changed if k in copied and at_edge[k] == copied[k]]
    stale = set(cloud_only)
    conflicts = [
        k
        for k in changed
        if k not in stale
        and ((now[k] is not None and now[k] != at_edge[k])
             or (now[k] is None and at_edge[k] is not None and k in m))
    ]
    return conflicts, cloud_only
