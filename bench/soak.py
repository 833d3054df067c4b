"""Soak: many handshake/termination cycles from concurrent clients against a real node.

No cycle may fail or be refused (each client holds one unit at most, the node has room
for all), and at the end nothing may be left over (container, directory, veth, iptables
rule, port, store record, mount, loop device, id claim); no sample may show more
allocated than the node's capacity (the suite's short run also bounds the RSS to 1.1x its
start). The RSS is sampled against the cycles done: a long run (at least
`TREND_MIN_CYCLES`) fails when it still rises over the last third (a least-squares line,
`TREND_MAX_RISE_MB`) or spreads over more than `FLAT_MB` in the last two thirds. A
second phase creates and deletes servers with 100,000 users and records the RSS after
each cycle.

    flock /run/enorm-bench.lock python -m bench.soak [--cycles 10000] [--clients 8] [--big 10]

Writes bench/results/soak.json and soak.png (or into --out).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lxc
import psutil
import requests

from games.local import LocalEdgeNode

RESULTS = Path(__file__).resolve().parent / "results"
NAME, BRIDGE = "bsoak", "enbsoak0"
NODE = dict(name=NAME, bridge=BRIDGE, subnet="10.81.0.0/24", port_range=[26000, 26999],
            listen_port=18680, cores=2.0, memory_mb=4096, reserve_cores=0.0,
            reserve_memory_mb=0, unit={"cores": 0.25, "memory_mb": 64},
            basic_service="reserve", autoscale_interval_s=86400,
            tokens={"soak-token": "soak"}, operator_token="soak-operator",
            max_pending_per_owner=4)
# A long run's RSS must be flat: no more rise than this over its last third (a line
# fitted to the samples), no more spread than this over its last two thirds.
TREND_MIN_CYCLES = 3000
TREND_MAX_RISE_MB = 1.0
FLAT_MB = 2.0


def slot_node(slot: int) -> dict:
    """The node of a slot: slot 0 is the soak's own; slot 1 has other names, subnet and
    ports, so that two variants (e.g. of the daemon's malloc settings) soak side by side
    on one machine, sharing its load."""
    if not slot:
        return NODE
    return {**NODE, "name": f"bsoak{slot}", "bridge": f"enbsoak{slot}",
            "subnet": f"10.81.{slot}.0/24", "port_range": [26000 + 1000 * slot,
                                                         26999 + 1000 * slot],
            "listen_port": 18680 + slot}


def leftovers(node_ports_free: int, offer: dict, name: str = NAME,
              bridge: str = BRIDGE) -> dict:
    """What a finished soak must not leave behind, by kind (empty lists when clean)."""
    rules = []
    for table in ("nat", "filter"):
        out = subprocess.run(["iptables", "-w", "-t", table, "-S"], capture_output=True,
                             text=True, check=True).stdout
        rules += [ln for ln in out.splitlines() if f"enorm:{name}:" in ln]  # per server
    veths = subprocess.run(["ip", "-o", "link", "show", "master", bridge],
                           capture_output=True, text=True).stdout.splitlines()
    ours = f"enorm-{name}-"
    pool = f"{ours}layer-pool"  # the serving node's own layers made ahead, not leftovers
    with open("/proc/self/mountinfo") as f:
        mounts = [p for ln in f if ours in (p := ln.split()[4]) and pool not in p]
    loops = [ln for ln in subprocess.run(["losetup", "-a"], capture_output=True,
                                          text=True).stdout.splitlines()
             if ours in ln and pool not in ln]
    claims_dir = Path("/var/lib/lxc/.enorm-idmap")
    claims = [p.name for p in claims_dir.iterdir()
              if p.is_file() and p.read_text().startswith(ours)] if claims_dir.is_dir() else []
    return {
        "containers": [c for c in lxc.list_containers() if c.startswith(ours)],
        # with a config or without (a destroy cut short)
        "directories": sorted(p.name for p in Path("/var/lib/lxc").glob(ours + "*")
                              if p.name != pool),
        "veths": veths,
        "forward_rules": rules,
        "records": offer["servers"],
        "ports_held": node_ports_free - offer["ports_free"],
        "mounts": mounts,  # overlay, idmapped base, sized writable layer
        "loop_devices": loops,
        "id_claims": claims,
    }


def run(cycles: int, clients: int, big: int, slot: int = 0,
        partial: Path | None = None) -> dict:
    """The soak; `partial`: where the samples so far are written every minute (what a
    long run cut short leaves)."""
    settings = slot_node(slot)
    with tempfile.TemporaryDirectory(prefix=f"enorm-{settings['name']}-") as tmp:
        key = Path(tmp) / "key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                       check=True)
        pub = key.with_suffix(".pub").read_text().strip()
        node = LocalEdgeNode(**settings, state_dir=f"{tmp}/state")
        node.start()
        try:
            return _soak(node, pub, cycles, clients, big, partial)
        finally:
            node.close()


def _soak(node: LocalEdgeNode, pub: str, cycles: int, clients: int, big: int,
          partial: Path | None) -> dict:
    url = node.url
    tenant = requests.Session()
    tenant.headers["Authorization"] = "Bearer soak-token"
    op = requests.Session()
    op.headers["Authorization"] = "Bearer soak-operator"
    proc = psutil.Process(node.proc.pid)  # type: ignore[union-attr]
    rss = lambda: proc.memory_info().rss / 2**20  # noqa: E731
    ports_free = op.get(url + "/v1/node", timeout=10).json()["ports_free"]
    body = {"app": "soak", "priority": 5, "ports": [8080], "latency_objective_ms": 50,
            "ssh_public_key": pub, "users": [{"id": "u1", "address": "10.1.0.1"}]}
    counts = {"ok": 0, "refused": 0, "errors": 0}
    done = [0]  # cycles finished (of the measured run)
    errors: list[str] = []
    lock = threading.Lock()

    handshakes: list[float] = []

    def cycle(_: int) -> None:
        s = requests.Session()
        s.headers["Authorization"] = "Bearer soak-token"
        t = time.perf_counter()
        r = s.post(url + "/v1/servers", json=body, timeout=120)
        if r.status_code == 201:
            with lock:
                handshakes.append(time.perf_counter() - t)
            d = s.delete(f"{url}/v1/servers/{r.json()['server_id']}", timeout=120)
            what = "ok" if d.status_code == 200 else "errors"
            detail = d.text
        else:
            what = "refused" if r.status_code == 409 else "errors"
            detail = r.text
        with lock:
            counts[what] += 1
            done[0] += 1
            if what == "errors" and len(errors) < 20:
                errors.append(detail[:300])

    samples: list[dict] = []
    stop = threading.Event()

    def sample() -> None:
        t0 = time.monotonic()
        while not stop.is_set():
            o = op.get(url + "/v1/node", timeout=10).json()
            samples.append({"t": round(time.monotonic() - t0, 2), "cycle": done[0],
                            "rss_mb": round(rss(), 2),
                            "cores": o["allocated"]["cores"],
                            "memory_mb": o["allocated"]["memory_mb"],
                            "cap_cores": o["capacity"]["cores"] - o["reserved"]["cores"],
                            "cap_memory_mb": o["capacity"]["memory_mb"]
                            - o["reserved"]["memory_mb"]})
            if partial is not None and len(samples) % 240 == 0:
                partial.write_text(json.dumps({"cycles": cycles, "counts": counts,
                                               "samples": samples}))
            stop.wait(0.25)

    with ThreadPoolExecutor(clients) as pool:  # warm-up: every worker thread once
        list(pool.map(cycle, range(clients * 2)))
    handshakes.clear()
    done[0] = 0
    time.sleep(0.5)
    load_start = os.getloadavg()
    rss_start = rss()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(cycle, range(cycles)))
    wall = time.perf_counter() - t0
    load_end = os.getloadavg()
    stop.set()
    sampler.join()
    time.sleep(0.5)
    rss_end = rss()
    over = [s for s in samples if s["cores"] > s["cap_cores"] + 1e-9
            or s["memory_mb"] > s["cap_memory_mb"]]

    big_rss = []
    if big:
        users = [{"id": f"u{i}", "address": f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"}
                 for i in range(100_000)]
        big_rss.append(round(rss(), 1))
        for _ in range(big):
            r = tenant.post(url + "/v1/servers", json={**body, "users": users}, timeout=300)
            if r.status_code == 201:  # a launch failure is counted above, not here
                tenant.delete(f"{url}/v1/servers/{r.json()['server_id']}",
                              timeout=300).raise_for_status()
            big_rss.append(round(rss(), 1))
    # The last terminations' releases (forwards, container, guard) run after their
    # answers: what is left is judged once they are done.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and re.search(
            r"^enorm_releases_pending [1-9]", op.get(url + "/metrics", timeout=10).text, re.M):
        time.sleep(0.05)
    offer = op.get(url + "/v1/node", timeout=10).json()
    return {
        "cycles": cycles, "clients": clients, "wall_s": round(wall, 1),
        "cycles_per_s": round(cycles / wall, 2), **counts, "error_samples": errors,
        "rss_start_mb": round(rss_start, 1), "rss_end_mb": round(rss_end, 1),
        "rss_ratio": round(rss_end / rss_start, 3),
        "samples": len(samples), "samples_over_capacity": len(over),
        "max_allocated_cores": max((s["cores"] for s in samples), default=0),
        "capacity_cores": samples[0]["cap_cores"] if samples else None,
        "rss_trend": rss_trend(samples, cycles),
        "big_cycles_rss_mb": big_rss,
        "handshake_s": _quantiles(handshakes),
        "leftovers": leftovers(ports_free, offer, node.config.name, node.config.bridge),
        "raw": {"samples": samples},
        "loadavg": {"start": [round(x, 2) for x in load_start],
                    "end": [round(x, 2) for x in load_end]},
        "machine_cpus": os.cpu_count(),
    }


def rss_trend(samples: list[dict], cycles: int) -> dict:
    """The RSS against the cycles done: the rise of a least-squares line over the last
    third, the spread (max - min) over the last two thirds, and whether it is flat."""
    def part(lo: float) -> list[tuple[int, float]]:
        return [(s["cycle"], s["rss_mb"]) for s in samples if s["cycle"] >= lo * cycles]

    last, two = part(2 / 3), part(1 / 3)
    if len(last) < 2 or last[0][0] == last[-1][0]:
        return {"judged": False, "why": "too few samples"}
    n, sx, sy = len(last), sum(c for c, _ in last), sum(r for _, r in last)
    sxx, sxy = sum(c * c for c, _ in last), sum(c * r for c, r in last)
    slope = (n * sxy - sx * sy) / (n * sxx - sx * sx)  # MB per cycle
    rise = slope * (last[-1][0] - last[0][0])
    spread = max(r for _, r in two) - min(r for _, r in two)
    judged = cycles >= TREND_MIN_CYCLES
    return {"judged": judged, "rise_last_third_mb": round(rise, 3),
            "kb_per_1000_cycles": round(slope * 1000 * 1024, 1),
            "spread_last_two_thirds_mb": round(spread, 2),
            "flat": rise <= TREND_MAX_RISE_MB and spread <= FLAT_MB}


def _quantiles(xs: list[float]) -> dict:
    if not xs:
        return {"n": 0}
    xs = sorted(xs)
    at = lambda q: round(xs[min(len(xs) - 1, int(q * len(xs)))], 3)  # noqa: E731
    return {"n": len(xs), "p50": at(0.5), "p95": at(0.95), "p99": at(0.99),
            "max": round(xs[-1], 3)}


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    s = res["raw"]["samples"]
    c = [x["cycle"] for x in s]
    a.plot(c, [x["rss_mb"] for x in s], color="green", label="daemon RSS (MB)")
    for third in (1, 2):
        a.axvline(res["cycles"] * third / 3, color="grey", linestyle=":")
    a2 = a.twinx()
    a2.plot(c, [x["cores"] for x in s], color="tab:blue", alpha=0.3, label="allocated cores")
    if s:
        a2.axhline(s[0]["cap_cores"], color="red", linestyle="--", label="capacity")
    a.set_xlabel("cycles (handshake + termination)")
    a.set_ylabel("daemon RSS (MB)")
    trend = res["rss_trend"]
    a.set_title(f"{res['cycles']} cycles, {res['clients']} clients; last third "
                f"{trend.get('rise_last_third_mb', '?')} MB, spread "
                f"{trend.get('spread_last_two_thirds_mb', '?')} MB", fontsize=9)
    a.legend(loc="upper left")
    a2.legend(loc="lower right")
    b.plot(range(len(res["big_cycles_rss_mb"])), res["big_cycles_rss_mb"], marker="o")
    b.set_xlabel("create+delete cycles with 100,000 users")
    b.set_ylabel("daemon RSS (MB)")
    b.set_title("RSS with big setup requests")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cycles", type=int, default=10_000)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--big", type=int, default=10, help="cycles with 100,000 users")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--slot", type=int, default=0, choices=(0, 1, 2),
                    help="1, 2: another node's names and ports, to soak side by side")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    res = run(args.cycles, args.clients, args.big, args.slot, args.out / "soak-partial.json")
    (args.out / "soak.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / "soak-partial.json").unlink(missing_ok=True)
    plot(res, args.out / "soak.png")
    print(json.dumps({k: v for k, v in res.items() if k != "raw"}, indent=2))
    if failed := verdict(res):
        sys.exit("soak: " + "; ".join(failed))


def verdict(res: dict) -> list[str]:
    """What failed. Each client holds at most one unit and the node has room for all of
    them: a refusal means a unit was not given back (a termination cut short)."""
    left = {k: v for k, v in res["leftovers"].items() if v}
    trend = res["rss_trend"]
    return [*([f"{res['errors']} cycles failed: {res['error_samples'][:3]}"]
              if res["errors"] else []),
            *([f"{res['refused']} handshakes refused"] if res["refused"] else []),
            *([f"left over: {left}"] if left else []),
            *([f"{res['samples_over_capacity']} samples over capacity"]
              if res["samples_over_capacity"] else []),
            *([f"the daemon's RSS is not flat: {trend}"]
              if trend["judged"] and not trend["flat"] else [])]


if __name__ == "__main__":
    main()
