"""One run of the fleet bench at one size: the cluster, the simulators and the
cloud-manager processes started, measured in two phases, everything stopped after.

Phase 1, heartbeats only: heartbeat requests/s (counted by the simulators) and Redis
ops/s per node, the busiest master's share of the ops, and the time until the registry
holds a node that went down as down (a few nodes taken down at the phase's start; the
bound is the registry's TTL, `2 period + timeout`). Phase 2, offloads: every process
offloads groups of users (placement among all nodes, handshake, ledger), optionally with
a master killed half-way (`failover`). Then the ledger is filled to `users` users and
`where` is timed, and the memory per node and per user read from the masters.

With `netns` (a network namespace the caller made, whose host end has the address
`host`), the last cloud-manager process runs in it, and `partition` cuts it off from the
cluster and heals it: its packets to and from the cluster's ports are dropped in its
namespace, as a network that loses them would (its calls time out; they do not fail at
once), while the simulated nodes stay in its reach (the cluster and the simulators listen
on `host` too; the cluster announces it).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import requests

from bench.fleet.cluster import Cluster
from bench.fleet.manager import GO
from bench.fleet.nodes import names as node_names
from cloud_manager import ledger as ledger_mod
from cloud_manager import registry as registry_mod
from cloud_manager.ledger import Entry, Ledger
from cloud_manager.placement import Weights, base_cost, order, summary_candidate
from cloud_manager.registry import Registry
from enorm import datasync
from enorm.protocol import User

PER_SIM = 2500  # simulated nodes per asyncio process
FAILOVER_AT = 1 / 3  # how far into the offloads a master is killed (`failover`)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(math.ceil(q * len(xs))) - 1)]


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 2)


class Run:
    def __init__(self, nodes: int, procs: int = 4, interval_s: float = 5.0,
                 max_rate: float = 200.0, workers: int = 2, group: int = 100,
                 churn: float = 0.0, orphans_interval_s: float = 0.0,
                 orphans_grace_s: float = 300.0, orphans_max_rate: float = 200.0,
                 lease_s: float = 8.0, deploy_s: float = 0.0, host: str = "127.0.0.1",
                 netns: str | None = None, redis_timeout_s: float = 5.0) -> None:
        self.nodes, self.procs, self.interval_s = nodes, procs, interval_s
        self.deploy_s, self.host, self.netns = deploy_s, host, netns
        self.redis_timeout_s = redis_timeout_s
        self.orphans_interval_s, self.orphans_grace_s = orphans_interval_s, orphans_grace_s
        self.orphans_max_rate, self.lease_s = orphans_max_rate, lease_s
        self.max_rate, self.workers, self.group, self.churn = max_rate, workers, group, churn
        self.cluster = Cluster(host=host)
        self.tmp = Path(tempfile.mkdtemp(prefix="enorm-fleet-run-"))
        self.sims: list[tuple[int, int, int]] = []
        self.children: list[subprocess.Popen] = []
        self.managers: list[tuple[subprocess.Popen, Path]] = []
        self.owners: list[str] = []  # each manager's owner of its leases (`Intents`)
        self._ready: dict[subprocess.Popen, str] = {}

    # -- starting and stopping ------------------------------------------------------------
    def _spawn(self, args: list[str], log: Path, netns: str | None = None
               ) -> subprocess.Popen:
        # (`ip netns exec` execs the command: the process is the command's own)
        inside = ["ip", "netns", "exec", netns] if netns else []
        p = subprocess.Popen([*inside, sys.executable, "-m", *args], stdout=subprocess.PIPE,
                             stderr=log.open("wb"), text=True)
        self.children.append(p)
        line = p.stdout.readline()
        if not line.startswith("ready"):
            raise RuntimeError(f"{args[0]} did not start: {line!r} {log.read_text()[-2000:]}")
        self._ready[p] = line
        return p

    def start(self) -> Run:
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> Run:
        self.cluster.start()
        self.r = datasync.connect(self.cluster.url, cluster=True)
        for i, first in enumerate(range(0, self.nodes, PER_SIM)):
            port, count = _port(), min(PER_SIM, self.nodes - first)
            self._spawn(["bench.fleet.nodes", "--port", str(port), "--first", str(first),
                         "--count", str(count), "--churn", str(self.churn), "--seed", str(i),
                         "--host", self.host],
                        self.tmp / f"sim{i}.log")
            self.sims.append((port, first, count))
        sims = ",".join(f"{p}:{f}:{c}" for p, f, c in self.sims)
        for i in range(self.procs):
            out = self.tmp / f"m{i}.json"
            p = self._spawn(["bench.fleet.manager", "--redis", self.cluster.url, "--sims", sims,
                             "--name", f"m{i}", "--out", str(out),
                             "--interval", str(self.interval_s),
                             "--max-rate", str(self.max_rate), "--down-after", "1",
                             "--workers", str(self.workers), "--group", str(self.group),
                             "--orphans-interval", str(self.orphans_interval_s),
                             "--orphans-grace", str(self.orphans_grace_s),
                             "--orphans-rate", str(self.orphans_max_rate),
                             "--lease", str(self.lease_s), "--deploy", str(self.deploy_s),
                             "--sim-host", self.host,
                             "--redis-timeout", str(self.redis_timeout_s),
                             "--keep", str(max(1, 2 * self.nodes // (self.procs * self.workers)))],
                            self.tmp / f"m{i}.log",
                            self.netns if i == self.procs - 1 else None)
            self.owners.append(self._ready[p].split(" owner ")[1].strip())
            self.managers.append((p, out))
        self.period_s = registry_mod.period(self.nodes, self.interval_s, self.max_rate)
        self.ttl_s = registry_mod.ttl(1.0, self.period_s, 2.0)
        # an orphan is ended, and an offload in flight whose process died taken over,
        # this long after its handshake (or its last renewal) at most (orphans.py)
        self.orphans_bound_s = (max(self.orphans_grace_s, self.lease_s) + 2 * registry_mod.period(
            self.nodes, self.orphans_interval_s, self.orphans_max_rate) + 2.0
            if self.orphans_interval_s > 0 else None)
        return self

    def stop(self) -> None:
        for p in self.children:
            if p.poll() is None:
                p.kill()
                p.wait()
        self.cluster.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- what the simulators and the masters counted --------------------------------------
    def sim_stats(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for port, _, _ in self.sims:
            for k, v in requests.get(f"http://127.0.0.1:{port}/ctl/stats", timeout=10
                                     ).json()["asked"].items():
                total[k] = total.get(k, 0) + v
        return total

    def sim_for(self, name: str) -> int:
        i = int(name[1:])
        return next(port for port, first, count in self.sims if first <= i < first + count)

    def set_down(self, names: list[str], down: bool) -> float:
        at = time.time()
        for n in names:
            requests.post(f"http://127.0.0.1:{self.sim_for(n)}/ctl/{'down' if down else 'up'}",
                          json={"nodes": [n]}, timeout=10)
        return at

    def window(self, seconds: float, during=None) -> dict:
        """Counts over `seconds`: simulator requests, each master's ops."""
        s0, o0, t0 = self.sim_stats(), self.cluster.ops(replicas=True), time.time()
        if during is not None:
            during()
        time.sleep(max(0.0, seconds - (time.time() - t0)))
        s1, o1, t1 = self.sim_stats(), self.cluster.ops(), time.time()
        dt = t1 - t0
        # a master that failed over: its promoted replica counted from the phase's start
        # (what it applied from its master's stream until then, and served after)
        ops = {p: o1[p] - o0.get(p, 0) for p in o1}
        total = sum(ops.values()) or 1
        return {"seconds": round(dt, 2),
                "requests_per_s": {k: round((s1.get(k, 0) - s0.get(k, 0)) / dt, 2) for k in s1},
                "redis_ops_per_s": round(total / dt, 1),
                "busiest_master_share": round(max(ops.values()) / total, 3),
                "ops_per_master": {str(p): v for p, v in ops.items()}}

    # -- the phases -----------------------------------------------------------------------
    def warm_up(self, timeout: float) -> float:
        """Until the registry has seen every node once (a whole heartbeat period)."""
        reg, t0 = Registry(self.r, down_after_s=1.0), time.time()
        while time.time() - t0 < timeout:
            if len(reg.names(up_only=True)) >= self.nodes * 0.97:
                return time.time() - t0
            time.sleep(0.5)
        raise TimeoutError(f"the registry saw {len(reg.names(up_only=True))} of "
                           f"{self.nodes} nodes in {timeout} s")

    def detection(self, names: list[str], down_at: float, timeout: float) -> list[float]:
        """Seconds from each node's going down until the registry holds it down."""
        reg, found = Registry(self.r, down_after_s=1.0), {}
        while len(found) < len(names) and time.time() - down_at < timeout:
            now = time.time()
            for n, st in reg.up_among([n for n in names if n not in found]).items():
                if st is None:
                    found[n] = now - down_at
            time.sleep(0.1)
        return [found.get(n, math.inf) for n in names]

    def heartbeats(self, seconds: float, down: int = 5) -> dict:
        gone = random.Random(1).sample(node_names(0, self.nodes), down)
        at = self.set_down(gone, True)
        res: dict = {}
        t = threading.Thread(target=lambda: res.update(
            d=self.detection(gone, at, max(seconds, self.ttl_s * 1.5 + 5))))
        t.start()
        w = self.window(seconds)
        t.join()
        self.set_down(gone, False)
        det = res["d"]
        hb = w["requests_per_s"].get("offer", 0.0)
        return {**w, "heartbeat_requests_per_s": hb,
                "heartbeat_requests_per_s_per_node": round(hb / self.nodes, 4),
                "redis_ops_per_s_per_node": round(w["redis_ops_per_s"] / self.nodes, 4),
                "period_s": self.period_s, "detection_bound_s": self.ttl_s,
                "detection_s": [round(d, 2) for d in det],
                "detected_within_bound": all(d <= self.ttl_s + 1.0 for d in det)}

    def offloads(self, seconds: float, failover: bool = False,
                 kill_process: bool = False) -> dict:
        """Offloads from every process for `seconds`; with `failover` a master is killed
        (kill -9) a third in (`FAILOVER_AT`), with `kill_process` the last cloud-manager
        process half-way. Meanwhile, and for a TTL after, the registry's count of nodes up
        is sampled (a dead process's heartbeat turns must go to the others)."""
        self.r.set(GO, 1)
        events: dict = {}

        def faults() -> None:
            t0 = time.time()
            if failover:
                time.sleep(seconds * FAILOVER_AT)
                t = time.time()
                port, promoted = self.cluster.kill_master()
                events["failover"] = {"port": port, "at": t,
                                      "promoted_after_s": round(promoted, 2)}
            if kill_process:
                time.sleep(max(0.0, t0 + seconds / 2 - time.time()))
                p, _ = self.managers[-1]
                events["killed_process"] = {"at": time.time()}
                p.kill()  # SIGKILL: no goodbye, no JSON
                p.wait()

        up: list[int] = []
        stop = threading.Event()

        def sample() -> None:
            reg = Registry(datasync.connect(self.cluster.url, cluster=True), down_after_s=1.0)
            while not stop.wait(1.0):
                try:
                    up.append(len(reg.names(up_only=True)))
                except Exception:  # a master failing over
                    pass

        threading.Thread(target=sample, daemon=True).start()
        t0 = time.time()
        w = self.window(seconds, during=(lambda: threading.Thread(target=faults).start())
                        if failover or kill_process else None)
        t1 = time.time()
        self.r.delete(GO)
        # The heartbeats go on (for a TTL at most): a node whose turn fell into the
        # failover shows down until its next turn; then every node should be up again.
        n, deadline = len(up), time.time() + self.ttl_s + self.period_s
        while time.time() < deadline and not (len(up) > n and up[-1] >= 0.97 * self.nodes):
            time.sleep(0.5)
        stop.set()
        if "killed_process" in events and self.orphans_bound_s is not None:
            # the survivors go on until the killed process's orphans are past their bound
            time.sleep(max(0.0, events["killed_process"]["at"] + self.orphans_bound_s
                           - time.time()))
        outs = self.collect()
        done = [(at, s) for o in outs for at, s in o["offload_s"]]
        inside = [s for at, s in done if t0 <= at <= t1]
        placed = [m for o in outs for m in o["placement_ms"]]
        total = [m["total"] / 1000 for m in placed]
        decision = [(m["total"] - m.get("probes", 0.0)) / 1000 for m in placed]
        out = {**w, "offloads": len(inside),
               "offloads_per_s": round(len(inside) / (t1 - t0), 2),
               "offload_ms_p50": _ms(pct(inside, 0.5)), "offload_ms_p99": _ms(pct(inside, 0.99)),
               "placement_ms_p50": _ms(pct(total, 0.5)),
               "placement_ms_p99": _ms(pct(total, 0.99)),
               # without the probes of the shortlisted nodes (their round trips)
               "placement_decision_ms_p50": _ms(pct(decision, 0.5)),
               "placement_decision_ms_p99": _ms(pct(decision, 0.99)),
               "failed": {k: sum(o["failed"].get(k, 0) for o in outs)
                          for k in {k for o in outs for k in o["failed"]}},
               "turns_won_per_process": [o["turns_won"] for o in outs],
               "orphans_reconcile": {k: sum((o["orphans"] or {}).get(k, 0) for o in outs)
                                     for k in {k for o in outs for k in o["orphans"] or {}}},
               "orphans_bound_s": self.orphans_bound_s,
               "manager_rss_mb": [round(o["rss_mb"], 1) for o in outs],
               "nodes_up_min": min(up) if up else None,
               "nodes_up_at_end": up[-1] if up else None}
        for name, ev in events.items():
            after = sorted(at for at, _ in done if at > ev["at"])
            ev["first_offload_after_s"] = round(after[0] - ev["at"], 2) if after else None
            ev["offloads_after"] = len(after)
            out[name] = ev
        return out

    def partitioned(self, before_s: float, cut_s: float, after_s: float) -> dict:
        """Offloads from every process; `before_s` in, the last one (in `netns`) cut off
        from the cluster for `cut_s`, then healed until it redirected a group again (for
        `after_s` at most). What it had in flight at
        the cut (the offloads leased to it, read right before: each one's server, group
        and what became of it), the others' take-overs, its failed offloads and its
        redirects while cut off, and its offloads after."""
        self.r.set(GO, 1)
        time.sleep(before_s)
        owner, deadline = self.owners[-1], time.time() + 2.0
        while not (held := self._leased_to(owner)) and time.time() < deadline:
            time.sleep(0.02)  # (until it has one in flight, for 2 s at most)
        intents = {sid: raw for sid, raw in zip(held, datasync.mget(
            self.r, [ledger_mod.intent_key(sid) for sid in held]), strict=True) if raw}
        cut_at = self.partition(True)
        time.sleep(cut_s)
        heal_at = self.partition(False)
        name = f"m{self.procs - 1}"
        while time.time() < heal_at + after_s and not any(
                by == name and at > heal_at for _, by, at in self.redirects()):
            time.sleep(0.2)
        self.r.delete(GO)
        outs = self.collect()
        cut, others = outs[-1], outs[:-1]
        led, on_nodes, redirects = Ledger(self.r), self.servers_on_nodes(), self.redirects()
        count = Counter(g for g, _, _ in redirects)
        in_flight = {}
        for sid, raw in intents.items():
            group = ledger_mod.Intent.from_json(raw).entry.user_ids[0]
            where = led.where(group)
            in_flight[sid] = {"recorded": led.get(sid) is not None,
                              "on_node": sid in on_nodes, "redirects": count[group],
                              "user_points_at_it": where is not None and where.server_id == sid}
        after = sorted(at for at, _ in cut["offload_s"] if at > heal_at)
        # the offloads that failed once it was cut off (begun before the cut, or during it)
        failures = [f for f in cut["failures"] if f[1] + f[2] >= cut_at and f[1] <= heal_at]
        return {"cut_at": cut_at, "heal_at": heal_at, "in_flight_at_cut": in_flight,
                "taken_over": {k: sum((o["orphans"] or {}).get(k, 0) for o in others)
                               for k in ("completed", "ended")},
                "cut_failed_while_cut": Counter(f[0] for f in failures),
                "cut_longest_failure_s": max((f[2] for f in failures), default=None),
                "cut_failure_s": {k: sorted(f[2] for f in failures if f[0] == k)
                                  for k in {f[0] for f in failures}},
                "cut_redirects_while_cut": sum(
                    by == cut["name"] and cut_at + self.lease_s < at < heal_at
                    for _, by, at in redirects),
                "cut_offloads_before": sum(at < cut_at for at, _ in cut["offload_s"]),
                "cut_offloads_after_heal": len(after),
                "cut_first_offload_after_heal_s": round(after[0] - heal_at, 2) if after
                else None,
                "cut_workers_unfinished": cut["workers_unfinished_at_stop"],
                "others_offloads_while_cut": sum(cut_at < at < heal_at for o in others
                                                 for at, _ in o["offload_s"])}

    def _leased_to(self, owner: str) -> list[str]:
        """The offloads in flight whose lease `owner` holds now."""
        keys = list(self.r.scan_iter(match="enorm:deployment:*:lease", count=1000))
        return [k.decode().split("{", 1)[1].split("}", 1)[0]  # the server id: the key's tag
                for k, v in zip(keys, datasync.mget(self.r, keys), strict=True)
                if v == owner.encode()]

    def collect(self) -> list[dict]:
        """SIGTERM to the cloud-manager processes alive; what each wrote."""
        alive = [(i, p) for i, (p, _) in enumerate(self.managers) if p.poll() is None]
        for _, p in alive:
            p.send_signal(signal.SIGTERM)
        outs = []
        for i, p in alive:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                # Its threads' stacks (faulthandler on SIGUSR1) into the error, to say why.
                p.send_signal(signal.SIGUSR1)
                time.sleep(2)
                tail = (self.tmp / f"m{i}.log").read_text(errors="replace")[-12000:]
                raise RuntimeError(f"cloud-manager process m{i} did not end within 60 s of "
                                   f"SIGTERM; the end of its log:\n{tail}") from None
            outs.append(json.loads((self.tmp / f"m{i}.json").read_text()))
        return outs

    def servers_on_nodes(self) -> set[str]:
        out: set[str] = set()
        for port, _, _ in self.sims:
            out |= set(requests.get(f"http://127.0.0.1:{port}/ctl/servers", timeout=30).json())
        return out

    def decision(self, rounds: int = 200) -> dict:
        """The placement's decision alone, in this (otherwise idle) process, three ways
        in turn: main's before issue 32's index (who is up and every summary from the
        registry, all ranked), the rank's read from the cluster (`Registry.ranked`: the
        best few per shard, then those ranked; session 4) and the rank's with its first
        round from the head in memory (`RankHead`, read again every 0.5 s, as `Placer`
        does), each to a shortlist of 16 of the nodes that admit."""
        reg = Registry(self.r, down_after_s=1.0)
        fits = lambda n, s: summary_candidate(n, s, 5).admits  # noqa: E731
        # the library's way (Placer): the rank's first round from the head in memory
        head = registry_mod.RankHead(reg, reg.first_page(32), 0.5)
        head.start()
        whole, index, fresh = [], [], []
        try:
            for _ in range(rounds):
                t = time.perf_counter()
                sums = reg.summaries()
                full = order([summary_candidate(n, s, 5) for n, s in sums.items()], "scored")
                t1 = time.perf_counter()
                read = reg.ranked(32, fits)
                order([summary_candidate(n, s, 5) for n, s in read], "scored")
                t2 = time.perf_counter()
                read = reg.ranked(32, fits, head=head)
                short = order([summary_candidate(n, s, 5) for n, s in read], "scored")
                index.append(time.perf_counter() - t2)
                fresh.append(t2 - t1)
                whole.append(t1 - t)
        finally:
            head.stop()
        # the same shortlist either way (ties aside: compared by cost)
        w = Weights()
        same = ([round(base_cost(sums[n], w), 3) for n in full[:16]]
                == [round(base_cost(dict(read)[n], w), 3) for n in short[:16]])
        return {"candidates": len(sums), "read_by_rank": len(read), "same_shortlist": same,
                "decision_ms_p50": _ms(pct(index, 0.5)), "decision_ms_p99": _ms(pct(index, 0.99)),
                # session 4's way: each decision reads the rank's head from the cluster
                "rank_read_ms_p50": _ms(pct(fresh, 0.5)),
                "rank_read_ms_p99": _ms(pct(fresh, 0.99)),
                "whole_fleet_ms_p50": _ms(pct(whole, 0.5)),
                "whole_fleet_ms_p99": _ms(pct(whole, 0.99))}

    def ledger_check(self) -> dict:
        """The ledger against itself, after the survivors' repair (`Ledger.repair`): each
        user named by one deployment at most, and every deployment's users pointing at it
        unless they moved on; and against the nodes' servers."""
        led = Ledger(self.r)
        repaired = led.repair()
        entries = led.all()
        seen: dict[str, str] = {}
        doubled = 0
        for e in entries:
            for u in e.user_ids:
                doubled += u in seen
                seen[u] = e.server_id
        pointers = datasync.mget(self.r, [ledger_mod.user_key(u) for u in seen])
        dangling = sum(p is None for p in pointers)
        on_nodes, recorded = self.servers_on_nodes(), {e.server_id for e in entries}
        # each group offloaded redirected once (the bench's app counts), those withdrawn
        # since too; a group in the ledger never redirected is an offload not completed
        counts = self.redirect_counts()
        never = sum(counts.get(e.user_ids[0], 0) == 0 for e in entries if e.users)
        intents = sum(len(led.lapsed(k)) for k in range(ledger_mod.SHARDS))
        return {"deployments": len(entries), "users": len(seen), "pointers_repaired": repaired,
                "users_in_two_deployments": doubled, "users_without_pointer": dangling,
                "groups_redirected": len(counts),
                "groups_redirected_twice": sum(c > 1 for c in counts.values()),
                "deployments_never_redirected": never, "intents_lapsed_left": intents,
                # admitted by a node, not in the ledger: an offload cut off between the
                # handshake and the record (a process killed), or a withdrawal's
                # termination that did not reach its node
                "servers_not_in_ledger": len(on_nodes - recorded),
                "ledger_entries_without_server": len(recorded - on_nodes)}

    def redirects(self) -> list[tuple[str, str, float]]:
        """Every redirect of the bench's app: (the group's first user, the process, when),
        as the first simulator was told them."""
        port = self.sims[0][0]
        return [tuple(x) for x in requests.get(f"http://127.0.0.1:{port}/ctl/redirect",
                                               timeout=30).json()]

    def redirect_counts(self) -> Counter[str]:
        return Counter(group for group, _, _ in self.redirects())

    def partition(self, cut: bool) -> float:
        """The last cloud-manager process (in `netns`) cut off from the cluster, or back
        (module docstring); when."""
        assert self.netns is not None, "a partition needs the process in a namespace"
        ports = ",".join(map(str, sorted(self.cluster.procs)))
        for chain, addr, way in (("OUTPUT", "-d", "--dports"), ("INPUT", "-s", "--sports")):
            subprocess.run(["ip", "netns", "exec", self.netns, "iptables",
                            "-I" if cut else "-D", chain, addr, self.host, "-p", "tcp",
                            "-m", "multiport", way, ports,
                            "-m", "comment", "--comment", "enorm-fleet-partition",
                            "-j", "DROP"], check=True, capture_output=True)
        return time.time()

    def memory_and_where(self, users: int, sample: int = 2000) -> dict:
        """Fill the ledger to `users` users (groups of `group`), then time `where`."""
        m0 = sum(self.cluster.memory().values())
        led = Ledger(self.r)
        groups = max(1, users // self.group)
        t0 = time.time()

        def fill(part: int) -> None:
            r = datasync.connect(self.cluster.url, cluster=True)
            lp = Ledger(r)
            for g in range(part, groups, 4):
                us = [User(id=f"w{g * self.group + i}", address="198.18.0.1")
                      for i in range(self.group)]
                lp.record(Entry(server_id=f"w{g:08x}", node=f"f{g % self.nodes:07d}",
                                app="fleet", url="http://127.0.0.1:1", users=us))
            r.close()

        ts = [threading.Thread(target=fill, args=(i,)) for i in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        fill_s = time.time() - t0
        m1 = sum(self.cluster.memory().values())
        rng = random.Random(2)
        lat, two, wrong = [], [], 0
        for _ in range(sample):
            i = rng.randrange(groups * self.group)
            u = f"w{i}"
            t = time.perf_counter()
            e = led.where(u)
            lat.append(time.perf_counter() - t)
            wrong += e is None or e.server_id != f"w{i // self.group:08x}"
            # side by side, main's `where` before issue 32's pointers held the answer:
            # the pointer, then the deployment's record
            t = time.perf_counter()
            led.get(ledger_mod.Served.server_of(self.r.get(ledger_mod.user_key(u))))
            two.append(time.perf_counter() - t)
        reg_keys = [registry_mod.node_key(n) for n in node_names(0, min(self.nodes, 200))]
        node_bytes = statistics.mean(int(self.r.memory_usage(k) or 0) for k in reg_keys)
        # the index, and the placement's summaries and rank (not counted before issue 32's
        # rank: the index alone)
        index_bytes = sum(int(self.r.memory_usage(key) or 0) for key in [
            *map(registry_mod.index_key, range(registry_mod.SHARDS)),
            *map(registry_mod.summary_key, range(registry_mod.RANK_SHARDS)),
            *map(registry_mod.rank_key, range(registry_mod.RANK_SHARDS))])
        return {"users": groups * self.group, "fill_s": round(fill_s, 1), "where_wrong": wrong,
                "where_ms_p50": _ms(pct(lat, 0.5)), "where_ms_p99": _ms(pct(lat, 0.99)),
                "where_two_reads_ms_p50": _ms(pct(two, 0.5)),
                "where_two_reads_ms_p99": _ms(pct(two, 0.99)),
                "cluster_bytes_per_user": round((m1 - m0) / (groups * self.group), 1),
                "registry_bytes_per_node": round(node_bytes + index_bytes / self.nodes, 1)}
