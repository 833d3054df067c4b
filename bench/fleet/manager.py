"""One cloud-manager process of the fleet bench: the library's `CloudManager` over every
simulated node, sharing the registry and the ledger in the cluster with the other
processes. It runs the heartbeats (its share of the turns) and offloads: groups of users
of its own (named after the process and the worker), placed among all the nodes (scored:
the registry's rank, then the probes of the best few), admitted by a node (the real
handshake against the simulated node), in flight under a lease (`start_intents`),
recorded in the ledger, redirected (the bench's app tells the first simulator, which
counts each group's redirects);
with `--orphans-interval` it runs its share of the orphans' reconcile too, which also
takes over the offloads of a process that died (cloud_manager/orphans.py). No container
is behind a simulated node, so an offload is the handshake, the ledger and the redirect:
the SSH deploy and the data copy are measured elsewhere (bench.deployment,
bench.datasync; `--deploy` holds each offload that long in their place). Each worker
withdraws its oldest deployment once it holds `keep`, so the fleet does not fill up.

The offloads start when the bench sets `fleet:go`; at SIGTERM (or after `--duration` s)
the process writes what it measured as JSON.
"""

from __future__ import annotations

import argparse
import faulthandler
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
from cloud_manager import (
    App,
    CloudManager,
    CloudUnreachable,
    Deployment,
    EdgeClient,
    EdgeError,
    NoEdgeAvailable,
)
from cloud_manager.ledger import UNREACHABLE, Ended, Entry, Lapsed, Ledger
from cloud_manager.registry import Registry
from enorm import datasync
from enorm.protocol import DataSink, User

# The bench's own key: the offloads start once it exists.
GO = "fleet:go"
TOKEN = "fleet-bench-token"
# What the cloud Redis raises when it does not answer, or refuses (a failover, a partition).
REDIS_DOWN = (redis.RedisError, *UNREACHABLE)


def edges(sims: list[tuple[int, int, int]], host: str = "127.0.0.1") -> list[EdgeClient]:
    """An EdgeClient per simulated node. They share one pooled HTTP session: one port per
    simulator process (on `host`), one token for all (10,000 sessions would hold 10,000
    connection pools)."""
    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {TOKEN}"
    http.mount("http://", HTTPAdapter(pool_connections=16, pool_maxsize=128))
    out = []
    for port, first, count in sims:
        for name in node_names(first, count):
            e = EdgeClient(f"http://{host}:{port}/n/{name}", TOKEN, name=name, retries=0,
                           timeout=2.0, setup_timeout=5.0, terminate_timeout=5.0)
            e.http.close()
            e.http = http
            out.append(e)
    return out


def app(redirects: str, name: str) -> App:
    """The bench's app: no server behind it; its redirect is told to the first simulator
    (`redirects`: its URL), which keeps each (the group's first user, this process, when)
    for the bench to count: a group is redirected exactly once."""
    http = requests.Session()

    def redirect(users: list[str], url: str) -> None:
        http.post(redirects, json={"group": users[0], "by": name}, timeout=5).raise_for_status()

    return App(name="fleet", port=8000, files={}, command=["true"], env=lambda ctx: {},
               redirect=redirect, restore=lambda users: None)


class Worker:
    def __init__(self, cm: CloudManager, ledger: Ledger, group: int, keep: int,
                 stop: threading.Event, deploy_s: float = 0.0, name: str = "w") -> None:
        self.cm, self.ledger, self.group, self.keep, self.stop = cm, ledger, group, keep, stop
        self.deploy_s, self.name = deploy_s, name  # (its groups' users are named after it)
        self.held: deque[tuple[EdgeClient, str]] = deque()
        self.offload_s: list[tuple[float, float]] = []  # (when it ended, seconds)
        self.failed: dict[str, int] = {}
        # each offload that failed: (why, when it started, how long it took to fail)
        self.failures: list[tuple[str, float, float]] = []
        self.placement_ms: list[dict] = []  # the placement's own timings (total, probes)

    def count(self, kind: str, t0: float) -> None:
        self.failed[kind] = self.failed.get(kind, 0) + 1
        self.failures.append((kind, t0, round(time.time() - t0, 3)))
        time.sleep(0.05)

    def record(self, dep: Deployment) -> None:
        self.ledger.record(Entry(server_id=dep.server_id, node=dep.edge.name, app="fleet",
                                 url=dep.url, users=dep.users))

    def run(self) -> None:
        r = self.cm.cloud
        while not self.stop.is_set():
            try:
                if r.exists(GO):
                    break
            except REDIS_DOWN:
                pass
            self.stop.wait(0.2)
        g = 0
        while not self.stop.is_set():
            t0, t = time.time(), time.perf_counter()
            users = [User(id=f"{self.name}.{g}.{i}", address=f"198.18.{(g >> 8) & 255}."
                          f"{g & 255}") for i in range(self.group)]
            g += 1
            try:  # admitted, and in flight (its intent leased) until its users are sent
                dep = self.cm.admit(users, (), None, {})
            except (NoEdgeAvailable, EdgeError, datasync.SyncError, OSError,
                    *REDIS_DOWN) as exc:
                self.count(type(exc).__name__, t0)
                continue
            self.stop.wait(self.deploy_s)  # (the SSH deploy and the data copy)
            try:  # recorded, else ended; if the cluster did not answer, left to its lease
                self.cm.record(dep, self.record, restore=False)
            except (CloudUnreachable, Ended, redis.RedisError) as exc:
                # (Ended: its lease lapsed, and another process ended it)
                self.count("record_ended" if isinstance(exc, Ended) else
                           "record_unreachable" if isinstance(exc, CloudUnreachable)
                           else "record_failed", t0)
                continue
            try:
                self.cm.send_users(dep)  # the redirect (counted), the intent released
            except Lapsed:  # another process completes it
                self.count("lapsed", t0)
                continue
            except (requests.RequestException, *REDIS_DOWN):  # left to lapse: another
                self.count("redirect_failed", t0)  # process completes it
                continue
            self.offload_s.append((time.time(), time.perf_counter() - t))
            self.placement_ms.append(dep.placement["ms"])
            with self.cm.lock:
                self.cm.deployments.pop(dep.server_id, None)  # the ledger holds it
            self.held.append((dep.edge, dep.server_id))
            while len(self.held) > self.keep:
                edge, sid = self.held[0]
                try:  # out of the ledger first: no user is pointed at a server gone
                    self.ledger.forget(sid)
                except REDIS_DOWN:
                    break  # the cluster out of reach: withdrawn later
                self.held.popleft()
                try:
                    edge.terminate(sid)
                except EdgeError:
                    pass  # a node down: an orphan to the reconcile once it is back


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
    ap.add_argument("--lease", type=float, default=8.0, help="an offload in flight's lease")
    ap.add_argument("--deploy", type=float, default=0.0,
                    help="seconds each offload is held between admission and record")
    ap.add_argument("--sim-host", default="127.0.0.1", help="the simulators' address")
    ap.add_argument("--redis-timeout", type=float, default=5.0,
                    help="the cluster client's socket timeout (its connect timeout: 2 s "
                    "at most)")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    sims = [tuple(int(x) for x in s.split(":")) for s in a.sims.split(",")]
    cloud = datasync.connect(a.redis, cluster=True, timeout=a.redis_timeout)
    registry = Registry(cloud, down_after_s=a.down_after)
    fleet = edges(sims, a.sim_host)
    cm = CloudManager(fleet, app(f"http://{a.sim_host}:{sims[0][0]}/ctl/redirect", a.name),
                      cloud_redis=cloud,
                      sink=DataSink(url=a.redis, cluster=True), registry=registry,
                      placement="scored", probe_sample=8)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    faulthandler.register(signal.SIGUSR1)  # every thread's stack to the log, on demand
    beats = cm.start_heartbeats(a.interval, timeout_s=2.0, max_rate=a.max_rate)
    ledger = Ledger(cloud)
    intents = cm.start_intents(ledger, a.lease)
    print(f"ready {a.name} {len(fleet)} period {beats.period_s:g} ttl {beats.ttl_s:g} "
          f"owner {intents.owner}", flush=True)
    orphans = (cm.start_orphans(ledger, a.orphans_interval, a.orphans_grace, a.orphans_rate)
               if a.orphans_interval > 0 else None)
    workers = [Worker(cm, ledger, a.group, a.keep, stop, a.deploy, f"{a.name}.{i}")
               for i in range(a.workers)]
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
        "failures": [f for w in workers for f in w.failures],
        "orphans": dict(orphans.counts) if orphans else None,
        "workers_unfinished_at_stop": unfinished,
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    os._exit(0)  # the daemon threads (heartbeat pools) need not be joined


if __name__ == "__main__":
    main()
