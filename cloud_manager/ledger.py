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

An offload in flight is recorded too, so that another process can take it over when
its own dies: from the node's admission to the users' redirection, its server has an
intent (`enorm:deployment:{<server id>}:intent`: the record it will have, and the server
a handover comes from) and a lease (`...:lease`, the owner's, kept by Redis's own
expiry and renewed by the owner while the offload runs, `Intents`), listed in 64 sets
(`enorm:{ledger:<k>}:intents`). An intent whose lease expired is its owner's no more:
the orphans' reconcile takes it (`take`) and either completes it (recorded: its users
pointed at it and sent there) or ends it (not recorded: fenced, its data merged back,
its users left on the cloud to be offered again), orphans.py. `where` and the records
are not touched by it. So a process cut off from the cluster loses its offloads in
flight to the others once their leases lapse, and what it writes late is refused
(`Ended`, `Lapsed`); a failover shorter than two thirds of a lease costs none (`Intents`).

A cluster has no transaction across slots, so the writes go in an order a reader
tolerates when a process dies half-way: `record` writes the deployment, then its users'
pointers; `forget` marks the server ended (`enorm:deployment:{<server id>}:ended`), takes
the pointers that still name it (compare-and-delete, so a user who moved on keeps the
newer one), then the deployment. A record of a server marked ended fails (`Ended`), and
whatever writes pointers (`record`, `repair`) looks for the mark after it wrote them and
takes them back if it is there, so a pointer never outlives its deployment, even when a
withdrawal, or the orphans' reconcile (`fence`), races a record. A ledger written before
(two hashes under `enorm:{cloud}`) is moved into this shape by `adopt_legacy`.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from enorm import datasync
from enorm.datasync.transport import FAILING_OVER, Job, eval_command, run_jobs
from enorm.protocol import User

log = logging.getLogger(__name__)

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


# KEYS: a deployment, its ended mark; ARGV[1]: the deployment's record. Writes it unless
# the server was marked ended (withdrawn, or ended as an orphan): 1 written, 0 not.
RECORD = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
return 1
"""

# KEYS: a deployment, its ended mark; ARGV: the mark's TTL (s), why. Marks a server the
# ledger does not know as ended: 1 marked, 0 it is recorded (known, not marked).
FENCE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[1])
return 1
"""

# KEYS: a lease, its intent; ARGV: its owner, the lease (ms). Extends it if it is still
# the owner's, or takes it again if it lapsed and nobody took it (the intent is still
# there: a taker that carried it on released it): 1; else 0 (another process had it).
RENEW = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if not holder and redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

# How long `record` is tried again through a master's failover.
RETRY_S = 15.0

# An offload in flight's lease, unless the app sets `offload_lease_s`: 1.5x a failover of
# Redis's default `cluster-node-timeout` (15 s) and its election (`Intents`).
LEASE_S = 30.0

# How soon a renewal of the leases that failed (a master failing over, the cluster out of
# reach) is tried again: within the lease, not a third of one later, so that a failover
# shorter than two thirds of a lease (less this) costs no lease (`Intents`).
RENEW_RETRY_S = 0.25

# What the cloud Redis raises when it does not answer: a master failing over, or this
# process cut off from the cluster (a cluster client that reaches no node raises an error
# that is not a RedisError).
UNREACHABLE: tuple[type[Exception], ...] = (
    *FAILING_OVER, redis.exceptions.RedisClusterUnreachableError)

# How long a server's ended mark is kept: longer than any record can come late.
ENDED_TTL_S = 86400


class Ended(Exception):
    """The server was withdrawn, or ended as an orphan (`Ledger.fence`), before its record
    was done: it is not recorded, and no user points at it."""

    def __init__(self, server_id: str) -> None:
        super().__init__(f"server {server_id} was ended before its record was done")
        self.server_id = server_id


class Lapsed(Exception):
    """The offload's lease lapsed while its process stalled, and another process took it
    over (orphans.py): that one completes or ends it; this one must do neither."""

    def __init__(self, server_id: str) -> None:
        super().__init__(f"offload of {server_id}: its lease lapsed; another process "
                         "took it over")
        self.server_id = server_id


class CloudUnreachable(redis.ConnectionError):
    """The cloud Redis (the registry, the ledger) did not answer, within the client's
    timeouts: this process is cut off from the cluster, or a master is failing over. No
    user was sent to a new server; an offload whose record may have landed meanwhile is
    left to its lease (this process renews it no more): once it lapses, another
    process's reconcile completes it if it was recorded, or ends it (orphans.py)."""

    def __init__(self, what: str, cause: BaseException) -> None:
        super().__init__(f"the cloud Redis did not answer ({what}): "
                         f"{type(cause).__name__}: {cause}")


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


def ended_key(server_id: str) -> str:
    """The mark of a server that ended (withdrawn, or an orphan): no record may follow."""
    return f"enorm:deployment:{{{_tag(server_id, 'server id')}}}:ended"


def index_key(k: int) -> str:
    return f"enorm:{{ledger:{k}}}:deployments"


def intent_key(server_id: str) -> str:
    """An offload in flight: what its record will be (`Intent`), beside its deployment."""
    return f"enorm:deployment:{{{_tag(server_id, 'server id')}}}:intent"


def lease_key(server_id: str) -> str:
    """Who carries an offload in flight, while the key lives (Redis's own expiry)."""
    return f"enorm:deployment:{{{_tag(server_id, 'server id')}}}:lease"


def intents_key(k: int) -> str:
    return f"enorm:{{ledger:{k}}}:intents"


@dataclass(frozen=True)
class Intent:
    """An offload in flight: the record it will have, the server a handover moves its
    users from (None: from the cloud), and whether its node redirects them."""

    entry: Entry
    handed_over_from: str | None = None
    intercepted: bool = False

    def to_json(self) -> str:
        return json.dumps({"entry": json.loads(self.entry.to_json()),
                           "handed_over_from": self.handed_over_from,
                           "intercepted": self.intercepted})

    @classmethod
    def from_json(cls, raw: bytes | str) -> Intent:
        d = json.loads(raw)
        return cls(Entry.from_json(json.dumps(d["entry"])), d["handed_over_from"],
                   d["intercepted"])


def shard(server_id: str) -> int:
    return zlib.crc32(server_id.encode()) % SHARDS


def _tag(value: str, what: str) -> str:
    if not value or "{" in value or "}" in value:
        raise ValueError(f"{what} {value!r}: empty, or braces that would change the "
                         "key's hash tag")
    return value


def _text(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


class Ledger:
    def __init__(self, redis: datasync.Client) -> None:
        self.r = redis

    def record(self, e: Entry, retry_s: float = RETRY_S) -> None:
        """The deployment, then its users' pointers (module docstring: the order); tried
        again for `retry_s` through a master's failover (writing it twice changes
        nothing)."""
        datasync.through_failover(lambda: self._record(e), retry_s)

    def _record(self, e: Entry) -> None:
        sid = e.server_id
        if not self.r.eval(RECORD, 2, deployment_key(sid), ended_key(sid), e.to_json()):
            raise Ended(sid)
        self.r.sadd(index_key(shard(sid)), sid)
        self._point({u: e for u in e.user_ids})

    def _point(self, pointers: dict[str, Entry]) -> None:
        """Point the users at their entries, then check that none of those ended
        meanwhile: a `forget` or `fence` that came between takes back what was written
        here (a pointer never outlives its deployment), and `Ended` names the first."""
        if not pointers:
            return
        pipe = self.r.pipeline(transaction=False)
        for u, e in pointers.items():
            pipe.set(user_key(u), e.served.encode())
        pipe.execute()
        sids = sorted({e.server_id for e in pointers.values()})
        pipe = self.r.pipeline(transaction=False)
        for sid in sids:
            pipe.exists(ended_key(sid))
            pipe.exists(deployment_key(sid))
        replies = pipe.execute()
        gone = [sid for sid, ended, there in zip(sids, replies[::2], replies[1::2], strict=True)
                if ended or not there]
        for sid in gone:
            self._unpoint(sid, [u for u, e in pointers.items() if e.server_id == sid])
        if gone:
            raise Ended(gone[0])

    def _unpoint(self, server_id: str, users: list[str]) -> None:
        """The users' pointers that still name `server_id` deleted."""
        keys = [user_key(u).encode() for u in users]
        run_jobs(self.r, [Job(keys, eval_command(DELETE_IF, lambda _: [server_id]))],
                 "source")

    def fence(self, server_id: str, ttl_s: float = ENDED_TTL_S) -> bool:
        """Mark a server the ledger does not know as ended, so that no record of it can
        follow (`record` raises `Ended`): True, unless it was recorded first (then it is
        known, and nothing was marked)."""
        return bool(self.r.eval(FENCE, 2, deployment_key(server_id), ended_key(server_id),
                                int(ttl_s), "orphan"))

    def finish(self, e: Entry) -> int:
        """What a `record` cut half-way left undone, done: the deployment listed, its
        users' pointers written where they are missing or name an older deployment."""
        self.r.sadd(index_key(shard(e.server_id)), e.server_id)
        return self.repair([e])

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
        """Drop a deployment, and its users' pointers unless they moved on meanwhile;
        marked ended first, so that a record or repair running meanwhile takes back the
        pointers it writes (`_point`)."""
        self.r.set(ended_key(server_id), "withdrawn", ex=ENDED_TTL_S)
        e = self.get(server_id)
        if e is not None and e.users:
            self._unpoint(server_id, e.user_ids)
        pipe = self.r.pipeline(transaction=False)
        pipe.delete(deployment_key(server_id))
        pipe.srem(index_key(shard(server_id)), server_id)
        pipe.execute()

    def repair(self, entries: list[Entry] | None = None) -> int:
        """Finish what a process killed half-way through `record` left: a deployment
        whose users' pointers are missing, or name a deployment that is gone or older,
        gets them; how many pointers were written. Of `entries`, else the whole ledger
        (run that after a cloud-manager process died, not on every command; the orphans'
        reconcile repairs the young deployments it finds on the nodes)."""
        entries = self.all() if entries is None else entries
        created: dict[str, float | None] = {e.server_id: e.created_at for e in entries}
        fix: dict[str, Entry] = {}
        for e in entries:
            now = datasync.mget(self.r, [user_key(u) for u in e.user_ids])
            for u, raw in zip(e.user_ids, now, strict=True):
                sid = None if raw is None else Served.server_of(raw)
                if sid is not None and sid not in created:  # a deployment not read yet
                    other = self.get(sid)
                    created[sid] = None if other is None else other.created_at
                held = None if sid is None else created[sid]
                if held is None or held < e.created_at:
                    fix[u] = e
        if fix:
            def write() -> None:
                try:
                    self._point(fix)
                except Ended:  # withdrawn meanwhile: its pointers were taken back
                    pass
            datasync.through_failover(write)
        return len(fix)

    # -- offloads in flight --------------------------------------------------------------
    def intend(self, intent: Intent, owner: str, lease_s: float) -> None:
        """An offload in flight, its lease `owner`'s for `lease_s`: the intent and the
        lease (one slot), then its listing (an intent cut before it is listed is never
        taken; its server, not leased, is left to the orphans' grace)."""
        sid = intent.entry.server_id
        pipe = self.r.pipeline(transaction=False)
        pipe.set(intent_key(sid), intent.to_json(), ex=ENDED_TTL_S)
        pipe.set(lease_key(sid), owner, px=_ms(lease_s))
        pipe.execute()
        self.r.sadd(intents_key(shard(sid)), sid)

    def renew(self, server_ids: list[str], owner: str, lease_s: float) -> list[str]:
        """The leases of `server_ids` extended by `lease_s` (taken again if they lapsed
        and nobody took them); those another process took over (or carried on already)
        are returned."""
        if not server_ids:
            return []
        pipe = self.r.pipeline(transaction=False)
        for sid in server_ids:
            pipe.execute_command("EVAL", RENEW, 2, lease_key(sid), intent_key(sid), owner,
                                 _ms(lease_s))
        return [sid for sid, ok in zip(server_ids, pipe.execute(), strict=True) if not ok]

    def release(self, server_id: str) -> None:
        """The offload is done (its users sent) or its server ended: no intent left."""
        pipe = self.r.pipeline(transaction=False)
        pipe.delete(intent_key(server_id))
        pipe.delete(lease_key(server_id))
        pipe.srem(intents_key(shard(server_id)), server_id)
        pipe.execute()

    def leased(self, server_ids: list[str]) -> list[bool]:
        """Whether each server's offload is in flight, its owner alive."""
        pipe = self.r.pipeline(transaction=False)
        for sid in server_ids:
            pipe.exists(lease_key(sid))
        return [bool(x) for x in pipe.execute()] if server_ids else []

    def in_flight(self, server_ids: list[str]) -> list[bool]:
        """Whether each server's offload is still in flight: its intent not released yet
        (by its owner, or by the process that took it over, once it is done)."""
        pipe = self.r.pipeline(transaction=False)
        for sid in server_ids:
            pipe.exists(intent_key(sid))
        return [bool(x) for x in pipe.execute()] if server_ids else []

    def lapsed(self, k: int) -> list[Intent]:
        """The intents of shard `k` whose lease expired: offloads whose owner died (or
        stalled for a whole lease). Listed ids without an intent are unlisted."""
        sids = sorted(_text(s) for s in self.r.smembers(intents_key(k)))
        if not sids:
            return []
        pipe = self.r.pipeline(transaction=False)
        for sid in sids:
            pipe.get(intent_key(sid))
            pipe.exists(lease_key(sid))
        replies = pipe.execute()
        out, gone = [], []
        for sid, raw, live in zip(sids, replies[::2], replies[1::2], strict=True):
            if raw is None:
                gone.append(sid)
            elif not live:
                out.append(Intent.from_json(raw))
        if gone:
            self.r.srem(intents_key(k), *gone)
        return out

    def take(self, server_id: str, owner: str, lease_s: float) -> bool:
        """The lapsed offload `server_id` taken by `owner` for `lease_s` (one process
        does): True if it is now `owner`'s."""
        return bool(self.r.set(lease_key(server_id), owner, nx=True, px=_ms(lease_s)))

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


class Intents:
    """This process's offloads in flight (`Ledger.intend`), their leases renewed on a
    thread of their own every third of a lease, until `stop`; an offload whose lease
    was lost (this process stalled a whole lease, and another took it) is dropped from
    `held` and named in `lost`: its taker carries it on.

    A renewal that fails is tried again every `RENEW_RETRY_S`, within the lease, so that
    a live owner keeps its leases through an outage shorter than two thirds of a lease
    (less a retry): a master's failover, if the lease (`offload_lease_s`) is longer than
    1.5 times the cluster's failover time (its `cluster-node-timeout` plus an election:
    about 4 s for 2 s, about 17 s for Redis's default 15 s; 3 times, to hold also when
    the master died before its replica had the last renewal). A process cut off from
    the cluster for longer loses them: the others carry its offloads on, and what it
    writes late is refused (`Ended`, `Lapsed`)."""

    def __init__(self, ledger: Ledger, lease_s: float = LEASE_S) -> None:
        if not lease_s > 0:
            raise ValueError("lease_s must be > 0")
        self.ledger, self.lease_s = ledger, lease_s
        self.owner = secrets.token_hex(8)
        self.held: set[str] = set()
        self.lost: set[str] = set()
        # held, over (users sent, or server ended), their release not answered: renewed
        # until it is, so that nobody takes over (and redirects again) a finished offload
        self.over: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def begin(self, intent: Intent) -> None:
        self.ledger.intend(intent, self.owner, self.lease_s)
        with self._lock:
            self.held.add(intent.entry.server_id)

    def holds(self, server_id: str) -> bool:
        with self._lock:
            return server_id in self.held

    def keep(self, server_id: str) -> None:
        """Right before the users are sent: the lease renewed, so that nobody takes the
        offload over for a lease (a redirect is sent once); `Lapsed` if it was taken,
        or if the renewal's answer came so late (a failover, a partition healing) that
        less than two thirds of the lease may be left for the redirect: the lease runs
        from when the renewal was sent at the earliest, so it is then left to lapse, and
        the taker redirects (`CloudUnreachable` if the cloud Redis did not answer: left
        to lapse too)."""
        with self._lock:
            if server_id not in self.held:
                if server_id in self.lost:
                    raise Lapsed(server_id)
                return  # not in flight here (a taker's own completion)
        sent = time.monotonic()
        try:
            lost = self.ledger.renew([server_id], self.owner, self.lease_s)
        except UNREACHABLE as exc:
            self.drop(server_id)
            raise CloudUnreachable(f"renewing the lease of {server_id}", exc) from exc
        if lost or time.monotonic() - sent > self.lease_s / 3:
            with self._lock:
                self.held.discard(server_id)
                self.lost.add(server_id)
            raise Lapsed(server_id)

    def drop(self, server_id: str) -> None:
        """No longer renewed (its redirect failed here, or its record's outcome is not
        known): its lease lapses, and another process's reconcile carries it on."""
        with self._lock:
            self.held.discard(server_id)

    def end(self, server_id: str) -> None:
        """Its offload is over (its users sent, or its server ended here): the intent
        released. If the cloud Redis does not answer, the release is tried again at each
        renewal, its lease renewed meanwhile; an outage longer than the lease lets it
        lapse, and the process that takes it over completes it again (its users sent
        again: the app's redirect must be idempotent) or finds its server ended."""
        with self._lock:
            if server_id not in self.held:
                return
            self.held.discard(server_id)
        try:
            self.ledger.release(server_id)
        except UNREACHABLE as exc:
            log.warning("offload of %s: its intent was not released (%s); released at "
                        "the next renewal", server_id, exc)
            with self._lock:
                self.held.add(server_id)
                self.over.add(server_id)

    def renew(self) -> None:
        """The leases held renewed (those another process took are named in `lost`),
        then the releases that were not answered (`end`) tried again."""
        with self._lock:
            held = sorted(self.held)
        lost = self.ledger.renew(held, self.owner, self.lease_s)
        with self._lock:
            if lost:
                log.warning("offloads %s: their leases were lost (taken over)", lost)
                self.held.difference_update(lost)
                self.lost.update(lost)
                self.over.difference_update(lost)
            over = sorted(self.over)
        for sid in over:
            self.ledger.release(sid)
            with self._lock:
                self.over.discard(sid)
                self.held.discard(sid)

    def _run(self) -> None:
        every, failing = self.lease_s / 3, False
        wait = every
        while not self._stop.wait(wait):
            try:
                self.renew()
            except Exception as exc:  # a failover, a partition: again soon, within a lease
                if not failing:  # once an outage, not every retry
                    log.warning("renewing the offloads' leases failed (%s: %s); trying "
                                "again every %g s", type(exc).__name__, exc, RENEW_RETRY_S)
                failing, wait = True, min(RENEW_RETRY_S, every)
                continue
            if failing:
                log.info("the offloads' leases are renewed again")
            failing, wait = False, every

    def start(self) -> Intents:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name="enorm-intents")
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
