"""The node registry: which edge nodes there are, what each offers, whether it is up.

It lives in the cloud Redis (standalone or a Redis Cluster), so that several
cloud-manager processes share one view, and it spreads over the cluster's slots: each
node's state is its own key under the node's hash tag (`enorm:node:{<name>}`), and the
index that lists the nodes is cut into `SHARDS` sorted sets (`enorm:{registry:<k>}:nodes`,
node -> the time it counts as down), so no slot holds the whole fleet and "who is up" is
a range read per shard, not a read of every node. What placement reads is cut into
`RANK_SHARDS` larger pieces, each a hash of summaries (node -> when it counts as down,
what placement ranks it by) and a rank (node -> its cost but the latency), so that a
placement reads the best few of each piece in a few commands. Writes are retried through
a master's failover.

Heartbeats come from the configured list: the cloud manager asks each node for its
offer (`GET /v1/node`: free resources, unit, load, admission policy); the node needs no
route to the cloud for it. The rate is bounded, as Nomad bounds its heartbeats: each
node is asked once per period `T = max(interval_s, nodes / max_rate)`, so the fleet's
total stays under `max_rate` requests/s however many nodes there are. The period is cut
into one turn per shard, numbered on the wall clock; at each turn the processes sharing
the registry race for the turn's lease (`enorm:{registry:<k>}:poll:<turn>`, taken once)
and the winner asks the shard's nodes, so the
polling is shared between them and the work of a process that died is taken by the
others at its next turn. A node counts as down `ttl = max(down_after_s, 2 T + timeout)`
after its last answer (one missed heartbeat is tolerated): that is the detection bound.
Its running servers are left alone: an edge server keeps serving its users while the
cloud cannot see its node.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import redis
from redis.crc import key_slot

from enorm import datasync
from enorm.datasync.transport import masters
from enorm.protocol import NodeOffer

from .edge_client import EdgeClient, EdgeError
from .placement import Summary, Weights, base_cost

log = logging.getLogger(__name__)

# How many pieces the index and the polling are cut into: enough that a 3-master cluster
# gets about a third each, few enough that listing the fleet is one pipelined round trip.
SHARDS = 64
# A node that was never seen sits in the index with this score (never up).
NEVER = 0.0


# How many pieces the placement's view is cut into (`rank_key`, `summary_key`): fewer than
# the index, so that a placement's reading is a few commands (one per piece and round).
RANK_SHARDS = 16


def _rank_tag(j: int) -> str:
    """The hash tag of rank shard `j`: the first `rank:<j>.<n>` whose slot is in the j-th
    sixteenth of the slot space, so that the pieces spread evenly over any masters that
    hold contiguous ranges of slots (as a cluster is created)."""
    n = 0
    while key_slot(f"rank:{j}.{n}".encode()) * RANK_SHARDS // 16384 != j:
        n += 1
    return f"rank:{j}.{n}"


RANK_TAGS = tuple(_rank_tag(j) for j in range(RANK_SHARDS))

# KEYS: a rank shard's rank and its summaries; ARGV: now, an offset into the rank, how
# many. The next ARGV[3] nodes of the rank from the offset that are up (the time in their
# summary not past), as {the offset after them (-1: the rank ended), node, score, "down
# summary", ...}; the nodes down that it passes leave the rank (their next answer puts
# them back).
RANKED = """
local now, at, want = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local out, found = {0}, 0
while found < want do
  local page = redis.call('ZRANGE', KEYS[1], at, at + want - 1, 'WITHSCORES')
  local names = {}
  for i = 1, #page, 2 do names[#names + 1] = page[i] end
  if #names == 0 then out[1] = -1; return out end
  local sums = redis.call('HMGET', KEYS[2], unpack(names))
  local gone = {}
  for j, n in ipairs(names) do
    local down, summary = string.match(sums[j] or '', '^(%S+) (.*)$')
    if not (down and tonumber(down) >= now) then
      gone[#gone + 1] = n
    elseif found < want then
      out[#out + 1] = n; out[#out + 1] = page[2 * j]; out[#out + 1] = sums[j]
      found, at = found + 1, at + 1
    end
  end
  if #gone > 0 then redis.call('ZREM', KEYS[1], unpack(gone)) end
  if #names < want and found < want then out[1] = -1; return out end
end
out[1] = at
return out
"""
RANKED_SHA = hashlib.sha1(RANKED.encode()).hexdigest()


def shard(name: str) -> int:
    """The index shard (and polling turn) of a node, stable across processes."""
    return zlib.crc32(name.encode()) % SHARDS


def node_key(name: str) -> str:
    """One node's state: under its own hash tag, on its own slot."""
    if "{" in name or "}" in name:
        raise ValueError(f"node name {name!r}: braces would change the key's hash tag")
    return f"enorm:node:{{{name}}}"


def index_key(k: int) -> str:
    """Shard `k` of the index: node -> the time it counts as down (`NEVER`: not seen)."""
    return f"enorm:{{registry:{k}}}:nodes"


def rank_shard(name: str) -> int:
    """A node's piece of the placement's view."""
    return shard(name) % RANK_SHARDS


def summary_key(j: int) -> str:
    """Rank shard `j`'s summaries: node -> when it counts as down and what placement ranks
    it by (`Summary`), so that the placement reads a few hashes, not every node's offer."""
    return f"enorm:{{{RANK_TAGS[j]}}}:summaries"


def rank_key(j: int) -> str:
    """Rank shard `j`'s rank: node -> its `placement.base_cost` (the cost but the
    latency), so that a placement reads the best few of each (`Registry.ranked`)."""
    return f"enorm:{{{RANK_TAGS[j]}}}:rank"


def poll_key(k: int, turn: int, job: str = "poll") -> str:
    """The lease of shard `k`'s turn number `turn` of a job shared between the processes
    (`poll`: the heartbeats; `orphans`: their reconcile), counted on the wall clock, the
    same in every process: taken once, by the process that does it."""
    return f"enorm:{{registry:{k}}}:{job}:{turn}"


def period(nodes: int, interval_s: float, max_rate: float) -> float:
    """The heartbeat period: `interval_s`, stretched so that `nodes` heartbeats fit in
    `max_rate` requests per second."""
    return max(interval_s, nodes / max_rate)


def ttl(down_after_s: float, period_s: float, timeout_s: float) -> float:
    """How long after its last answer a node counts as up: one missed heartbeat is
    tolerated, so the bound for detecting a down node is `2 period + timeout`."""
    return max(down_after_s, 2 * period_s + timeout_s)


@dataclass(frozen=True)
class NodeState:
    """One node as the registry last saw it."""

    name: str
    url: str
    offer: NodeOffer | None  # the last offer it answered with
    seen_at: float | None  # when it last answered
    checked_at: float  # when it was last asked
    error: str | None = None  # why the last question got no offer
    status: int | None = None  # the HTTP status it answered with then (None: no answer)
    ttl_s: float = 0.0  # how long after `seen_at` it counts as up (the heartbeat's bound)

    def up(self, now: float, down_after_s: float) -> bool:
        return self.seen_at is not None and now - self.seen_at <= max(down_after_s,
                                                                      self.ttl_s)

    def down_at(self, down_after_s: float) -> float:
        """When it counts as down if it answers no more (`NEVER` if never seen)."""
        return NEVER if self.seen_at is None else self.seen_at + max(down_after_s, self.ttl_s)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "url": self.url, "seen_at": self.seen_at,
                "checked_at": self.checked_at, "error": self.error, "status": self.status,
                "ttl_s": self.ttl_s,
                "offer": None if self.offer is None else self.offer.model_dump(mode="json")}


@dataclass(frozen=True)
class Answer:
    """What one heartbeat got from one node: an offer, or an error (and the status)."""

    name: str
    url: str
    offer: NodeOffer | None
    error: str | None = None
    status: int | None = None
    at: float | None = None  # when it came (None: when it is recorded)


def _text(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


class Registry:
    """The shared view (reads and writes only the cloud Redis)."""

    def __init__(self, client: Any, down_after_s: float = 15.0,
                 clock: Callable[[], float] = time.time,
                 weights: Weights | None = None) -> None:
        if not down_after_s > 0:
            raise ValueError("down_after_s must be > 0")
        self.r, self.down_after_s, self.clock = client, down_after_s, clock
        # The rank's cost (`rank_key`): the processes sharing a registry share them.
        self.weights = weights or Weights()

    def record(self, name: str, url: str, offer: NodeOffer | None,
               error: str | None = None, status: int | None = None,
               ttl_s: float = 0.0) -> NodeState:
        """What one heartbeat found: an offer (the node is up now) or an error (the
        node keeps its last offer and the time it was last seen; `status`: what it
        answered, e.g. 401 to a token it does not know)."""
        return self.record_many([Answer(name, url, offer, error, status)], ttl_s)[name]

    def record_many(self, answers: Sequence[Answer], ttl_s: float = 0.0
                    ) -> dict[str, NodeState]:
        """A heartbeat turn's answers, written in one pipeline: each node's state and
        its index entry (the nodes without an offer keep their last one: read first)."""
        now = self.clock()  # the answers' time (if they carry none), however late written
        # Through a master's failover (a node recorded late is not a node down).
        return datasync.through_failover(lambda: self._write(answers, now, ttl_s),
                                         ttl_s or self.down_after_s)

    def _write(self, answers: Sequence[Answer], now: float, ttl_s: float
               ) -> dict[str, NodeState]:
        failed = [a.name for a in answers if a.offer is None]
        old = dict(zip(failed, self.states_list(failed), strict=True))
        out, pipe = {}, self.r.pipeline(transaction=False)
        for a in answers:
            at = now if a.at is None else a.at
            if a.offer is not None:
                st = NodeState(a.name, a.url, a.offer, at, at, ttl_s=ttl_s)
            else:
                o = old[a.name]
                st = NodeState(a.name, a.url, o.offer if o else None,
                               o.seen_at if o else None, at, a.error, a.status,
                               o.ttl_s if o else ttl_s)
            pipe.set(node_key(a.name), json.dumps(st.as_dict()))
            if a.offer is not None:
                j, summary, down = rank_shard(a.name), Summary.of(a.offer), st.down_at(
                    self.down_after_s)
                pipe.zadd(index_key(shard(a.name)), {a.name: down})
                pipe.hset(summary_key(j), a.name, f"{down!r} {summary.encode()}")
                pipe.zadd(rank_key(j), {a.name: base_cost(summary, self.weights)})
            else:  # listed, with the bound it had
                pipe.zadd(index_key(shard(a.name)), {a.name: st.down_at(self.down_after_s)},
                          nx=True)
            out[a.name] = st
        pipe.execute()
        return out

    @staticmethod
    def _parse(raw: Any) -> NodeState:
        d = json.loads(raw)
        return NodeState(d["name"], d["url"],
                         None if d["offer"] is None else NodeOffer.model_validate(d["offer"]),
                         d["seen_at"], d["checked_at"], d.get("error"), d.get("status"),
                         d.get("ttl_s", 0.0))

    def get(self, name: str) -> NodeState | None:
        raw = self.r.get(node_key(name))
        return None if raw is None else self._parse(raw)

    def states_list(self, names: Sequence[str]) -> list[NodeState | None]:
        """The states of `names`, in order (None: never recorded), in one read per slot."""
        return [None if raw is None else self._parse(raw)
                for raw in datasync.mget(self.r, [node_key(n) for n in names])]

    def states(self, names: Iterable[str]) -> dict[str, NodeState | None]:
        names = list(names)
        return dict(zip(names, self.states_list(names), strict=True))

    def names(self, up_only: bool = False) -> list[str]:
        """The nodes in the index (only those up now, with `up_only`): a range read per
        shard, pipelined; no node's state is read."""
        pipe = self.r.pipeline(transaction=False)
        lo = self.clock() if up_only else "-inf"
        for k in range(SHARDS):
            pipe.zrangebyscore(index_key(k), lo, "+inf")
        return sorted(n.decode() if isinstance(n, bytes) else n
                      for part in pipe.execute() for n in part)

    def nodes(self) -> dict[str, NodeState]:
        names = self.names()
        return {n: st for n, st in zip(names, self.states_list(names), strict=True)
                if st is not None}

    def up(self, name: str) -> bool:
        st = self.get(name)
        return st is not None and st.up(self.clock(), self.down_after_s)

    def up_among(self, names: Iterable[str]) -> dict[str, NodeState | None]:
        """`names` -> state for the nodes up now, None for the others, in one read."""
        now = self.clock()
        return {n: st if st is not None and st.up(now, self.down_after_s) else None
                for n, st in self.states(names).items()}

    def forget(self, name: str) -> None:
        pipe = self.r.pipeline(transaction=False)
        pipe.delete(node_key(name))
        pipe.zrem(index_key(shard(name)), name)
        pipe.hdel(summary_key(rank_shard(name)), name)
        pipe.zrem(rank_key(rank_shard(name)), name)
        pipe.execute()

    def summaries(self) -> dict[str, Summary]:
        """The nodes up now, each with its `Summary`: a read per rank shard, pipelined."""
        pipe = self.r.pipeline(transaction=False)
        now = self.clock()
        for j in range(RANK_SHARDS):
            pipe.hgetall(summary_key(j))
        out = {}
        for sums in pipe.execute():
            for n, raw in sums.items():
                down, summary = _text(raw).split(" ", 1)
                if float(down) >= now:
                    out[_text(n)] = Summary.decode(summary)
        return out

    @staticmethod
    def first_page(want: int) -> int:
        """How many nodes of each rank shard the first round of `ranked(want)` reads."""
        return 2 * math.ceil(want / RANK_SHARDS) + 2

    def ranked(self, want: int, keep: Callable[[str, Summary], bool],
               rounds: int = 3, head: RankHead | None = None) -> list[tuple[str, Summary]]:
        """Nodes up with their summaries, lowest `base_cost` first: at least the `want`
        best of those `keep` accepts, read from the rank a few per shard, not the whole
        fleet. Each round reads the next page of every shard that may still hold one of
        them (its last node read is below the `want`-th best kept so far), pages twice
        as long each round, one round trip each; after `rounds` (a fleet where `keep`
        refuses nearly all) what was read is all there is. With a `head` that is fresh,
        the first round is its copy (`RankHead`), read from memory: the answer is then as
        of its reading (nodes gone down since are left out)."""
        now, page = self.clock(), self.first_page(want)
        at = dict.fromkeys(range(RANK_SHARDS), 0)  # the next offset into each shard's rank
        last: dict[int, float] = {}
        read: dict[str, tuple[float, Summary]] = {}
        shards = list(range(RANK_SHARDS))
        copy = None if head is None else head.pages(page)
        for r in range(rounds):
            pages = copy if r == 0 and copy is not None else self._pages(shards, now, at, page)
            for k, (offset, rows) in zip(shards, pages, strict=True):
                at[k] = offset
                for score, n, down, s in rows:
                    last[k] = score
                    if down >= now:  # (a head's copy may hold a node gone down since)
                        read.setdefault(n, (score, s))
            kept = sorted(score for n, (score, s) in read.items() if keep(n, s))
            bar = kept[want - 1] if len(kept) >= want else math.inf
            shards = [k for k in shards if at[k] >= 0 and last.get(k, -math.inf) < bar]
            if not shards:
                break
            page *= 2
        return [(n, s) for n, (_, s) in sorted(read.items(), key=lambda x: x[1][0])]

    def _pages(self, shards: list[int], now: float, at: dict[int, int], page: int
               ) -> list[tuple[int, list[tuple[float, str, float, Summary]]]]:
        """One page of each shard's rank (`RANKED`), pipelined: by its SHA (the script
        is not sent 64 times a decision), loaded on every master when one lacks it; per
        shard, the offset after it and its nodes (score, name, when down, summary)."""
        for attempt in (1, 2):
            pipe = self.r.pipeline(transaction=False)
            for k in shards:
                pipe.execute_command("EVALSHA", RANKED_SHA, 2, rank_key(k), summary_key(k),
                                     repr(now), at[k], page)
            try:
                replies = pipe.execute()
                break
            except redis.exceptions.NoScriptError:
                if attempt == 2:
                    raise
                for m in masters(self.r):
                    m.script_load(RANKED)
        out = []
        for reply in replies:
            rows = []
            for i in range(1, len(reply), 3):
                down, summary = _text(reply[i + 2]).split(" ", 1)
                rows.append((float(reply[i + 1]), _text(reply[i]), float(down),
                             Summary.decode(summary)))
            out.append((int(reply[0]), rows))
        return out

    def claim(self, k: int, turn: int, lease_s: float, owner: str, job: str = "poll"
              ) -> bool:
        """True for the one process that does `job` for shard `k` in turn number `turn`."""
        return bool(self.r.set(poll_key(k, turn, job), owner, nx=True,
                               px=max(1, int(lease_s * 1000))))


def run_turns(period_s: float, stop: threading.Event, turn: Callable[[int], Any],
              job: str) -> None:
    """Call `turn(i)` for each turn number `i` as the wall clock reaches it (`SHARDS`
    turns a period, numbered alike in every process), until `stop`; the turns a late
    wake-up passed are taken then (up to a period of them), so that no shard is skipped.
    A turn that fails (the cloud Redis out of reach: the others' turns go on) is logged
    once an outage, not once a turn."""
    step = period_s / SHARDS
    done = math.floor(time.time() / step) - 1  # the last turn taken (by its number)
    failing = False
    while not stop.is_set():
        now = math.floor(time.time() / step)
        for i in range(max(done + 1, now - SHARDS + 1), now + 1):
            if stop.is_set():
                return
            try:
                turn(i)
            except Exception:
                if not failing:
                    log.exception("%s turn failed (logged again once one has run)", job)
                failing = True
                continue
            if failing:
                log.info("%s turns run again", job)
            failing = False
        done = now
        # Sleep to the next turn, plus a jitter so that no process always wins.
        stop.wait(max(0.0, (now + 1) * step - time.time()) + random.uniform(0, step / 4))


class TurnJob:
    """A job done in turns shared between the processes (`run_turns`), on a thread of
    its own between `start` and `stop`; `_run` is the job's loop."""

    thread_name = "enorm-turns"

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name=self.thread_name)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None


class RankHead(TurnJob):
    """The first page of every rank shard (`Registry.ranked`'s first round), read again
    every `every_s` on a thread of its own, so that a placement reads its first round
    from memory, not from the cluster: a decision then waits for no master, and costs
    what ranking a hundred summaries costs. It is as of its reading, at most a few
    `every_s` old (older, it is not used): the summaries it holds change only at each
    node's heartbeat, once a period, and nodes that went down since are left out."""

    thread_name = "enorm-rank-head"

    def __init__(self, registry: Registry, page: int, every_s: float = 0.5) -> None:
        if not every_s > 0:
            raise ValueError("every_s must be > 0")
        super().__init__()
        self.registry, self.page, self.every_s = registry, page, every_s
        # when it was read (monotonic), and what
        self._copy: tuple[float, list[tuple[int, list[Any]]]] | None = None

    def refresh(self) -> None:
        shards = list(range(RANK_SHARDS))
        pages = self.registry._pages(shards, self.registry.clock(), dict.fromkeys(shards, 0),
                                     self.page)
        self._copy = (time.monotonic(), pages)

    def pages(self, page: int) -> list[tuple[int, list[Any]]] | None:
        """The copy, if it is fresh (read within 3 `every_s`) and holds `page` nodes of
        each shard; else None (read from the cluster)."""
        copy = self._copy
        if copy is None or page > self.page or time.monotonic() - copy[0] > 3 * self.every_s:
            return None
        return copy[1]

    def _run(self) -> None:
        failing = False
        while True:
            try:
                self.refresh()
                if failing:
                    log.info("the rank's head is read again")
                failing = False
            except Exception:  # a master failing over: decisions read the cluster
                if not failing:  # once an outage, not every `every_s`
                    log.exception("reading the rank's head (decisions read the cluster)")
                failing = True
            if self._stop.wait(self.every_s):
                return


class Heartbeats(TurnJob):
    """Asks the configured nodes for their offers, at most `max_rate` requests/s across
    the processes sharing the registry, and records the answers (module docstring)."""

    thread_name = "enorm-heartbeats"

    def __init__(self, registry: Registry, edges: Sequence[EdgeClient],
                 interval_s: float = 5.0, timeout_s: float = 2.0,
                 max_rate: float = 200.0, workers: int = 16) -> None:
        if not interval_s > 0:
            raise ValueError("interval_s must be > 0")
        if not max_rate > 0:
            raise ValueError("max_rate must be > 0")
        super().__init__()
        self.registry, self.edges = registry, list(edges)
        self.interval_s, self.timeout_s, self.max_rate = interval_s, timeout_s, max_rate
        self.period_s = period(len(self.edges), interval_s, max_rate)
        self.ttl_s = ttl(registry.down_after_s, self.period_s, timeout_s)
        self.by_shard: dict[int, list[EdgeClient]] = {}
        for e in self.edges:
            self.by_shard.setdefault(shard(e.name), []).append(e)
        self.workers = workers
        self.turns_won = 0  # shards this process polled (the bench reads it)
        self._owner = f"{id(self):x}"
        self._was_up: dict[str, bool] = {}

    def _ask(self, edge: EdgeClient) -> Answer:
        # Each answer keeps its own time: a turn is recorded when its slowest node
        # answered, and the others' down bound must not start later than their answer.
        try:
            offer = edge.offer(timeout=self.timeout_s)
            return Answer(edge.name, edge.url, offer, at=self.registry.clock())
        except EdgeError as exc:
            return Answer(edge.name, edge.url, None, str(exc), exc.status,
                          self.registry.clock())

    def poll(self, edges: Sequence[EdgeClient]) -> dict[str, NodeState]:
        """Ask `edges` now (in parallel) and record the answers."""
        if not edges:
            return {}
        with ThreadPoolExecutor(max(1, min(self.workers, len(edges)))) as pool:
            return self._record(list(pool.map(self._ask, edges)))

    def _record(self, answers: list[Answer]) -> dict[str, NodeState]:
        out = self.registry.record_many(answers, self.ttl_s)
        now = self.registry.clock()
        for a in answers:
            up = out[a.name].up(now, self.registry.down_after_s)
            if self._was_up.get(a.name, True) != up:
                log.warning("edge node %s is %s%s", a.name, "up" if up else "down",
                            "" if up else f" (no offer for {self.ttl_s:g} s: {a.error})")
            self._was_up[a.name] = up
        return out

    def beat(self) -> dict[str, NodeState]:
        """Ask every configured node now (one round, whatever the period)."""
        return self.poll(self.edges)

    def turn(self, i: int, asks: ThreadPoolExecutor | None = None,
             writes: ThreadPoolExecutor | None = None) -> bool:
        """Turn number `i` (shard `i % SHARDS`): if this process wins its lease, ask the
        shard's nodes and record their answers, and say so. With pools, the nodes are
        asked in `asks` and the answers recorded in `writes` once the last came (a
        failing-over cluster holds up the records, not the questions); without, now.
        Lost: another process has it, or this one has no node there."""
        k = i % SHARDS
        edges = self.by_shard.get(k)
        if not edges or not self.registry.claim(k, i, self.period_s, self._owner):
            return False
        self.turns_won += 1
        if asks is None or writes is None:
            self.poll(edges)
            return True
        futures = [asks.submit(self._ask, e) for e in edges]
        left, lock = [len(futures)], threading.Lock()

        def write() -> None:
            try:
                self._record([f.result() for f in futures])
            except Exception:  # the heartbeat outlives a Redis outage; the next turn runs
                log.exception("heartbeat turn %d: recording failed", i)

        def answered(_: Any) -> None:
            with lock:
                left[0] -= 1
                if left[0]:
                    return
            writes.submit(write)

        for f in futures:
            f.add_done_callback(answered)
        return True

    def _run(self) -> None:
        with ThreadPoolExecutor(self.workers, thread_name_prefix="enorm-heartbeat") as asks, \
                ThreadPoolExecutor(4, thread_name_prefix="enorm-heartbeat-record") as writes:
            run_turns(self.period_s, self._stop, lambda i: self.turn(i, asks, writes),
                      "heartbeat")


