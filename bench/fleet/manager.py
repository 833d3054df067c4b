"""One cloud-manager process of the fleet bench: the library's `CloudManager` over every
simulated node, sharing the registry and the ledger in the cluster with the other
processes. It runs the heartbeats (its share of the turns) and offloads: groups of users
taken from a counter the processes share, placed among all the nodes (scored: the
registry's rank, then the probes of the best few), admitted by a node (the real
handshake against the simulated node), in flight under a lease (`start_intents`),
recorded in the ledger, redirected (the bench's app counts each group's redirects);
with `--orphans-interval` it runs its share of the orphans' reconcile too, which also
takes over the offloads of a process that died (cloud_manager/orphans.py). No container
is behind a simulated node, so an offload is the handshake, the ledger and the redirect:
the SSH deploy and the data copy are measured elsewhere (bench.deployment,
bench.datasync). Each worker withdraws its oldest deployment once it holds `keep`, so
the fleet does not fill up.

The offloads start when the bench sets `fleet:go`; at SIGTERM (or after `--duration` s)
the process writes what it measured as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import threading
import time
from collections import deque
from pathlib import Path

import redis
import requests
from requests.adapters import HTTPAdapter

from bench.fleet.nodes import names as node_names
from cloud_manager import App, CloudManager, EdgeClient, EdgeError, NoEdgeAvailable
from cloud_manager.ledger import Ended, Entry, Lapsed, Ledger
from cloud_manager.registry import Registry
from enorm import datasync
from enorm.protocol import DataSink, User

# The bench's own keys: which group of users is next; the offloads start once GO exists.
GROUP_COUNTER = "fleet:groups"
GO = "fleet:go"
TOKEN = "fleet-bench-token"


def edges(sims: list[tuple[int, int, int]]) -> list[EdgeClient]:
    """An EdgeClient per simulated node. They share one pooled HTTP session: one loopback
    port per simulator process, one token for all (10,000 sessions would hold 10,000
    connection pools)."""
    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {TOKEN}"
    http.mount("http://", HTTPAdapter(pool_connections=16, pool_maxsize=128))
    out = []
    for port, first, count in sims:
        for name in node_names(first, count):
            e = EdgeClient(f"http://127.0.0.1:{port}/n/{name}", TOKEN, name=name, retries=0,
                           timeout=2.0, setup_timeout=5.0, terminate_timeout=5.0)
            e.http.close()
            e.http = http
            out.append(e)
    return out


def redirected_key(first_user: str) -> str:
    """How many times a group (named by its first user) was redirected: exactly once."""
    return f"fleet:redirected:{{{first_user}}}"


def app(cloud: redis.RedisCluster) -> App:
    """The bench's app: no server behind it; its redirect counts, per group."""
    return App(name="fleet", port=8000, files={}, command=["true"], env=lambda ctx: {},
               redirect=lambda users, url: cloud.incr(redirected_key(users[0])),
               restore=lambda users: None)


class Worker:
    def __init__(self, cm: CloudManager, ledger: Ledger, group: int, keep: int,
                 stop: threading.Event) -> None:
        self.cm, self.ledger, self.group, self.keep, self.stop = cm, ledger, group, keep, stop
        self.held: deque[tuple[EdgeClient, str]] = deque()
        self.offload_s: list[tuple[float, float]] = []  # (when it ended, seconds)
        self.failed: dict[str, int] = {}
        self.placement_ms: list[dict] = []  # the placement's own timings (total, probes)

    def count(self, kind: str) -> None:
        self.failed[kind] = self.failed.get(kind, 0) + 1
        time.sleep(0.05)

    def run(self) -> None:
        r = self.cm.cloud
        while not self.stop.is_set() and not r.exists(GO):
            self.stop.wait(0.2)
        while not self.stop.is_set():
            try:
                g = int(r.incr(GROUP_COUNTER)) - 1
            except redis.RedisError:  # a master failing over
                time.sleep(0.1)
                continue
            users = [User(id=f"u{g * self.group + i}", address=f"198.18.{(g >> 8) & 255}."
                          f"{g & 255}") for i in range(self.group)]
            t0 = time.perf_counter()
            try:  # admitted, and in flight (its intent leased) until its users are sent
                dep = self.cm.admit(users, (), None, {})
            except (NoEdgeAvailable, EdgeError, datasync.SyncError, redis.RedisError,
                    OSError) as exc:
                self.count(type(exc).__name__)
                continue
            try:
                self.ledger.record(Entry(server_id=dep.server_id, node=dep.edge.name,
                                         app="fleet", url=dep.url, users=users))
            except (redis.RedisError, Ended) as exc:  # not recorded: not kept either
                # (Ended: a failover held the record past its lease, and another process
                # ended it)
                self.count("record_ended" if isinstance(exc, Ended) else "record_failed")
                self.cm.abandon(dep, restore=False)
                continue
            try:
                self.cm.send_users(dep)  # the redirect (counted), the intent released
            except Lapsed:  # another process completes it
                self.count("lapsed")
                continue
            except redis.RedisError:  # left to lapse: another process completes it
                self.count("redirect_failed")
                continue
            self.offload_s.append((time.time(), time.perf_counter() - t0))
            self.placement_ms.append(dep.placement["ms"])
            with self.cm.lock:
                self.cm.deployments.pop(dep.server_id, None)  # the ledger holds it
            self.held.append((dep.edge, dep.server_id))
            while len(self.held) > self.keep:
                edge, sid = self.held.popleft()
                try:
                    edge.terminate(sid)
                    self.ledger.forget(sid)
                except (EdgeError, redis.RedisError):
                    pass  # a node down: its server stays there (and in the ledger)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--redis", required=True)
    ap.add_argument("--sims", required=True, help="port:first:count,...")
    ap.add_argument("--name", default=f"m{os.getpid()}")
    ap.add_argument("--interval", type=float, default=5.0)
    ap.add_argument("--max-rate", type=float, default=200.0)
    ap.add_argument("--down-after", type=float, default=15.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--group", type=int, default=100)
    ap.add_argument("--keep", type=int, default=10)
    ap.add_argument("--duration", type=float, default=3600.0)
    ap.add_argument("--orphans-interval", type=float, default=0.0, help="0: no reconcile")
    ap.add_argument("--orphans-grace", type=float, default=300.0)
    ap.add_argument("--orphans-rate", type=float, default=200.0)
    ap.add_argument("--lease", type=float, default=5.0, help="an offload in flight's lease")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    sims = [tuple(int(x) for x in s.split(":")) for s in a.sims.split(",")]
    cloud = datasync.connect(a.redis, cluster=True)
    registry = Registry(cloud, down_after_s=a.down_after)
    fleet = edges(sims)
    cm = CloudManager(fleet, app(cloud), cloud_redis=cloud,
                      sink=DataSink(url=a.redis, cluster=True), registry=registry,
                      placement="scored", probe_sample=8)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    beats = cm.start_heartbeats(a.interval, timeout_s=2.0, max_rate=a.max_rate)
    print(f"ready {a.name} {len(fleet)} period {beats.period_s:g} ttl {beats.ttl_s:g}",
          flush=True)
    ledger = Ledger(cloud)
    cm.start_intents(ledger, a.lease)
    orphans = (cm.start_orphans(ledger, a.orphans_interval, a.orphans_grace, a.orphans_rate)
               if a.orphans_interval > 0 else None)
    workers = [Worker(cm, ledger, a.group, a.keep, stop) for _ in range(a.workers)]
    threads = [threading.Thread(target=w.run, daemon=True) for w in workers]
    t0 = time.time()
    for t in threads:
        t.start()
    stop.wait(a.duration)
    stop.set()
    # One deadline for every worker, so that the process ends well within the bench's
    # wait (60 s) even when an offload hangs on a master failing over: what a worker left
    # unfinished is counted, what it finished is kept.
    deadline = time.monotonic() + 20.0
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    unfinished = sum(t.is_alive() for t in threads)
    elapsed = time.time() - t0
    beats.stop()
    if orphans is not None:
        orphans.stop()
    failed: dict[str, int] = {}
    for w in workers:
        for k, v in w.failed.items():
            failed[k] = failed.get(k, 0) + v
    a.out.write_text(json.dumps({
        "name": a.name, "nodes": len(fleet), "elapsed_s": elapsed,
        "period_s": beats.period_s, "ttl_s": beats.ttl_s, "turns_won": beats.turns_won,
        "offload_s": [s for w in workers for s in w.offload_s],
        "placement_ms": [m for w in workers for m in w.placement_ms], "failed": failed,
        "orphans": dict(orphans.counts) if orphans else None,
        "workers_unfinished_at_stop": unfinished,
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    os._exit(0)  # the daemon threads (heartbeat pools) need not be joined


if __name__ == "__main__":
    main()
