"""What a copy or a merge tells its caller: the report, and the errors that leave the
source untouched so the caller can retry."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


class SyncError(Exception):
    """A sync did not complete; the source is untouched and the caller may retry."""


class DestinationUnreachable(SyncError):
    """The destination Redis did not answer (connection refused, timeout)."""


class SourceUnreachable(SyncError):
    """The source Redis did not answer."""


class VerificationFailed(SyncError):
    """Keys written to the destination do not match the source."""

    def __init__(self, message: str, keys: list[bytes]):
        super().__init__(message)
        self.keys = keys


@dataclass
class SyncReport:
    """What a copy or a merge did. Only a merge with a manifest deletes (`deleted`)."""

    users: int = 0
    keys: int = 0  # user keys written to the destination
    merged: int = 0  # shared keys merged into the destination
    shared: int = 0  # copy: shared keys copied with the users' (the app names them)
    # merge_back: shared keys the edge left as they were copied (value and expiry): not
    # merged again
    shared_unchanged: int = 0
    ttls: int = 0  # merge_back: shared keys whose expiry the merge set on the cloud
    renumbered: int = 0  # merge_back: shared stream entries appended with a new ID
    # merge_back: shared keys of a type the merge has no rule for (a module's), a sample
    not_merged: int = 0
    not_merged_sample: list[str] = field(default_factory=list)
    skipped: int = 0  # replace=False: keys the destination already had
    keys_verified: int = 0  # keys checked on the destination after writing
    bytes: int = 0  # payload bytes moved
    seconds: float = 0.0
    verified: bool = False
    deleted: int = 0  # merge_back with a manifest: keys the edge deleted, removed on the cloud
    # merge_back: keys on the edge that are not the server's to give back (not merged), a
    # sample: another user's, the library's namespace (`enorm:`), or neither a user's nor
    # shared
    not_owned: int = 0
    not_owned_sample: list[str] = field(default_factory=list)
    # merge_back with a manifest: served users' keys the cloud changed during the offload
    conflicts: int = 0
    conflict_sample: list[str] = field(default_factory=list)
    conflicts_cloud_won: int = 0  # of those, kept as the cloud had them (cloud_wins)
    # merge_back with a manifest: served users' keys the edge left as copied out, not
    # written: the cloud's value stands, whatever the cloud did meanwhile (not in `keys`)
    untouched: int = 0
    manifest: bool = False  # a manifest of the copy was found (deletes and conflicts known)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
