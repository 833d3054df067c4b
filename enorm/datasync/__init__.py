"""Moving per-user Redis keys between two Redis servers, verified, with a merge policy.

Both sides use it: the cloud manager copies the served users' keys cloud -> edge when it
deploys a server, the edge manager merges the edge data back edge -> cloud when it
terminates one. The rules (docs/architecture.md, "Data rules"):

* A user's keys carry the user id as a Redis hash tag (`u:{42}`, `pm:{42}:7`), so they
  are found by pattern and live on one slot in Redis Cluster.
* User keys replace the destination's copy (the source is the newer one).
* Shared keys (`shared_patterns`, e.g. `region:*`) are merged as a union by type.
* Nothing here deletes on the source. The caller calls `delete_users` once a report says
  the copy was verified. If the destination cannot be reached, `SyncError` is raised and
  the source is untouched, so the caller can keep the data and retry.

Verification: the payload is the source's DUMP, whose last 8 bytes are the CRC-64 of the
rest; RESTORE checks it and the RDB version, decodes the whole value and writes it, or
refuses and writes nothing, in the same atomic script that decides to write the key. So
a payload damaged on the way (an SSH forward, a proxy, a bug here) fails the copy (a
SyncError with Redis's reason), and a key written holds the source's value. A DUMP of
it right after would test only Redis's decoder against its own encoder: none is made.
What can still go wrong is later, behind the copy's back (the destination evicts,
expires or deletes a key while other chunks are written): after the last write every
key is checked to be still there (a multi-key EXISTS). Only then is a copy "verified".

Speed: keys move in batches through small Lua scripts (one EVAL per batch dumps, one
restores), so a batch costs one reply, not one per key; a whole chunk of batches is one
pipelined round trip (what an SSH port forward makes expensive). A thread dumps the next
chunk while two others restore the previous ones, each on its own connection. In a
cluster the batches are cut per slot and pipelined per master. On termination the
edge's keys are found and dumped in the same script calls (SCAN+DUMP).

The package, by seam: `redis_types` (the table of Redis types: per type how a value is
read, written by the merge, merged and sized, what an index of it names, what a digest
of it sorts; the Lua the others run is built from it), `transport` (clients,
batching per master and slot, pipelined scripts), `keys` (finding a user's keys:
hash-tag scan or the app's `KeySchema`), `payloads` (DUMP/RESTORE scripts, the check
after the last write), `copy` (the staged copy, delete on the source), `manifest`
(digests of what went out), `rules` (the merge policy, pure), `merge` (termination: merge back,
deletes, conflicts, ownership).
"""

from .copy import copy_shared, copy_users, count_existing, delete_users
from .keys import (
    LIBRARY_PREFIX,
    KeySchema,
    hash_tag,
    is_library,
    scan,
    schema_keys,
    user_keys,
    user_pattern,
)
from .manifest import (
    MANIFEST_TTL_S,
    digests,
    manifest_key,
    move_manifest,
    read_manifest,
    write_manifest,
)
from .merge import export_users, merge_back, read_typed
from .report import (
    DestinationUnreachable,
    SourceUnreachable,
    SyncError,
    SyncReport,
    VerificationFailed,
)
from .rules import matches, merge_rule
from .transport import Client, binary, connect, is_cluster, mget, ping, through_failover

__all__ = [
    "Client",
    "binary",
    "DestinationUnreachable",
    "KeySchema",
    "LIBRARY_PREFIX",
    "MANIFEST_TTL_S",
    "SourceUnreachable",
    "SyncError",
    "SyncReport",
    "VerificationFailed",
    "connect",
    "is_cluster",
    "mget",
    "through_failover",
    "copy_shared",
    "copy_users",
    "count_existing",
    "delete_users",
    "digests",
    "export_users",
    "hash_tag",
    "is_library",
    "matches",
    "manifest_key",
    "merge_back",
    "merge_rule",
    "move_manifest",
    "ping",
    "read_manifest",
    "read_typed",
    "scan",
    "schema_keys",
    "user_keys",
    "user_pattern",
    "write_manifest",
]
