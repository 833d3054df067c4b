"""Users walking between three edge nodes' areas, served by the cloud manager's policy
against the cloud alone and a static placement, side by side in one run (issue 31).

The testbed's three nodes stand at x = 0, 1, 2 on a line; group g (users namespace
`enbdu<g>`) walks a synthetic trace along it (`TRACE`, positions in areas over seconds).
Its one-way distance to node k is `EDGE_MS + SLOPE_MS * |x - k|` on top of the Wi-Fi
access link, set every `STEP_S` by the namespace's per-node delayers (`Testbed.move`),
so the nodes' own probes and the users' requests see the same path. The cloud is at the
WAN profile's distance whatever the users' position. Node 1 goes down (`Testbed.down`:
its API and its servers refuse every connection) for `DOWN` and comes back.

Each group is five sets of paced users (one game request, location update + wild
Pokemon, every 0.5 s), all in the group's namespace, so that they walk the same trace at
the same time on the same loaded machine:
  cloud    (a) served by the cloud throughout;
  pin<k>   served by node k throughout (one server per set, offloaded at the start);
           `pin<start node>` is (b), the static placement made at the start, and the
           pins together give the best node's latency at every moment (the lowest p50
           of the pins on nodes that are up);
  policy   (c) the cloud manager's policy (`start_policy`, in the cloud process) over
           the group, probing the users from the nodes: no location given.

Both placements are made before the users start: the pins', and the policy's first
round (the bench waits for its offloads).

Reported per mode: p50/p95 over time (plot, per group), the share of each user's
requests served by the best node, handovers (server switches the users saw) per user
and per crossing (the best node changing: a walk past a midpoint, the node going down
or up; the most any user saw in one crossing's window), the reaction after each
crossing against the issue's goal (`GOAL_S`) and the bench's own bound, and for the
policy where its time went (the decision's delay after the crossing, the dwell, the
move, until the users' next requests), the p50 against the best node's outside the
reaction windows -- as served (the set's p50 over the best node's pin's) and by place
(the pin's where the set was served over the best node's pin's: two servers made alike;
on this shared 2-CPU machine two servers on one node differ by more than 1.2x in many
bins, which the set's p50 over its own node's pin's shows) --, failed requests, keys
lost (each user's keys on the cloud before and after, once every server is withdrawn),
edge server-seconds (the policy's from its decisions; standbys it prepared and ended
unused are not counted). The same again by the best *place*, the cloud among them
(`by_place`: the trace's model with the run's calibration says where a request costs
least; a group the policy sends home while the cloud costs least has reacted), with the
goal's fixed window (`GOAL_S`) after each crossing, and the goal checked per mode.
Writes bench/results/mobility.json + .png; `--reanalyse FILE` measures a results file
again by the best place, without a run.

    flock /run/enorm-bench.lock .venv/bin/python -m bench.mobility [--quick] [--wan far]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from pathlib import Path

import requests

from bench.latency import RESULTS
from bench.load import Load
from bench.newserver import Sampler
from bench.testbed import WAN, Testbed
from cloud_manager.edge_client import EdgeClient
from enorm import datasync

NODES = (0, 1, 2)
EDGE_MS, SLOPE_MS = 1.0, 8.0  # one way: at a node, and per area away from it
STEP_S = 0.5  # the trace's resolution (delayers updated this often)
BIN_S = 4.0  # the p50 / p95 over time
ACCESS = "wifi"
# (seconds, position) waypoints per group, linear in between; over `span` seconds. The
# groups in node 1's area when it goes down stand off its middle, so that one other node
# is the best then (not two at the same distance).
TRACE = {
    0: [(0, 0.0), (15, 0.0), (35, 1.0), (55, 1.0), (75, 2.0), (120, 2.0)],
    1: [(0, 1.0), (20, 1.0), (40, 0.0), (70, 0.0), (90, 0.9), (120, 0.9)],
    2: [(0, 2.0), (45, 2.0), (65, 1.2), (120, 1.2)],
}
SPAN_S = 120.0
DOWN = (1, 95.0, 110.0)  # node, from, until (s)
# The policy's settings (`[policy]`): quick rounds and a short dwell for walking users.
# Its figures are what a request costs (`policy.request_ms`): the game's request is two
# calls (location update, wild Pokemon) on one connection, so two round trips, and the
# thresholds, in a request's ms, are twice the RTT margins they stand for (5 / 2 / 4 ms
# of RTT, as before).
REQUEST_RTTS = 2.0
POLICY = {"interval_s": 1.0, "dwell_s": 2.0, "withdraw_dwell_s": 5.0,
          "offload_gain_ms": 10.0, "withdraw_gain_ms": 4.0, "handover_gain_ms": 8.0,
          "down_bound_s": 3.0, "request_rtts": REQUEST_RTTS}
CALIBRATE_S = 8.0  # the requests that measure a request's cost on the cloud and a node
SETS = ("cloud", "pin0", "pin1", "pin2", "policy")
MOVE_S = 3.0  # starting a server (an offload, or a handover's new one) on this testbed
SWITCH_S = 1.0  # a prepared handover's switch (bench.handover: 0.2 s) + a request's period
GOAL_S = 10.0  # the bound on the reaction after a crossing
YOUNG_S = 20.0  # a server's first seconds, told apart in `where_time_went`


def position(g: int, t: float, scale: float) -> float:
    pts = [(s * scale, x) for s, x in TRACE[g]]
    for (t0, x0), (t1, x1) in zip(pts, pts[1:], strict=False):
        if t0 <= t <= t1:
            return x0 + (x1 - x0) * (t - t0) / (t1 - t0) if t1 > t0 else x1
    return pts[-1][1] if t > pts[-1][0] else pts[0][1]


def extra_ms(x: float) -> dict[int, float]:
    return {k: EDGE_MS + SLOPE_MS * abs(x - k) for k in NODES}


def is_down(k: int, t: float, scale: float) -> bool:
    node, t0, t1 = DOWN
    return k == node and t0 * scale <= t < t1 * scale


def place_ms(x: float, cal: dict | None = None) -> dict[int | None, float]:
    """What a request is expected to cost at each place from position x: on node k,
    `REQUEST_RTTS` round trips at its distance plus the server's time; with `cal` (the
    run's `calibrate`: node 0's probe RTT at its own area, the server's time, a request's
    p50 on the cloud) in a request's ms and the cloud (None) among the places, else the
    nodes alone, up to a constant (their order and differences only)."""
    ms = extra_ms(x)
    rtt0 = 0.0 if cal is None else cal["node_probe_rtt_ms"] - 2 * EDGE_MS
    out: dict[int | None, float] = {
        k: REQUEST_RTTS * (rtt0 + 2 * ms[k]) + (0.0 if cal is None else cal["edge_service_ms"])
        for k in NODES}
    if cal is not None:
        out[None] = cal["cloud_request_ms"]
    return out


def best_place(g: int, t: float, scale: float, cal: dict | None = None) -> int | None:
    """Where group g's requests cost least at t: the nearest node that is up, or with
    `cal` the best place, the cloud (None) included."""
    ms = place_ms(position(g, t, scale), cal)
    return min((k for k in ms if k is None or not is_down(k, t, scale)),
               key=lambda k: (ms[k], len(NODES) if k is None else k))


def crossings(g: int, span: float, scale: float, cal: dict | None = None) -> list[dict]:
    """When group g's best node (with `cal`: best place) changes (at a quarter of the
    trace's step), why (a walk past a midpoint, a node down or up), and `lead_s`: how
    long until the new place leads the old one by the policy's threshold for that move
    (a handover's, an offload's; none to the cloud), the part of the reaction the walk's
    speed sets (0 for a node going down)."""
    dt, out, prev, t = STEP_S / 4, [], best_place(g, 0.0, scale, cal), 0.0
    while t < span:
        t = round(t + dt, 6)
        b = best_place(g, t, scale, cal)
        if b == prev:
            continue
        why = "down" if prev is not None and is_down(prev, t, scale) else \
            "up" if b is not None and is_down(b, t - dt, scale) else "walk"
        need = 0.0 if b is None else POLICY["offload_gain_ms"] if prev is None \
            else POLICY["handover_gain_ms"]
        lead = t
        while why != "down" and lead < span:
            ms = place_ms(position(g, lead, scale), cal)
            if ms[prev] - ms[b] >= need - 1e-9:  # (the same margin however it sums)
                break
            lead = round(lead + dt, 6)
        out.append({"t": t, "from": prev, "to": b, "why": why, "lead_s": round(lead - t, 2)})
        prev = b
    return out


def reaction_bound(c: dict) -> float:
    """The policy's bound after crossing `c`: the lead + a round + the dwell or the new
    server's start, whichever is longer (it is prepared while the dwell runs) + the
    switch; a node going down: two rounds (seeing it: a node that refuses takes its
    retries) + `down_bound_s` or the refuge's start (prepared while the bound runs) +
    the switch."""
    p = POLICY
    if c["why"] == "down":
        return round(2 * p["interval_s"] + max(p["down_bound_s"], MOVE_S) + SWITCH_S, 2)
    dwell = p["withdraw_dwell_s"] if c["to"] is None else p["dwell_s"]  # home: gain_gone
    return round(c["lead_s"] + p["interval_s"] + max(dwell, MOVE_S) + SWITCH_S, 2)


def moves_in(per_user: dict[int, list], since: float, until: float) -> int:
    """The most server switches any user saw in [since, until)."""
    most = 0
    for seq in per_user.values():  # from the node the user was on as the window opens
        window = [n for t, n in seq if t < since][-1:] + [n for t, n in seq
                                                          if since <= t < until]
        most = max(most, sum(1 for a, b in zip(window, window[1:], strict=False) if a != b))
    return most


def parts(c: dict, reaction_s: float | None, events: list[dict], g: int,
          until: float) -> dict | None:
    """Where the policy's reaction to crossing `c` went, from its decision that moved
    group g to the new best node: decided `decided_s` after the crossing (the lead, the
    rounds, the dwell `for_s` or the down bound), the move took `move_s` (of which a
    standby's start ahead of it, `prepared_ahead_s`, was not waited for), and the users'
    requests reached the new node `seen_s` later."""
    to = None if c["to"] is None else f"bed{c['to']}"
    # to the cloud: the withdrawal (from a node down it fails, the users home all the same)
    ev = next((e for e in events if e["group"] == f"g{g}" and c["t"] <= e["t"] < until and (
        e["kind"] == "withdraw" and e["reason"] != "node_back" if to is None else
        e["ok"] and to in (e["to"], e["node"]) and e["kind"] != "withdraw")), None)
    if ev is None:
        return None
    f = ev["figures"]
    decided = ev["t"] - ev["seconds"] - c["t"]
    return {"decision": f"{ev['kind']}:{ev['reason']}", "decided_s": round(decided, 2),
            "for_s": f.get("for_s", f.get("down_for_s")), "move_s": ev["seconds"],
            "prepared_ahead_s": f.get("prepared_ahead_s"),
            "seen_s": None if reaction_s is None else round(reaction_s - decided
                                                            - ev["seconds"], 2)}


def server_seconds(events: list[dict], g: int, span: float) -> float:
    """The policy's edge servers for group g over the run, from its decisions: each from
    the decision that made it to the one that left it (or the run's end)."""
    made: dict[str, float] = {}
    total = 0.0
    for e in sorted((e for e in events if e["group"] == f"g{g}" and e["ok"]),
                    key=lambda e: e["t"]):
        t = min(max(e["t"], 0.0), span)
        if e["server_id"] in made:
            total += t - made.pop(e["server_id"])
        if e["new_server_id"]:
            made[e["new_server_id"]] = t
    return round(total + sum(span - t for t in made.values()), 1)


def reaction(per_user: dict[int, list], c: dict, until: float) -> float | None:
    """Seconds from crossing `c` until every user of the set was served by the new best
    place (before `until`, the next crossing); None: not all were. `per_user`: each
    user's requests, or the points where its place changed (`served`), as (t, place)."""
    ts = []
    for seq in per_user.values():
        was = [n for t, n in seq if t <= c["t"]][-1:]
        t = c["t"] if was == [c["to"]] else next(
            (t for t, n in seq if c["t"] <= t < until and n == c["to"]), None)
        if t is None:
            return None
        ts.append(t)
    return round(max(ts) - c["t"], 2) if ts else None


def node_of(server: str | None, bed: Testbed) -> int | None:
    """The node whose users-facing address serves `server` (None: the cloud)."""
    for e in bed.edges:
        if server and f"//{e.users.host_ip}:" in server:
            return e.index
    return None


def quantiles(ms: list[float]) -> dict:
    if not ms:
        return {"n": 0}
    q = statistics.quantiles(ms, n=100) if len(ms) > 1 else ms * 99
    return {"n": len(ms), "p50_ms": round(q[49], 1), "p95_ms": round(q[94], 1)}


def walk(bed: Testbed, t0: float, span: float, scale: float, stop: threading.Event) -> None:
    """The trace: each namespace's distances every STEP_S, node 1 down and up."""
    node, d0, d1 = DOWN
    state = None
    while not stop.is_set():
        t = time.time() - t0
        if t > span:
            break
        for g in NODES:
            bed.move(extra_ms(position(g, t, scale)), users=g)
        down = is_down(node, t, scale)
        if down != state:
            (bed.down if down else bed.up)(node)
            state = down
        stop.wait(STEP_S - (time.time() - t0 - t) % STEP_S)
    bed.up(node)


def keys_of(cloud, uids: dict[int, list[str]]) -> dict[int, dict[str, list]]:
    """Each group's users' keys on the cloud (g -> user -> sorted keys), by the key's hash
    tag, in one SCAN of the cloud's keyspace: one `*{uid}*` SCAN per user walked the
    whole keyspace 45 times, a round trip per 10 keys, minutes over the far WAN (85 ms)."""
    owner = {u: g for g, us in uids.items() for u in us}
    out: dict[int, dict[str, list]] = {g: {u: [] for u in us} for g, us in uids.items()}
    for key in cloud.scan_iter(count=1000):
        text = key.decode() if isinstance(key, bytes) else key
        lo = text.find("{")
        hi = text.find("}", lo + 1)
        uid = text[lo + 1:hi] if lo >= 0 and hi > lo + 1 else None
        if uid in owner:
            out[owner[uid]][uid].append(key)
    return {g: {u: sorted(keys) for u, keys in us.items()} for g, us in out.items()}


def calibrate(bed: Testbed, wan: str, n: int) -> dict:
    """What a request costs on the cloud and on an edge server, measured the same way:
    2n users of group 0's namespace at its start play paced game requests for
    `CALIBRATE_S`, n on the cloud and n on a server of node 0, node 0's own probe of
    the latter beside. The policy's figure for the cloud is the first p50
    (`cloud_ms`); its figure for a node is its probe's RTT in round trips plus the
    server's time, which the second gives (`edge_service_ms` = the p50 less
    `REQUEST_RTTS` x the probe's RTT). Before this, the bench gave the cloud's RTT as
    its figure: 15 ms for the near cloud, where a request cost 84 ms."""
    ns = bed.edges[0].users
    addrs = ns.addrs[: 2 * n]
    load = Load(ns.name, bed.cloud_url, addrs, CALIBRATE_S, "paced", trace="who",
                prefix=f"{wan}-cal-")
    users = list(zip(load.start(), addrs, strict=True))
    dep = bed.offload(users[n:], exclude=[f"bed{k}" for k in NODES if k != 0])
    try:
        probe = EdgeClient(bed.edges[0].node.url, bed.token).probe(addrs[n:])
        trace = load.run()["trace"]
    finally:
        bed.withdraw(dep["server_id"])
    cloud = [ms for _, ms, i, _ in trace if ms is not None and i < n]
    edge = [ms for _, ms, i, server in trace if ms is not None and i >= n
            and node_of(server, bed) == 0]
    rtt = statistics.median(v for v in probe.rtt_ms.values() if v is not None)
    cloud_rtt = ns.link.rtt_ms + WAN[wan].rtt_ms
    c, e = statistics.median(cloud), statistics.median(edge)
    return {"requests": [len(cloud), len(edge)], "cloud_request_ms": round(c, 1),
            "cloud_rtt_ms": cloud_rtt, "node_request_ms": round(e, 1),
            "node_probe_rtt_ms": round(rtt, 2),
            "edge_service_ms": round(max(0.0, e - REQUEST_RTTS * rtt), 1),
            "cloud_service_ms": round(max(0.0, c - REQUEST_RTTS * cloud_rtt), 1)}


def run(bed: Testbed, wan: str, per_set: int, scale: float, settle: float = 0.0,
        counters: bool = False) -> dict:  # fmt: skip
    span = SPAN_S * scale
    bed.wan(wan)
    for g in NODES:
        bed.distances(extra_ms(position(g, 0.0, scale)), users=g)
    cal = calibrate(bed, wan, per_set)
    cloud_ms = cal["cloud_request_ms"]
    loads, users = {}, {}  # g -> Load; (g, set) -> [(uid, addr)]
    for g in NODES:
        addrs = bed.edges[g].users.addrs[: per_set * len(SETS)]
        loads[g] = Load(bed.edges[g].users.name, bed.cloud_url, addrs, span, "paced",
                        trace="who", prefix=f"{wan}-g{g}-")
    for g in NODES:
        uids = loads[g].start()
        addrs = bed.edges[g].users.addrs
        for i, name in enumerate(SETS):
            sl = slice(i * per_set, (i + 1) * per_set)
            users[g, name] = list(zip(uids[sl], addrs[sl], strict=True))
    cloud = datasync.connect(f"redis://{bed.cloud_ns.ip}:6379/0")
    before = keys_of(cloud, {g: [u for name in SETS for u, _ in users[g, name]]
                             for g in NODES})
    pins = {}
    for g in NODES:
        for k in NODES:
            dep = bed.offload(users[g, f"pin{k}"],
                              exclude=[f"bed{j}" for j in NODES if j != k])
            pins[g, k] = dep["server_id"]
    settings = {**POLICY, "cloud_ms": cloud_ms, "edge_service_ms": cal["edge_service_ms"],
                "enabled": True}
    r = requests.post(bed.cloud_url + "/bench/policy", timeout=60, json={
        "settings": settings, "groups": {f"g{g}": users[g, "policy"] for g in NODES}})
    r.raise_for_status()
    deadline = time.time() + 120  # its first placement made, as the pins' is
    while sum(1 for e in requests.get(bed.cloud_url + "/bench/policy", timeout=60).json()
              if e["kind"] == "offload" and e["ok"]) < len(NODES):
        if time.time() > deadline:
            raise RuntimeError("the policy did not place its groups in 120 s")
        time.sleep(0.2)
    time.sleep(settle)  # (the servers, the policy's last made, older when the users start)
    outs: dict[int, dict] = {}
    threads = [threading.Thread(target=lambda g=g: outs.update({g: loads[g].run()}))
               for g in NODES]
    sampler = Sampler(bed, every=1.0) if counters else None
    if sampler is not None:
        sampler.start()
    t0 = time.time()
    for th in threads:
        th.start()
    stop = threading.Event()
    walker = threading.Thread(target=walk, args=(bed, t0, span, scale, stop))
    walker.start()
    for th in threads:
        th.join()
    stop.set()
    walker.join()
    events = requests.get(bed.cloud_url + "/bench/policy", timeout=60).json()
    if sampler is not None:
        sampler.stop.set()
        sampler.join()
    # the policy stops deciding once its groups stop playing: end it, then bring home
    # every server left (the policy's and the pins) for the keys' count
    stopped = requests.post(bed.cloud_url + "/bench/policy/stop", timeout=120)
    stopped.raise_for_status()
    for sid in pins.values():
        bed.withdraw(sid)
    time.sleep(1.0)
    after = keys_of(cloud, {g: list(before[g]) for g in NODES})
    cloud.close()
    out = analyse(bed, wan, cloud_ms, per_set, scale, span, t0, users, outs, events,
                  before, after)
    out["policy_left"] = stopped.json()  # withdrawn at the end: their merges
    out["calibration"] = cal
    if sampler is not None:
        prefix = {b.name: b.node.config.container_prefix for b in bed.edges}
        label = {f"{prefix[f'bed{k}']}{sid}": f"pin{k}-g{g}" for (g, k), sid in pins.items()}
        label |= {f"{prefix[e['to'] or e['node']]}{e['new_server_id']}":
                  f"policy-{e['group']}@{e['to'] or e['node']}#{e['new_server_id']}"
                  for e in events if e["ok"] and e["new_server_id"]}
        out["counters"] = counters_of(sampler, label, t0)
        # each request as the users saw it: (end, ms, user index, node; None: the cloud)
        out["counters"]["requests"] = {
            g: [(round(t - t0, 3), ms, who, node_of(server, bed))
                for t, ms, who, server in outs[g]["trace"]] for g in NODES}
    return out


def counters_of(sampler: Sampler, label: dict[str, str], t0: float) -> dict:
    """What `--counters` keeps: per container (by the set it served: `pin<k>-g<g>`,
    `policy-g<g>@<node>#<server id>`), per second its CPU, CFS throttling and cpuset,
    and its edge server's own time for each request (its request log), relative to the
    users' start; per second each host CPU's busy share and the node daemons' CPU (mkfs
    & co. included)."""
    series: dict[str, dict] = {}
    for a, b in zip(sampler.samples, sampler.samples[1:], strict=False):
        dt, t = b["t"] - a["t"], round(b["t"] - t0, 1)
        for name, c1 in b["containers"].items():
            c0 = a["containers"].get(name)
            if c0 is None:
                continue
            s = series.setdefault(name, {"label": label.get(name, name), "t": [], "cpu": [],
                                         "throttled": [], "throttled_s": [], "cpuset": []})
            s["t"].append(t)
            s["cpu"].append(round((c1["cpu_s"] - c0["cpu_s"]) / dt, 3))
            s["throttled"].append(c1["nr_throttled"] - c0["nr_throttled"])
            s["throttled_s"].append(round(c1["throttled_s"] - c0["throttled_s"], 3))
            s["cpuset"].append(c1["cpuset"])
    host = [{"t": round(b["t"] - t0, 1), "loadavg": b["loadavg"][0],
             "cpus": {c: round((b["cpus"][c] - a["cpus"][c]) / (b["t"] - a["t"]), 2)
                      for c in b["cpus"]},
             "daemons": {n: round((b["nodes"][n] - a["nodes"].get(n, 0.0))
                                  / (b["t"] - a["t"]), 2) for n in b["nodes"]}}
            for a, b in zip(sampler.samples, sampler.samples[1:], strict=False)]
    logs = {label.get(n, n): [(round(t - t0, 3), round(ms, 2)) for t, _, ms in lines]
            for n, lines in sampler.logs.items()}
    return {"containers": series, "host": host, "server_ms": logs}


def analyse(bed, wan, cloud_ms, per_set, scale, span, t0, users, outs, events, before,
            after) -> dict:  # fmt: skip
    events = [{k: e[k] for k in ("kind", "group", "reason", "node", "to", "server_id",
                                 "new_server_id", "ok", "error", "seconds", "figures")}
              | {"t": round(e["at"] - t0, 2)} for e in events]
    index = {}  # (g, user index in the namespace's load) -> set name
    for g in NODES:
        for i, name in enumerate(SETS):
            for j in range(per_set):
                index[g, i * per_set + j] = name
    bins = int(span // BIN_S) + 1
    groups = []
    for g in NODES:
        trace = [(t - t0, ms, index[g, who], who, node_of(server, bed))
                 for t, ms, who, server in outs[g]["trace"]]
        static = f"pin{round(position(g, 0.0, scale))}"
        per_bin: dict[str, list[dict]] = {}
        for name in SETS:
            per_bin[name] = [quantiles([ms for t, ms, s, _, _ in trace
                                        if s == name and ms is not None
                                        and b * BIN_S <= t < (b + 1) * BIN_S])
                             for b in range(bins)]
        # per bin: the best node's p50, that of the pin on the node the trace makes best
        # at the bin's middle (a node down for part of the bin: no figure)
        best = []
        for b in range(bins):
            k = best_place(g, (b + 0.5) * BIN_S, scale)
            flips = {best_place(g, b * BIN_S + d, scale) for d in (0.0, BIN_S - 1e-3)}
            best.append(per_bin[f"pin{k}"][b].get("p50_ms") if flips == {k} else None)
        cross = crossings(g, span, scale)
        modes = {"cloud": "cloud", "static": static, "policy": "policy"}
        out_modes = {}
        for mode, name in modes.items():
            tr = [x for x in trace if x[2] == name]
            ok = [ms for _, ms, _, _, _ in tr if ms is not None]
            per_user: dict[int, list] = {}
            for t, _ms, _, who, node in tr:
                per_user.setdefault(who, []).append((t, node))
            share = {who: round(sum(1 for t, n in seq if n == best_place(g, t, scale))
                                / len(seq), 3) for who, seq in per_user.items()}
            # moves after the user's first edge server (the first offload is none)
            switches = {}
            for who, seq in per_user.items():
                first = next((i for i, (_, n) in enumerate(seq) if n is not None), len(seq))
                switches[who] = sum(1 for a, b in zip(seq[first:], seq[first + 1:],
                                                      strict=False) if a[1] != b[1])
            ends = [c["t"] for c in cross[1:]] + [span]
            reactions = []
            for c, end in zip(cross, ends, strict=True):
                r = reaction(per_user, c, end)
                reactions.append({**c, "reaction_s": r, "bound_s": reaction_bound(c),
                                  "within_goal": r is not None and r < GOAL_S,
                                  "moves": moves_in(per_user, c["t"], end),
                                  **({"parts": parts(c, r, events, g, end)}
                                     if mode == "policy" else {})})
            # the reaction windows: from each crossing until the users are on the new
            # best node (or for the bound, if they never got there)
            windows = [(r["t"], r["t"] + (r["bound_s"] if r["reaction_s"] is None
                                          else r["reaction_s"])) for r in reactions]
            # per bin after the reactions: the set's p50 over the best node's (`ratios`);
            # the place it was served from over the best node, each measured by its pin
            # (the cloud by the cloud set), so that both sides are a server of the same
            # age on the same terms (`placed`: 1 on the best node); and the set's p50
            # over that pin's (`same_place`: two servers on one node, on this shared
            # 2-CPU machine)
            ratios, placed, same_place = [], [], []
            for b in range(bins):
                lo, hi = b * BIN_S, (b + 1) * BIN_S
                p50 = per_bin[name][b].get("p50_ms")
                if p50 is None or best[b] is None or any(w0 < hi and lo < w1
                                                         for w0, w1 in windows):
                    continue
                ratios.append(round(p50 / best[b], 3))
                where = {n for t, _, _, _, n in tr if lo <= t < hi}
                ref = per_bin["cloud" if where == {None} else f"pin{min(where)}"][b].get(
                    "p50_ms") if len(where) == 1 else None
                if ref is not None:
                    placed.append(round(ref / best[b], 3))
                    same_place.append(round(p50 / ref, 3))
            out_modes[mode] = {
                "set": name, "requests": len(tr), "failed": len(tr) - len(ok), **quantiles(ok),
                "share_best": share,
                "share_best_mean": round(statistics.fmean(share.values()), 3) if share else None,
                "switches_per_user": switches,
                "switches_per_crossing": round(statistics.fmean(switches.values())
                                               / max(1, len(cross)), 2) if switches else None,
                "reactions": reactions,
                "edge_server_s": {"cloud": 0.0, "static": span,
                                  "policy": server_seconds(events, g, span)}[mode],
                "ratio_to_best_after_reaction": {
                    "bins": len(ratios), "within_1_2": sum(1 for r in ratios if r <= 1.2),
                    "p50": statistics.median(ratios) if ratios else None,
                    "max": max(ratios) if ratios else None},
                "placement_to_best_after_reaction": {
                    "bins": len(placed), "within_1_2": sum(1 for r in placed if r <= 1.2),
                    "on_best": sum(1 for r in placed if r == 1.0),
                    "max": max(placed) if placed else None},
                "to_same_place_pin": {
                    "bins": len(same_place), "p50": statistics.median(same_place)
                    if same_place else None,
                    "over_1_2": sum(1 for r in same_place if r > 1.2),
                    "under_1_2": sum(1 for r in same_place if r < 1 / 1.2)},
                # where each user was served: (from second, node; None = the cloud)
                "served": {who: [(round(t, 1), n) for i, (t, n) in enumerate(seq)
                                 if i == 0 or seq[i - 1][1] != n]
                           for who, seq in per_user.items()},
                "keys_lost": sum(len(set(before[g][u]) - set(after[g][u]))
                                 for u, _ in users[g, name]),
                "p50_over_time": [x.get("p50_ms") for x in per_bin[name]],
                "p95_over_time": [x.get("p95_ms") for x in per_bin[name]],
            }
        groups.append({"group": g, "static_node": int(static[-1]), "crossings": cross,
                       "best_p50_over_time": best, "modes": out_modes,
                       "sets_p50_over_time": {name: [x.get("p50_ms") for x in per_bin[name]]
                                              for name in SETS}})
    return {"wan": wan, "wan_rtt_ms": WAN[wan].rtt_ms, "cloud_ms": cloud_ms,
            "span_s": span, "groups": groups, "policy_events": events,
            "summary": summarise(groups, events)}




def place_at(seq: list, t: float) -> int | None:
    """Where a user was served at t, from the points where its place changed."""
    return ([n for s, n in seq if s <= t] or [seq[0][1]])[-1]


def by_place(run: dict) -> dict:
    """The goal measured against the best *place*, the cloud included (a group the
    policy sends home because the cloud costs less is where it should be), from what the
    run keeps (so that an older results file can be measured again: `--reanalyse`).

    The best place at each moment is the trace's model with the run's calibration
    (`place_ms`); its p50 in a bin is that of the set served there (the cloud set, or the
    pin on that node; a bin in which it changes has none). A crossing is the best place
    changing; the goal's window after it is `GOAL_S`, stated beforehand: every bin after
    the windows must have the mode's p50 within 1.2x of the best place's (`as_served`),
    and the place it was served from, measured by that place's own set, within 1.2x of
    the best place's (`by_place`: two servers on one node differ by more on this shared
    machine). Also per crossing: the reaction (until every user is at the new best
    place), the most moves any user saw; and the share of time each user spent at the
    best place."""
    cal, span = run["calibration"], run["span_s"]
    scale = span / SPAN_S
    bins = int(span // BIN_S) + 1
    groups = []
    for grp in run["groups"]:
        g, modes = grp["group"], grp["modes"]
        sets = grp.get("sets_p50_over_time")
        if sets is None:  # a run before they were kept: the sets its modes and best give
            sets = {"cloud": modes["cloud"]["p50_over_time"],
                    f"pin{grp['static_node']}": modes["static"]["p50_over_time"],
                    "policy": modes["policy"]["p50_over_time"]}
            for b, v in enumerate(grp["best_p50_over_time"]):
                if v is not None:
                    k = best_place(g, (b + 0.5) * BIN_S, scale)
                    sets.setdefault(f"pin{k}", [None] * bins)[b] = v
        best_at, best = [], []
        for b in range(bins):
            at = {best_place(g, b * BIN_S + d, scale, cal) for d in (0.0, BIN_S / 2,
                                                                    BIN_S - 1e-3)}
            k = at.pop() if len(at) == 1 else "changes"
            best_at.append(k)
            name = "cloud" if k is None else f"pin{k}"
            best.append(None if k == "changes" or name not in sets else sets[name][b])
        cross = crossings(g, span, scale, cal)
        windows = [(c["t"], c["t"] + GOAL_S) for c in cross]
        ends = [c["t"] for c in cross[1:]] + [span]
        out_modes = {}
        for mode, m in modes.items():
            served = {who: [tuple(x) for x in seq] for who, seq in m["served"].items()}
            reactions = []
            for c, end in zip(cross, ends, strict=True):
                r = reaction(served, c, end)
                reactions.append({**c, "reaction_s": r, "within_goal": r is not None
                                  and r < GOAL_S, "moves": moves_in(served, c["t"], end),
                                  **({"parts": parts(c, r, run["policy_events"], g, end)}
                                     if mode == "policy" else {})})
            as_served, placed, over = [], [], []
            for b in range(bins):
                lo, hi = b * BIN_S, (b + 1) * BIN_S
                p50 = m["p50_over_time"][b]
                if p50 is None or best[b] is None or any(w0 < hi and lo < w1
                                                         for w0, w1 in windows):
                    continue
                ratio = round(p50 / best[b], 3)
                as_served.append(ratio)
                where = {place_at(seq, t) for seq in served.values()
                         for t in (lo, lo + BIN_S / 2, hi - 1e-3)}
                ref = None
                if len(where) == 1:
                    (k,) = where
                    ref = sets.get("cloud" if k is None else f"pin{k}", [None] * bins)[b]
                if ref is not None:
                    placed.append(round(ref / best[b], 3))
                if ratio > 1.2 or (ref is not None and ref / best[b] > 1.2):
                    over.append({"t": lo, "ratio": ratio, "best": best_at[b],
                                 "served": sorted(where, key=lambda k: -1 if k is None
                                                  else k),
                                 "by_place": None if ref is None else round(ref / best[b], 3)})
            ts = [t * 0.25 for t in range(int(span / 0.25))]
            share = {who: round(statistics.fmean(
                place_at(seq, t) == best_place(g, t, scale, cal) for t in ts), 3)
                for who, seq in served.items()}
            out_modes[mode] = {
                "reactions": reactions,
                "as_served": {"bins": len(as_served),
                              "within_1_2": sum(1 for r in as_served if r <= 1.2),
                              "max": max(as_served, default=None)},
                "by_place": {"bins": len(placed),
                             "within_1_2": sum(1 for r in placed if r <= 1.2),
                             "max": max(placed, default=None)},
                "over_1_2": over,
                "share_best_place": share,
                "share_best_place_mean": round(statistics.fmean(share.values()), 3)}
        groups.append({"group": g, "crossings": cross, "best_place_over_time": best_at,
                       "best_p50_over_time": best, "modes": out_modes})
    summary = {}
    for mode in ("cloud", "static", "policy"):
        ms = [grp["modes"][mode] for grp in groups]
        rs = [r for m in ms for r in m["reactions"]]
        old = [grp["modes"][mode] for grp in run["groups"]]

        def frac(key: str, ms: list = ms) -> str:
            return f"{sum(m[key]['within_1_2'] for m in ms)}/{sum(m[key]['bins'] for m in ms)}"

        s = {"bins_within_1_2": frac("as_served"), "by_place_within_1_2": frac("by_place"),
             "ratio_max": max((m["as_served"]["max"] or 0 for m in ms), default=None),
             "reactions_within_goal": f"{sum(r['within_goal'] for r in rs)}/{len(rs)}",
             "reaction_max_s": max((r["reaction_s"] for r in rs
                                    if r["reaction_s"] is not None), default=None),
             "moves_per_crossing_max": max((r["moves"] for r in rs), default=0),
             "share_best_place_mean": round(statistics.fmean(
                 m["share_best_place_mean"] for m in ms), 3),
             "failed": sum(m["failed"] for m in old),
             "keys_lost": sum(m["keys_lost"] for m in old)}
        s["goal"] = {
            "p50_within_1_2_after_window": all(m["as_served"]["within_1_2"]
                                               == m["as_served"]["bins"] for m in ms),
            "reactions_within_goal": all(r["within_goal"] for r in rs),
            "one_move_per_crossing": s["moves_per_crossing_max"] <= 1,
            "no_failed_request": s["failed"] == 0, "no_key_lost": s["keys_lost"] == 0}
        summary[mode] = s
    gain = run["summary"]["gain"]
    summary["gain"] = gain
    summary["policy"]["goal"]["gain_over_cloud_and_static"] = min(gain.values()) > 1.0
    return {"best": "place (the cloud included)", "window_s": GOAL_S, "groups": groups,
            "summary": summary}


def summarise(groups: list[dict], events: list[dict]) -> dict:
    out = {}
    for mode in ("cloud", "static", "policy"):
        ms = [g["modes"][mode] for g in groups]
        out[mode] = {
            "p50_ms": statistics.median(m["p50_ms"] for m in ms if "p50_ms" in m),
            "p95_ms": statistics.median(m["p95_ms"] for m in ms if "p95_ms" in m),
            "failed": sum(m["failed"] for m in ms),
            "requests": sum(m["requests"] for m in ms),
            "share_best_mean": round(statistics.fmean(m["share_best_mean"] for m in ms), 3),
            "switches_per_crossing_max": max(m["switches_per_crossing"] or 0 for m in ms),
            "bins_within_1_2": f"{sum(m['ratio_to_best_after_reaction']['within_1_2'] for m in ms)}"
                               f"/{sum(m['ratio_to_best_after_reaction']['bins'] for m in ms)}",
            "placement_within_1_2":
                f"{sum(m['placement_to_best_after_reaction']['within_1_2'] for m in ms)}"
                f"/{sum(m['placement_to_best_after_reaction']['bins'] for m in ms)}",
            "to_same_place_pin_over_under_1_2":
                f"{sum(m['to_same_place_pin']['over_1_2'] for m in ms)}"
                f"/{sum(m['to_same_place_pin']['under_1_2'] for m in ms)}"
                f" of {sum(m['to_same_place_pin']['bins'] for m in ms)}",
            "keys_lost": sum(m["keys_lost"] for m in ms),
            "edge_server_s": round(sum(m["edge_server_s"] for m in ms), 1),
        }
        rs = [r for m in ms for r in m["reactions"]]
        if mode != "cloud":
            out[mode] |= {
                "reactions_within_goal": f"{sum(r['within_goal'] for r in rs)}/{len(rs)}",
                "reaction_max_s": max((r["reaction_s"] for r in rs
                                       if r["reaction_s"] is not None), default=None),
                "moves_per_crossing_max": max((r["moves"] for r in rs), default=0)}
    pol = out["policy"]["p50_ms"]
    out["gain"] = {"p50_cloud_over_policy": round(out["cloud"]["p50_ms"] / pol, 2),
                   "p50_static_over_policy": round(out["static"]["p50_ms"] / pol, 2)}
    out["decisions"] = {f"{e['kind']}:{e['reason']}": 0 for e in events}
    for e in events:
        out["decisions"][f"{e['kind']}:{e['reason']}"] += 1
    out["decisions_failed"] = sum(1 for e in events if not e["ok"])
    return out


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(r, g) for r in runs for g in r["groups"]]
    fig, axes = plt.subplots(len(rows), 1, figsize=(12, 3.2 * len(rows)), squeeze=False)
    colors = {"cloud": "tab:gray", "static": "tab:orange", "policy": "tab:blue"}
    for ax, (r, g) in zip(axes[:, 0], rows, strict=True):
        xs = [b * BIN_S for b in range(len(g["best_p50_over_time"]))]
        for mode, m in g["modes"].items():
            ax.plot(xs, m["p50_over_time"], color=colors[mode], label=f"{mode} p50")
            ax.plot(xs, m["p95_over_time"], color=colors[mode], ls=":", lw=0.8,
                    label=f"{mode} p95")
        ax.plot(xs, g["best_p50_over_time"], color="k", lw=0.8, ls="--",
                label="best node p50")
        if "by_place" in r:
            place = next(p for p in r["by_place"]["groups"] if p["group"] == g["group"])
            ax.plot(xs, place["best_p50_over_time"], color="tab:purple", lw=3, alpha=0.4,
                    label="best place p50 (cloud included)")
        for c in g["crossings"]:
            ax.axvline(c["t"], color="tab:green", alpha=0.4)
        node, d0, d1 = DOWN
        scale = r["span_s"] / SPAN_S
        ax.axvspan(d0 * scale, d1 * scale, color="tab:red", alpha=0.08,
                   label=f"bed{node} down")
        ax.set_yscale("log")
        ax.set_ylabel("request ms")
        ax.set_title(f"{r['wan']} cloud ({r['cloud_ms']:.0f} ms a request), group {g['group']} "
                     f"(static on bed{g['static_node']}; green: best node changes)",
                     fontsize=9)
        ax.legend(fontsize=6, ncol=4, loc="upper left")
    axes[-1, 0].set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="far cloud, the trace in 60 s, "
                    "2 users a set, to /tmp/enorm-bench-quick")
    ap.add_argument("--users", type=int, help="users per set (default 3; quick 2)")
    ap.add_argument("--wan", nargs="*", choices=sorted(WAN), help="default: near far")
    ap.add_argument("--scale", type=float, help="the trace's time scale (default 1; "
                    "quick 0.5)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--settle", type=float, default=0.0, help="seconds between the "
                    "placements and the users' start (default 0): a new server's first "
                    "seconds told from the policy's")
    ap.add_argument("--counters", action="store_true", help="keep each container's CPU, "
                    "throttling, cpuset and request log, the host CPUs' and the daemons' "
                    "CPU (bench.newserver's sampler) in the results")
    ap.add_argument("--reanalyse", type=Path, metavar="JSON", help="no run: measure a "
                    "results file again by the best place (`by_place`), written to --out "
                    "(default: beside it)")
    a = ap.parse_args(argv)
    if a.reanalyse is not None:
        data = json.loads(a.reanalyse.read_text())
        out = a.out or a.reanalyse.parent
        write(data, out)
        return
    per_set = a.users or (2 if a.quick else 3)
    scale = a.scale or (0.5 if a.quick else 1.0)
    wans = a.wan or (["far"] if a.quick else ["near", "far"])
    out = a.out or (Path("/tmp/enorm-bench-quick") if a.quick else RESULTS)
    wall0 = time.monotonic()
    load0 = os.getloadavg()
    # 3 pins + the policy's servers + its standbys: room for 12 0.25-core units a node
    with Testbed(nodes=3, users_per_node=per_set * len(SETS), node_cores=3.0,
                 node_memory_mb=2600, unit_cores=0.25) as bed:  # fmt: skip
        bed.access(ACCESS)
        runs = [run(bed, wan, per_set, scale, a.settle, a.counters) for wan in wans]
    data = {"experiment": "users walking between three edge nodes: cloud vs static vs the "
                          "policy (issue 31)",
            "trace": {str(g): TRACE[g] for g in NODES}, "trace_scale": scale,
            "down": DOWN, "edge_ms": EDGE_MS, "slope_ms": SLOPE_MS, "access": ACCESS,
            "users_per_set": per_set, "policy": POLICY, "settle_s": a.settle, "runs": runs,
            "loadavg_at_start": load0, "loadavg_at_end": os.getloadavg(),
            "wall_s": round(time.monotonic() - wall0, 1)}
    write(data, out)


def where_time_went(run: dict) -> dict:
    """With `--counters`: whether the policy's servers were slower themselves than the
    pin on the same node (their request logs: the edge server's own time a call, by the
    server's age, in the first `YOUNG_S` and after), what the node daemons (a move's
    start, an old server's merge and end: on real boards on another board, here on the
    same 2 CPUs) took of the machine, and for each bin over 1.2x (by the best place) the
    policy's server's own time over the pin's in it."""
    c, logs = run["counters"], run["counters"]["server_ms"]

    def med(lines: list, lo: float, hi: float) -> float | None:
        v = [ms for t, ms in lines if lo <= t < hi]
        return statistics.median(v) if len(v) >= 6 else None

    pairs: dict[str, list] = {"young": [], "old": []}
    # (group, bin start) -> (calls, policy / pin): in a bin with two of the group's
    # servers (a move in it), the one that served more of its calls
    own: dict[tuple[int, float], tuple[int, float]] = {}
    for label, lines in logs.items():
        if not label.startswith("policy-") or not lines:
            continue
        g, node = int(label[8:label.index("@")]), label[label.index("@") + 4:label.index("#")]
        pin, first = logs.get(f"pin{node}-g{g}", []), min(t for t, _ in lines)
        for b in range(int(first // BIN_S) + 1, int(run["span_s"] // BIN_S) + 1):
            a, z = med(lines, b * BIN_S, (b + 1) * BIN_S), med(pin, b * BIN_S, (b + 1) * BIN_S)
            if a is not None and z is not None:
                pairs["young" if b * BIN_S - first < YOUNG_S else "old"].append((a, z))
                calls = sum(1 for t, _ in lines if b * BIN_S <= t < (b + 1) * BIN_S)
                if calls > own.get((g, b * BIN_S), (0, 0.0))[0]:
                    own[g, b * BIN_S] = (calls, round(a / z, 2))
    host = c["host"]
    daemons = [sum(h["daemons"].values()) for h in host]
    over = [{"group": grp["group"], **o,
             "server_own_ratio": own.get((grp["group"], o["t"]), (0, None))[1]}
            for grp in run["by_place"]["groups"] for o in grp["modes"]["policy"]["over_1_2"]]
    return {
        "server_own_ms": {k: {"bins": len(v),
                              "policy_ms": round(statistics.median(a for a, _ in v), 3),
                              "pin_ms": round(statistics.median(z for _, z in v), 3),
                              "ratio_median": round(statistics.median(a / z for a, z in v), 2)}
                          for k, v in pairs.items() if v},
        "daemons_cores": {"mean": round(statistics.fmean(daemons), 3), "max_1s": max(daemons)}
        if daemons else None,
        "machine_busy": round(statistics.fmean(sum(h["cpus"].values()) / len(h["cpus"])
                                               for h in host), 2) if host else None,
        "over_1_2": over}


def write(data: dict, out: Path) -> None:
    """Each run measured by the best place too; the JSON, the plot, the summary."""
    for r in data["runs"]:
        r["by_place"] = by_place(r)
        if "counters" in r:
            r["by_place"]["where_time_went"] = where_time_went(r)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mobility.json").write_text(json.dumps(data, separators=(",", ":")))
    plot(data["runs"], out / "mobility.png")
    for r in data["runs"]:
        s, p = r["summary"], r["by_place"]["summary"]
        print(f"{r['wan']} cloud ({r['cloud_ms']:.0f} ms a request; calibration "
              f"{r['calibration']}):")
        for mode in ("cloud", "static", "policy"):
            m, q = s[mode], p[mode]
            print(f"  {mode:7s} p50 {m['p50_ms']} ms p95 {m['p95_ms']} ms, best node "
                  f"{m['share_best_mean'] * 100:.0f}% of the time, within 1.2x of best "
                  f"{m['bins_within_1_2']} bins (its place {m['placement_within_1_2']}; "
                  f"over/under 1.2x the pin where it is {m['to_same_place_pin_over_under_1_2']}"
                  f"), failed {m['failed']}/{m['requests']}, "
                  f"keys lost {m['keys_lost']}, edge server-s {m['edge_server_s']}")
            if mode != "cloud":
                print(f"          reactions < {GOAL_S:.0f} s {m['reactions_within_goal']} "
                      f"(max {m['reaction_max_s']} s), moves per crossing <= "
                      f"{m['moves_per_crossing_max']}")
            print(f"          by the best place (cloud included): at it "
                  f"{q['share_best_place_mean'] * 100:.0f}% of the time, within 1.2x "
                  f"{q['bins_within_1_2']} bins after {GOAL_S:.0f} s windows (by place "
                  f"{q['by_place_within_1_2']}, worst {q['ratio_max']}x), reactions "
                  f"< {GOAL_S:.0f} s {q['reactions_within_goal']} (max {q['reaction_max_s']}"
                  f" s), moves per crossing <= {q['moves_per_crossing_max']}; goal {q['goal']}")
        if "where_time_went" in r["by_place"]:
            w = r["by_place"]["where_time_went"]
            over = [(o["group"], o["t"], o["ratio"], o["server_own_ratio"])
                    for o in w["over_1_2"]]
            print(f"  where the time went: the policy's servers' own time a call "
                  f"{w['server_own_ms']} (the pin's beside); node daemons "
                  f"{w['daemons_cores']} cores, machine busy {w['machine_busy']}; "
                  f"bins over 1.2x (group, t, ratio, server's own ratio) {over}")
        print(f"  gain: {s['gain']}; decisions {s['decisions']} "
              f"({s['decisions_failed']} failed)")
    print(f"wrote {out / 'mobility.json'} (the run took {data['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
