"""Copying users' keys between two Redis servers in overlapping stages (dump, restore,
verify), and deleting them on the source once the copy is verified."""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial

from . import payloads
from .keys import KeySchema, check_id, is_library, iter_schema_keys, iter_user_keys, user_keys
from .manifest import drop_manifest, record_shared, write_manifest
from .report import SyncError, SyncReport
from .transport import Client, Guard, Job, is_cluster, ping, run_jobs

CHUNK = 10_000  # keys dumped ahead while the previous chunk is restored
FIRST_CHUNK = 2_500  # a smaller first chunk starts the destination sooner
RESTORERS = 2  # chunks in flight to the destination, each on its own connection


def chunked(keys: Iterable[bytes]) -> Iterator[list[bytes]]:
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


def copy_users(
    src: Client,
    dst: Client,
    user_ids: Iterable[str],
    *,
    replace: bool = True,
    manifest: str | None = None,
    schema: KeySchema | None = None,
    shared: Iterable[bytes | str] = (),
) -> SyncReport:
    """Copy every key of `user_ids` from `src` to `dst`, then verify it on `dst`.

    With replace=False keys that `dst` already has are kept (and not verified).
    With `manifest` (see `manifest_key`), the digest of every copied key (as copied) and
    whether it went without a TTL are recorded on `src` under that name, for
    `merge_back` to find deletes, conflicts and the keys the edge left as they went out.
    With `schema` the keys are found by name (`schema_keys`), without it by a scan of
    `src`'s keyspace. `shared` names shared keys to copy as well (those that exist, with
    their TTLs); `dst` records them as copied (`manifest.SHARED_RECORD`), so that the
    merge at termination tells what the edge changed of them.
    Raises DestinationUnreachable before touching anything if `dst` does not answer,
    SyncError if `dst` refuses a payload (RESTORE's check), VerificationFailed if a key
    written is no longer on `dst` after the last write.
    """
    started = time.perf_counter()
    ids = list(dict.fromkeys(str(u) for u in user_ids))
    for u in ids:
        check_id(u)
    report = SyncReport(users=len(ids))
    ping(dst)
    # The digests come from the very payloads copied: no second read, no race. With
    # replace every key dumped is written, so the dumper thread records each chunk's
    # digests as it goes, beside the restores; else only what was written, at the end.
    streamed = manifest is not None and replace
    copied: dict[bytes, tuple] | None = {} if manifest is not None and not replace else None
    written_parts = 0

    def record(part: dict[bytes, tuple]) -> None:
        nonlocal written_parts
        write_manifest(src, manifest, part, fresh=written_parts == 0)
        written_parts += 1

    found = iter_schema_keys(src, schema, ids) if schema else iter_user_keys(src, ids)
    # With a manifest, `dst` records its hash tables as written (`payloads.COPIED_TABLES`)
    # so that the merge needs no digest of those left as copied (a cluster: no record).
    tables = manifest is not None and not is_cluster(dst)
    try:
        copy_chunks(src, dst, chunked(found), replace, report, copied=copied,
                    on_dump=record if streamed else None,
                    restore=partial(payloads.restore, record=True) if tables else None)
        if manifest is not None and (copied is not None or not written_parts):
            write_manifest(src, manifest, copied or {})
        copy_shared(src, dst, shared, report)
    except BaseException:
        if manifest is not None and written_parts:
            with contextlib.suppress(SyncError):
                drop_manifest(src, manifest)
        raise
    report.manifest = manifest is not None
    report.verified = True
    report.seconds = time.perf_counter() - started
    return report


def copy_shared(src: Client, dst: Client, keys: Iterable[bytes | str],
                report: SyncReport) -> None:  # fmt: skip
    """The named shared keys `src` -> `dst` (REPLACE, verified), recorded on `dst` as
    copied. Keys of the library's namespace are never copied."""
    ks = [k for k in dict.fromkeys(k.encode() if isinstance(k, str) else k for k in keys)
          if not is_library(k)]  # fmt: skip
    if not ks:
        return
    with Guard("source"):
        part = payloads.dump(src, ks)
    written = payloads.restore(dst, part, True)
    report.keys_verified += payloads.verify_present(dst, written)
    report.shared += len(written)
    report.bytes += sum(len(part[k][0]) for k in written)
    record_shared(dst, written)


def copy_chunks(src: Client, dst: Client, chunks: Iterable, replace: bool,
                 report: SyncReport, copied: dict[bytes, tuple] | None = None,
                 restore: Callable[[Client, dict, bool], list[bytes]] | None = None,
                 on_dump: Callable[[dict], None] | None = None) -> None:  # fmt: skip
    """Copy chunk by chunk: each item of `chunks` is a list of keys to dump from `src`,
    or a dict already dumped (key -> (payload, ttl)); `chunks` may be a generator that
    scans the source as it goes.

    Three stages overlap: a thread dumps chunk i+2 (scanning as needed) while two
    others restore and check chunks i and i+1 on `dst`, each over its own connection,
    so the destination works on one chunk while the next is packed and sent. After the
    last chunk every written key is checked to be still there (eviction, expiry).
    `on_dump(part)` runs in the dumper thread for each chunk dumped, once the chunk is
    on its way to a restorer (before the next dump, or at the end); `restore(dst,
    part, replace)` (default `payloads.restore`) writes a chunk in a restorer thread and
    returns the keys written (it may drop keys from `part`: neither written nor skipped).
    """
    written: list[bytes] = []
    it = iter(chunks)

    dumped: list[dict] = []  # the part just handed out: its on_dump runs next, first

    def next_dump() -> dict[bytes, tuple] | None:
        with Guard("source"):
            if dumped and on_dump is not None:
                on_dump(dumped.pop())
            for item in it:
                part = item if isinstance(item, dict) else payloads.dump(src, item)
                if part:
                    dumped[:] = [part]
                    return part
        return None

    def collect(part: dict[bytes, tuple], done: list[bytes]) -> None:
        written.extend(done)
        if copied is not None:
            copied.update((k, part[k]) for k in done)
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
            inflight.append((part, restorer.submit(restore or payloads.restore, dst, part,
                                                   replace)))
        while inflight:
            collect(inflight[0][0], inflight.popleft()[1].result())
    report.keys += len(written)
    report.keys_verified += payloads.verify_present(dst, written)


def count_existing(client: Client, keys: Iterable[bytes | str]) -> int:
    """How many of `keys` exist on `client` (multi-key EXISTS, pipelined per master)."""
    ks = [k.encode() if isinstance(k, str) else k for k in keys]
    (found,) = run_jobs(client, [Job(ks, lambda b: ["EXISTS", *b])], "destination")
    return sum(n for _, n in found)


def delete_users(src: Client, user_ids: Iterable[str]) -> int:
    """Delete the users' keys on `src`. Call only after a verified copy: it is the one
    function here that removes data."""
    with Guard("source"):
        keys = user_keys(src, [str(u) for u in user_ids])
    return unlink(src, keys, "source")


def unlink(client: Client, keys: list[bytes], side: str = "destination") -> int:
    """Delete `keys` on `client` (one slot per command in a cluster); how many existed."""
    if not keys:
        return 0
    (replies,) = run_jobs(client, [Job(keys, lambda b: ["UNLINK", *b])], side)
    return sum(n for _, n in replies)
