"""A new edge server's first seconds beside an old one on the same node (issue 31): why
the policy's users, just moved, were 1.2-1.3x slower than the pin on their node.

Two nodes on the testbed; three sets of paced users (`bench.load`, one game request
every 0.5 s each) in one namespace, all at node 0's distance:
  A  the pin: offloaded to node 0 before the users start, served there throughout;
  B  offloaded to node 1 before the start; at `--handover-at` handed over to node 0
     (`CloudManager.handover`: a new server on node 0, the old one on node 1 ended and
     merged home: what a policy's handover does);
  C  on the cloud until `--offload-at`, then offloaded to node 0 (a new server, nothing
     ending beside it: what a policy's offload does).
Per `BIN_S` bin: each set's p50, and each container's counters: CPU (cpuacct), CFS
throttling (cpu.stat nr_throttled, throttled_time), its cpuset, its processes' CPU; the
node daemons' CPU (their children included: mkfs, mount, lxc-*); each host CPU's busy
share (/proc/stat), so that a new server's slow bins can be put beside what ran.

    flock /run/enorm-bench.lock .venv/bin/python -m bench.newserver [--span 80]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from pathlib import Path

from bench.latency import RESULTS
from bench.load import Load
from bench.testbed import Testbed
from bench.testbed.cost import TICK, process_cpu_s

BIN_S = 2.0
SAMPLE_S = 0.5
CG = Path("/sys/fs/cgroup")


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def container_counters(name: str) -> dict:
    """One container's counters now: CPU ns, throttling, cpuset, its processes' CPU."""
    group = f"lxc.payload.{name}"
    stat = dict(line.split() for line in _read(CG / "cpu" / group / "cpu.stat").splitlines())
    procs = {}
    for pid in _read(CG / "cpu" / group / "cgroup.procs").split():
        raw = _read(Path(f"/proc/{pid}/stat"))
        if not raw:
            continue
        comm = raw[raw.index("(") + 1:raw.rindex(")")]
        fields = raw.rsplit(")", 1)[1].split()
        procs[comm] = procs.get(comm, 0.0) + (int(fields[11]) + int(fields[12])) / TICK
    return {"cpu_s": int(_read(CG / "cpuacct" / group / "cpuacct.usage") or 0) / 1e9,
            "nr_periods": int(stat.get("nr_periods", 0)),
            "nr_throttled": int(stat.get("nr_throttled", 0)),
            "throttled_s": int(stat.get("throttled_time", 0)) / 1e9,
            "cpuset": _read(CG / "cpuset" / group / "cpuset.cpus").strip(),
            "procs": procs}


def cpu_busy() -> dict[str, float]:
    """Each host CPU's busy seconds (all but idle and iowait)."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        f = line.split()
        if f[0].startswith("cpu") and f[0] != "cpu":
            v = [int(x) for x in f[1:9]]
            out[f[0]] = (sum(v) - v[3] - v[4]) / TICK
    return out


class Sampler(threading.Thread):
    """Every container of the nodes, the daemons and the CPUs, every `every` seconds;
    and each container's request log as it grows (`logs`: name -> [(start, path, ms)],
    the edge server's own time for each request)."""

    def __init__(self, bed: Testbed, every: float = SAMPLE_S) -> None:
        super().__init__(daemon=True)
        self.bed, self.every, self.samples, self.stop = bed, every, [], threading.Event()
        self.logs: dict[str, list] = {}
        self._read: dict[str, int] = {}

    def _tail(self, lxc_path: Path, name: str) -> None:
        path = lxc_path / name / "overlay" / "delta" / "var/log/enorm-app/requests.log"
        try:
            with open(path, "rb") as f:
                f.seek(self._read.get(name, 0))
                chunk = f.read()
        except OSError:
            return
        done = chunk.rfind(b"\n") + 1  # whole lines only
        self._read[name] = self._read.get(name, 0) + done
        for line in chunk[:done].decode(errors="replace").splitlines():
            t, path_, ms = line.split()
            self.logs.setdefault(name, []).append((float(t), path_, float(ms)))

    def run(self) -> None:
        nodes = [(b.node.config.container_prefix, Path(b.node.config.lxc_path))
                 for b in self.bed.edges]
        while not self.stop.is_set():
            names = [p.name.removeprefix("lxc.payload.") for prefix, _ in nodes
                     for p in (CG / "cpu").glob(f"lxc.payload.{prefix}*")]
            for prefix, lxc_path in nodes:
                for name in names:
                    if name.startswith(prefix):
                        self._tail(lxc_path, name)
            self.samples.append({
                "t": time.time(), "cpus": cpu_busy(), "loadavg": os.getloadavg(),
                "nodes": {b.name: process_cpu_s(b.node.proc.pid) for b in self.bed.edges
                          if b.node.proc is not None},
                "containers": {n: container_counters(n) for n in names}})
            self.stop.wait(self.every)


def p50(ms: list[float]) -> float | None:
    return round(statistics.median(ms), 1) if ms else None


def run(span: float, per_set: int, handover_at: float, offload_at: float) -> dict:
    sets = ("A", "B", "C")
    with Testbed(nodes=2, users_per_node=per_set * len(sets), node_cores=3.0,
                 node_memory_mb=2600, unit_cores=0.25) as bed:  # fmt: skip
        bed.access("wifi")
        bed.wan("near")
        ns = bed.edges[0].users
        addrs = ns.addrs[: per_set * len(sets)]
        load = Load(ns.name, bed.cloud_url, addrs, span, "paced", trace="who", prefix="ns-")
        uids = load.start()
        users = {s: list(zip(uids, addrs, strict=True))[i * per_set:(i + 1) * per_set]
                 for i, s in enumerate(sets)}
        a = bed.offload(users["A"], exclude=["bed1"])
        b = bed.offload(users["B"], exclude=["bed0"])
        sampler = Sampler(bed)
        sampler.start()
        moves: dict[str, dict] = {}
        t0 = load.go()

        def later(at: float, what: str, fn) -> threading.Thread:
            def go() -> None:
                time.sleep(max(0.0, t0 + at - time.time()))
                start = time.time()
                moves[what] = {"t": round(start - t0, 2), **fn(),
                               "seconds": round(time.time() - start, 2)}
            th = threading.Thread(target=go)
            th.start()
            return th

        movers = [later(handover_at, "B", lambda: bed.handover(b["server_id"], to="bed0")),
                  later(offload_at, "C", lambda: bed.offload(users["C"], exclude=["bed1"]))]
        out = load.run()
        for th in movers:
            th.join()
        sampler.stop.set()
        sampler.join()
        servers = {"A": [a["server_id"]], "B": [b["server_id"], moves["B"]["server_id"]],
                   "C": [moves["C"]["server_id"]]}
        for sid in (a["server_id"], moves["B"]["server_id"], moves["C"]["server_id"]):
            bed.withdraw(sid)
        prefixes = {b.name: b.node.config.container_prefix for b in bed.edges}
    return {"t0": t0, "span_s": span, "per_set": per_set, "a": a, "b": b, "moves": moves,
            "servers": servers, "prefixes": prefixes, "trace": out["trace"],
            "samples": sampler.samples, "logs": sampler.logs}


def analyse(r: dict) -> dict:
    """Per bin: each set's p50 and where it was served; each container's CPU ms per
    second, throttled periods and seconds; the daemons' CPU; each host CPU's busy."""
    t0, bins = r["t0"], int(r["span_s"] // BIN_S)
    per_set = r["per_set"]
    name_of = {i: "ABC"[i // per_set] for i in range(3 * per_set)}
    ms: dict[str, list[list[float]]] = {s: [[] for _ in range(bins)] for s in "ABC"}
    where: dict[str, list[set]] = {s: [set() for _ in range(bins)] for s in "ABC"}
    for t, v, who, server in r["trace"]:
        b = int((t - t0) // BIN_S)
        if 0 <= b < bins and v is not None:
            ms[name_of[who]][b].append(v)
            where[name_of[who]][b].add(server.rsplit(":", 1)[-1] if server else None)
    label = {}  # container name -> set letter + its node
    for s, sids in r["servers"].items():
        for sid in sids:
            for node, prefix in r["prefixes"].items():
                label[f"{prefix}{sid}"] = f"{s}@{node}"
    samples = r["samples"]
    rows = []
    for b in range(bins):
        lo, hi = t0 + b * BIN_S, t0 + (b + 1) * BIN_S
        win = [x for x in samples if lo <= x["t"] < hi + SAMPLE_S]
        row = {"t": b * BIN_S, **{f"p50_{s}": p50(ms[s][b]) for s in "ABC"},
               "ports": {s: sorted(p or "cloud" for p in where[s][b]) for s in "ABC"}}
        if len(win) >= 2:
            x0, x1 = win[0], win[-1]
            dt = x1["t"] - x0["t"]
            row["cpu_busy"] = {c: round((x1["cpus"][c] - x0["cpus"][c]) / dt, 2)
                               for c in x1["cpus"]}
            row["daemons_cpu"] = {n: round((x1["nodes"][n] - x0["nodes"].get(n, 0)) / dt, 2)
                                  for n in x1["nodes"]}
            row["loadavg"] = x1["loadavg"][0]
            cs = {}
            for name, c1 in x1["containers"].items():
                c0 = x0["containers"].get(name)
                if c0 is None:
                    c0 = {"cpu_s": 0.0, "nr_throttled": 0, "throttled_s": 0.0,
                          "nr_periods": 0, "procs": {}}
                procs = {p: round((v - c0["procs"].get(p, 0.0)) / dt, 2)
                         for p, v in c1["procs"].items()}
                cs[label.get(name, name)] = {
                    "cpu": round((c1["cpu_s"] - c0["cpu_s"]) / dt, 3),
                    "throttled": c1["nr_throttled"] - c0["nr_throttled"],
                    "periods": c1["nr_periods"] - c0["nr_periods"],
                    "throttled_s": round(c1["throttled_s"] - c0["throttled_s"], 3),
                    "cpuset": c1["cpuset"],
                    "busy_procs": {p: v for p, v in procs.items() if v >= 0.02}}
            row["containers"] = cs
        rows.append(row)
    return {"bins": rows, "moves": r["moves"]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--span", type=float, default=80.0)
    ap.add_argument("--users", type=int, default=3, help="users per set")
    ap.add_argument("--handover-at", type=float, default=10.0)
    ap.add_argument("--offload-at", type=float, default=45.0)
    ap.add_argument("--out", type=Path, default=RESULTS / "newserver.json")
    a = ap.parse_args(argv)
    load0 = os.getloadavg()
    r = run(a.span, a.users, a.handover_at, a.offload_at)
    res = {"experiment": "a new server's first seconds beside an old one (issue 31)",
           "args": vars(a) | {"out": str(a.out)}, "loadavg_at_start": load0,
           "loadavg_at_end": os.getloadavg(), **analyse(r), "raw": r}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, separators=(",", ":")))  # per request: compact
    for row in res["bins"]:
        cs = row.get("containers", {})
        print(f"{row['t']:5.0f}  A {row['p50_A']}  B {row['p50_B']}  C {row['p50_C']}  "
              f"cpus {row.get('cpu_busy')}  daemons {row.get('daemons_cpu')}  " + "  ".join(
                  f"{k}[{v['cpuset']}] cpu {v['cpu']} thr {v['throttled']}/{v['periods']}"
                  f" {v['busy_procs']}" for k, v in sorted(cs.items())))
    print(f"moves {res['moves']}; load {load0} -> {res['loadavg_at_end']}; wrote {a.out}")


if __name__ == "__main__":
    main()
