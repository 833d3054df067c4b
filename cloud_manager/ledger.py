"""Which edge server serves which users, kept in the cloud Redis.

The library's `CloudManager` holds its deployments in memory; the ledger is what outlives
a process, so that `enorm-cloud withdraw` or `where` in one process sees an offload made
by another. It spreads over a Redis Cluster's slots: a deployment is one key under its
server's hash tag (`enorm:deployment:{<server id>}`), a user's pointer to it one key
under the user's own tag (`enorm:{<user>}:served-by`, beside the user's data: the
library's prefix keeps it out of every copy and merge), and the list of deployments is
cut into `SHARDS` sets (`enorm:{ledger:<k>}:deployments`).

A user's pointer holds what `where` answers (the server id, its node and URL, `Served`),
so that `where` is one read, however large the ledger; the deployment's record (its users,
app, time) is read by `get`. A pointer of the older shape (the server id alone) is read
through the deployment, two reads.

A cluster has no transaction across slots, so the writes go in an order a reader
tolerates when a process dies half-way: `record` writes the deployment, then its users'
pointers; `forget` takes the pointers that still name it (compare-and-delete, so a user
who moved on keeps the newer one), then the deployment. So a pointer never outlives its
deployment, but for a `forget` run while the same deployment is still being recorded
(its pointers written after the forget took them): nothing withdraws a server before its
record is done (the orphans' reconcile fences one it ends, `fence`). A ledger written
before (two hashes under `enorm:{cloud}`) is moved into this shape by `adopt_legacy`.
"""

from __future__ import annotations

import json
import time
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any

from enorm import datasync
from enorm.datasync.transport import Job, eval_command, run_jobs
from enorm.protocol import User

# Where the ledger was before it spread over the slots (`Ledger.adopt_legacy`).
LEGACY_PREFIX = "enorm:{cloud}"


@dataclass
class Entry:
    server_id: str
    node: str
    app: str
    url: str  # the user-facing base URL of the edge server
    users: list[User]  # with the addresses they were offloaded with
    created_at: float = field(default_factory=time.time)

    @property
    def user_ids(self) -> list[str]:
        return [u.id for u in self.users]

    @property
    def served(self) -> Served:
        if "\t" in self.node or "\t" in self.url or "\t" in self.server_id:
            raise ValueError("a server id, node or URL with a tab in it")
        return Served(self.server_id, self.node, self.url)

    def deployment(self, edge: Any) -> Any:
        """This entry as a `Deployment` on `edge` (its `EdgeClient`), enough to withdraw
        or hand over from another process: ids, node, users and URL, no session."""
        from enorm.protocol import Access, Resources, SetupResponse

        from .orchestrator import Deployment

        setup = SetupResponse(server_id=self.server_id, container="", address="",
                              access=Access(host="", port=0), ports={},
                              limits=Resources(cores=0, memory_mb=0), redis_password="")
        return Deployment(edge=edge, setup=setup, users=self.users, url=self.url)

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "users": [u.model_dump(mode="json")
                                                     for u in self.users]})

    @classmethod
    def from_json(cls, raw: bytes | str) -> Entry:
        d = json.loads(raw)
        # An entry written before the ledger kept addresses names its users by id.
        d["users"] = [User(id=u, address="127.0.0.1") if isinstance(u, str)
                      else User.model_validate(u) for u in d["users"]]
        return cls(**d)


# How many sets the list of deployments is cut into (as the registry's index).
SHARDS = 64

# KEYS: users' pointers (one slot); ARGV[1]: a server id. Deletes the pointers that still
# name it (a user who moved on keeps the newer one); returns how many.
DELETE_IF = """
local n, sid = 0, ARGV[1]
for _, k in ipairs(KEYS) do
  local v = redis.call('GET', k)
  if v == sid or (v and string.sub(v, 1, #sid + 1) == sid .. '\t') then
    n = n + redis.call('DEL', k)
  end
end
return n
"""


@dataclass(frozen=True)
class Served:
    """Which edge server serves a user, as the user's pointer holds it (`Ledger.where`)."""

    server_id: str
    node: str
    url: str

    def encode(self) -> str:
        return f"{self.server_id}\t{self.node}\t{self.url}"

    @staticmethod
    def server_of(raw: bytes | str) -> str:
        """The server id a pointer names (either shape)."""
        return _text(raw).split("\t", 1)[0]


def deployment_key(server_id: str) -> str:
    return f"enorm:deployment:{{{_tag(server_id, 'server id')}}}"


def user_key(user: str) -> str:
    """A user's pointer to its deployment, on the user's own slot."""
    return f"enorm:{{{_tag(user, 'user id')}}}:served-by"


def index_key(k: int) -> str:
    return f"enorm:{{ledger:{k}}}:deployments"


def shard(server_id: str) -> int:
    return zlib.crc32(server_id.encode()) % SHARDS


def _tag(value: str, what: str) -> str:
    if not value or "{" in value or "}" in value:
        raise ValueError(f"{what} {value!r}: empty, or braces that would change the "
                         "key's hash tag")
    return value


def _text(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


class Ledger:
    def __init__(self, redis: datasync.Client) -> None:
        self.r = redis

    def record(self, e: Entry, retry_s: float = 15.0) -> None:
        """The deployment, then its users' pointers (module docstring: the order); tried
        again for `retry_s` through a master's failover (writing it twice changes
        nothing)."""
        datasync.through_failover(lambda: self._record(e), retry_s)

    def _record(self, e: Entry) -> None:
        pointer = e.served.encode()
        pipe = self.r.pipeline(transaction=False)
        pipe.set(deployment_key(e.server_id), e.to_json())
        pipe.sadd(index_key(shard(e.server_id)), e.server_id)
        pipe.execute()
        if e.users:
            pipe = self.r.pipeline(transaction=False)
            for u in e.user_ids:
                pipe.set(user_key(u), pointer)
            pipe.execute()

    def get(self, server_id: str) -> Entry | None:
        raw = self.r.get(deployment_key(server_id))
        return None if raw is None else Entry.from_json(raw)

    def ids(self) -> list[str]:
        """Every deployment's server id: a read per shard of the list, pipelined."""
        pipe = self.r.pipeline(transaction=False)
        for k in range(SHARDS):
            pipe.smembers(index_key(k))
        return [_text(s) for part in pipe.execute() for s in part]

    def all(self) -> list[Entry]:
        ids = self.ids()
        keys = [deployment_key(s) for s in ids]
        raws = datasync.mget(self.r, keys)
        return sorted((Entry.from_json(v) for v in raws if v is not None),
                      key=lambda e: e.created_at)

    def where(self, user: str) -> Served | None:
        """The server that serves `user` (None: the cloud), in one read."""
        raw = self.r.get(user_key(user))
        if raw is None:
            return None
        parts = _text(raw).split("\t", 2)
        if len(parts) == 3:
            return Served(*parts)
        e = self.get(parts[0])  # a pointer of the older shape: the server id alone
        return None if e is None else e.served

    def forget(self, server_id: str) -> None:
        """Drop a deployment, and its users' pointers unless they moved on meanwhile."""
        e = self.get(server_id)
        if e is not None and e.users:
            keys = [user_key(u).encode() for u in e.user_ids]
            run_jobs(self.r, [Job(keys, eval_command(DELETE_IF, lambda _: [server_id]))],
                     "source")
        pipe = self.r.pipeline(transaction=False)
        pipe.delete(deployment_key(server_id))
        pipe.srem(index_key(shard(server_id)), server_id)
        pipe.execute()

    def repair(self) -> int:
        """Finish what a process killed half-way through `record` left: a deployment
        whose users' pointers are missing, or name a deployment that is gone or older,
        gets them; how many pointers were written. It reads the whole ledger: run it
        after a cloud-manager process died, not on every command."""
        entries = self.all()
        created = {e.server_id: e.created_at for e in entries}
        fix: dict[str, str] = {}
        for e in entries:
            now = datasync.mget(self.r, [user_key(u) for u in e.user_ids])
            for u, raw in zip(e.user_ids, now, strict=True):
                held = None if raw is None else created.get(Served.server_of(raw))
                if held is None or held < e.created_at:
                    fix[u] = e.served.encode()
        if fix:
            def write() -> None:
                pipe = self.r.pipeline(transaction=False)
                for u, pointer in fix.items():
                    pipe.set(user_key(u), pointer)
                pipe.execute()
            datasync.through_failover(write)
        return len(fix)

    def adopt_legacy(self, prefix: str = LEGACY_PREFIX) -> int:
        """Move a ledger of the old shape (two hashes under one hash tag) into this one;
        how many deployments moved. Each is recorded before the old hashes go, so a
        crash half-way loses nothing (the next call records the rest again)."""
        old = self.r.hgetall(f"{prefix}:deployments")
        for raw in old.values():
            self.record(Entry.from_json(raw))
        if old:
            self.r.delete(f"{prefix}:deployments", f"{prefix}:users")
        return len(old)
