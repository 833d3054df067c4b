"""The edge side of Procedure 4: merge a server's data back to the cloud before destroy.

The container's Redis is reached over the node's bridge with the password the node gave
it at launch; the sink is the cloud Redis named in the setup request. `merge_back`
verifies on the cloud before it returns, and nothing is deleted on the edge: if this
raises, the manager keeps the container (stopped) and retries later.
"""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path
from urllib.parse import quote

from enorm import datasync
from enorm.protocol import MergeReport
from enorm.store import ServerRecord

CONTAINER_REDIS_PORT = 6379


def container_redis_url(rec: ServerRecord) -> str:
    return f"redis://:{quote(rec.redis_password, safe='')}@{rec.address}:{CONTAINER_REDIS_PORT}/0"


def connect_container(rec: ServerRecord, timeout: float = 10.0) -> datasync.Client:
    """The container's Redis, waiting briefly for it after a (re)start of the container."""
    client = datasync.connect(container_redis_url(rec), timeout=timeout)
    deadline = time.monotonic() + timeout
    while True:
        try:
            datasync.ping(client, side="source")
            return client
        except datasync.SyncError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def merge_back_to_sink(rec: ServerRecord, user_ids: list[str]) -> MergeReport:
    """Merge the edge server's keys into its sink: only the keys of `user_ids` (the users
    of its setup request) and the shared patterns; deletes and conflicts from the copy's
    manifest on the sink. Users handed over to another node's server are left out."""
    assert rec.data_sink is not None
    edge = connect_container(rec)
    cloud = datasync.connect(rec.data_sink.url, cluster=rec.data_sink.cluster)
    try:
        report = datasync.merge_back(
            edge, cloud, shared_patterns=rec.data_sink.shared_patterns, user_ids=user_ids,
            manifest=datasync.manifest_key(rec.id),
            cloud_wins=rec.data_sink.cloud_wins_patterns, handed=rec.handed_users)
    finally:
        edge.close()
        cloud.close()
    if not report.verified:
        raise datasync.VerificationFailed("merge back not verified on the cloud", [])
    return MergeReport(
        keys_migrated=report.keys + report.untouched + report.merged,
        shared_merged=report.merged,
        shared_ttls=report.ttls, stream_renumbered=report.renumbered,
        not_merged=report.not_merged, not_merged_sample=report.not_merged_sample,
        keys_deleted=report.deleted,
        conflicts=report.conflicts, conflicts_cloud_won=report.conflicts_cloud_won,
        conflict_sample=report.conflict_sample, untouched=report.untouched,
        not_owned=report.not_owned,
        not_owned_sample=report.not_owned_sample)


def save_keys(rec: ServerRecord, path: Path) -> int:
    """Write every key of the container's Redis to `path` (JSON: base64 DUMP payloads and
    PTTLs, restorable with RESTORE), readable by root only; returns how many keys."""
    edge = connect_container(rec)
    out: dict[str, dict] = {}
    try:
        for key in datasync.scan(edge, "*"):
            payload = edge.dump(key)
            if payload is not None:
                out[base64.b64encode(key).decode()] = {
                    "dump": base64.b64encode(payload).decode(), "pttl": edge.pttl(key)}
    finally:
        edge.close()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"server": rec.id, "owner": rec.owner, "app": rec.app,
                   "sink": rec.data_sink.url if rec.data_sink else None, "keys": out}, f)
    return len(out)
