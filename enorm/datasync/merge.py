"""Termination: the edge's data merged back into the cloud, verified; only the served
users' keys, deletes and conflicts told from the copy's manifest."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis

from . import payloads
from .copy import CHUNK, FIRST_CHUNK, copy_chunks
from .keys import SCAN_COUNT, hash_tag, scan, user_keys
from .manifest import digests, read_manifest
from .payloads import dump, scan_dump
from .redis_types import TYPES
from .report import SyncReport, VerificationFailed
from .rules import contains, matches
from .transport import BATCH, Client, Guard, Job, by_node, is_cluster, ping, run_jobs

# A shared key whose type on the cloud is not the edge's is replaced by the edge's: the
# check and the delete run on the server, in the write's own round trip.
_TYPE_GUARD = """
local t = redis.call('TYPE', KEYS[1]).ok
if t ~= 'none' and t ~= ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""


def read_typed(client: Client, keys: list[bytes], side: str) -> dict[bytes, tuple[bytes, Any]]:
    """key -> (type, value) for the keys of a type the table knows that exist."""
    out: dict[bytes, tuple[bytes, Any]] = {}
    with Guard(side):
        for node, ks in by_node(client, keys).items():
            for i in range(0, len(ks), BATCH):
                chunk = ks[i : i + BATCH]
                pipe = node.pipeline(transaction=False)
                for k in chunk:
                    pipe.type(k)
                types = pipe.execute()
                pipe = node.pipeline(transaction=False)
                kept = [(k, t) for k, t in zip(chunk, types, strict=True) if t in TYPES]
                for k, t in kept:
                    TYPES[t].read(pipe, k)
                for (k, t), v in zip(kept, pipe.execute(), strict=True):
                    out[k] = (t, v)
    return out


def _merge_shared(edge: Client, cloud: Client, keys: list[bytes], report: SyncReport) -> None:
    values = read_typed(edge, keys, "source")
    with Guard("destination"):
        after: dict[bytes, Any] = {}
        for node, ks in by_node(cloud, list(values)).items():
            pipe = node.pipeline(transaction=False)
            reads: list[tuple[bytes, int]] = []
            for k in ks:
                typ, value = values[k]
                row = TYPES[typ]
                pipe.eval(_TYPE_GUARD, 1, k, typ)  # the types disagree: the edge's key wins
                row.write(pipe, k, value)
                report.bytes += row.size(value)
                # read back in the same round trip: the verification below
                reads.append((k, len(pipe)))
                row.read(pipe, k)
            replies = pipe.execute(raise_on_error=False)
            after.update((k, replies[i]) for k, i in reads)
    report.merged += len(values)
    bad = [k for k, (typ, v) in values.items()
           if isinstance(after.get(k), Exception) or not contains(typ, after.get(k), v)]
    if bad:
        raise VerificationFailed(f"{len(bad)} shared keys were not merged into the cloud", bad)
    report.keys_verified += len(values)


SAMPLE = 10  # key names reported per kind of surprise


def _sample(into: list[str], key: bytes) -> None:
    if len(into) < SAMPLE:
        into.append(key.decode("utf-8", "replace"))


def _tagged_dumps(edge: redis.Redis, shared: Callable[[], set[bytes]], tags: set[bytes],
                  owns: Callable[[bytes], bool]) -> Iterator[dict[bytes, tuple]]:  # fmt: skip
    """The edge's user keys (hash-tagged, not shared, owned) dumped in one scan, in
    chunks of about CHUNK keys (a smaller first one, to get the destination going); the
    tags seen are added to `tags`. `shared()` gives the shared keys, waited for only
    once the first SCAN steps are done."""
    chunk: dict[bytes, tuple[bytes, int]] = {}
    size = FIRST_CHUNK
    skip: set[bytes] | None = None
    for part in scan_dump(edge, "*{?*}*"):
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
            if hash_tag(key) not in owned:
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

    `handed`: users whose keys went to another edge server (a handover between nodes):
    their keys are left alone here, neither merged nor counted as not owned, and the
    manifest stays: the cloud manager moves it to the server that took them, which
    merges them in its turn.
    """
    started = time.perf_counter()
    report = SyncReport()
    patterns, wins = list(shared_patterns), list(cloud_wins)
    owned = None if user_ids is None else {str(u).encode() for u in user_ids}
    gone_users = {str(u).encode() for u in handed}
    if not manifest or is_cluster(cloud):
        ping(cloud)  # else reading the manifest is the check (one round trip less)
    m = read_manifest(cloud, manifest) if manifest else None
    report.manifest = m is not None
    seen: set[bytes] = set()  # the edge's user keys that were offered to the cloud

    def owns(key: bytes) -> bool:
        tag = hash_tag(key)
        if tag in gone_users:
            return False
        if owned is None or tag is None or tag in owned:
            return True
        report.not_owned += 1
        _sample(report.not_owned_sample, key)
        return False

    def scan_shared() -> list[bytes]:
        with Guard("source"):
            return list(dict.fromkeys(k for p in patterns for k in scan(edge, p, SCAN_COUNT * 4)))

    def remembered(chunks: Iterable) -> Iterator[dict[bytes, tuple]]:
        for item in chunks:
            part = item if isinstance(item, dict) else dump(edge, item)
            seen.update(part)
            yield part

    counting = threading.Lock()  # two restorer threads report conflicts

    def restore_unchanged(dst: Client, part: dict, replace: bool) -> list[bytes]:
        """A chunk written where the cloud still holds what was copied out; a key the
        cloud changed meanwhile is held back by the same script, and if it is a conflict
        (not the edge's value already) it is counted, and kept as the cloud has it when
        the cloud wins that key. A key neither side changed (no TTL) is not rewritten."""
        assert m is not None
        held: list[bytes] = []
        same: list[bytes] = []
        written = payloads.restore(dst, part, replace, expect={k: m.get(k) for k in part},
                                   held=held, same=same)  # fmt: skip
        with counting:
            report.unchanged += len(same)
        if not held:
            return written
        found = _conflicts(edge, cloud, m, held)
        with counting:
            _count(report, found)
            for k in found:
                if matches(k, wins):
                    report.conflicts_cloud_won += 1
                    del part[k]
        return written + payloads.restore(dst, {k: part[k] for k in held if k in part}, replace)

    with ThreadPoolExecutor(1, thread_name_prefix="datasync-shared") as pool:
        # The shared keys are scanned while the user keys' scan starts.
        pending = pool.submit(scan_shared)
        tags: set[bytes] = set()
        if not is_cluster(edge):
            chunks: Iterable = _tagged_dumps(edge, lambda: set(pending.result()), tags, owns)
        else:
            shared_set = set(pending.result())
            with Guard("source"):
                keys = [k for k in user_keys(edge, None) if k not in shared_set and owns(k)]
            tags = {t for k in keys if (t := hash_tag(k)) is not None}
            chunks = [keys[i : i + CHUNK] for i in range(0, len(keys), CHUNK)]
        copy_chunks(edge, cloud, remembered(chunks), True, report,
                    restore=None if m is None else restore_unchanged)
        shared = [k for k in pending.result() if owns(k)]
    report.users = len(tags) if owned is None else len(owned)
    _merge_shared(edge, cloud, shared, report)
    if m is not None:
        gone = [
            k
            for k in m
            if k not in seen and k not in shared and (owned is None or hash_tag(k) in owned)
            and hash_tag(k) not in gone_users
        ]
        kept = set(_conflicts(edge, cloud, m, gone))
        _count(report, kept)
        doomed = [k for k in gone if not (k in kept and matches(k, wins))]
        report.conflicts_cloud_won += len(gone) - len(doomed)
        report.deleted = _unlink(cloud, doomed)
        if not gone_users:  # else the server the users went to inherits it
            with Guard("destination"):
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
    out = [
        k
        for k in changed
        if (now[k] is not None and now[k] != at_edge[k])
        or (now[k] is None and at_edge[k] is not None and k in m)
    ]
    return out


def _unlink(client: Client, keys: list[bytes]) -> int:
    """Delete `keys` on `client` (one slot per command in a cluster); how many existed."""
    if not keys:
        return 0
    (replies,) = run_jobs(client, [Job(keys, lambda b: ["UNLINK", *b])], "destination")
    return sum(n for _, n in replies)
