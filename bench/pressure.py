"""Fast protection of the basic service: from the headroom threshold to the tenant stopped.

A real node (`enorm serve`, basic service "measured", the pressure watcher every
`--interval-s`, the auto-scaling round only every hour) holds four tenants of one unit
(300 MB, priorities 1..4). A process on the host (the board's own service) then grows
its memory at a fixed rate (`--rate-mb-s`) until it has taken the room of two tenants
plus the headroom. The bench samples every 5 ms, with the node's own arithmetic, the
memory left for the basic service (capacity - basic service - tenants' limits) and each
tenant's container state, and reports, per eviction, the time from the threshold
crossing that caused it to the container stopped; plus whether the kernel's OOM killer
ran (/proc/vmstat oom_kill) or the host swapped. Goal: under 1 s.

    flock /run/enorm-bench.lock python -m bench.pressure [--runs 3]

Writes bench/results/pressure.json. The node is `bpres` (containers enorm-bpres-*, bridge
enbpres0, 10.79.0.0/24), closed at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import lxc
import psutil
import requests

from bench.basic_service import _HOG, _used_mb, _vmstat
from games.local import LocalEdgeNode

RESULTS = Path(__file__).resolve().parent / "results"
UNIT_MB = 300
TENANTS = 4


def _mem_mb(container: str) -> float:
    try:
        c = lxc.Container(container)
        v = c.get_cgroup_item("memory.usage_in_bytes") or c.get_cgroup_item("memory.current")
        return int(v) / (1 << 20)
    except (KeyError, RuntimeError, TypeError, ValueError):
        return 0.0  # gone meanwhile


def _running(container: str) -> bool:
    try:
        return lxc.Container(container).running
    except RuntimeError:  # destroyed while we looked
        return False


def one_run(interval_s: float, headroom_mb: int, rate_mb_s: float, tmp: str) -> dict:
    used0 = _used_mb()
    capacity = int(used0 + TENANTS * UNIT_MB + headroom_mb + 300)
    node = LocalEdgeNode(
        name="bpres", bridge="enbpres0", subnet="10.79.0.0/24", port_range=[26000, 26099],
        listen_port=18620, cores=2.0, memory_mb=capacity, reserve_cores=0.0,
        reserve_memory_mb=0, basic_service="measured",
        unit={"cores": 0.1, "memory_mb": UNIT_MB}, autoscale_interval_s=3600,
        pressure_interval_s=interval_s, pressure_headroom_mb=headroom_mb,
        tokens={"bench-token": "bench"}, state_dir=f"{tmp}/state")
    key = Path(tmp) / "key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    pub = key.with_suffix(".pub").read_text().strip()
    node.start()
    hog = None
    try:
        s = requests.Session()
        s.headers["Authorization"] = "Bearer bench-token"
        servers = []
        for prio in range(1, TENANTS + 1):
            r = s.post(node.url + "/v1/servers", timeout=60, json={
                "app": "bench", "priority": prio, "ports": [8080],
                "users": [{"id": "1", "address": "127.0.0.2"}],
                "latency_objective_ms": 50, "override": True, "ssh_public_key": pub})
            r.raise_for_status()
            servers.append((prio, r.json()["container"]))
        time.sleep(2 * interval_s + 0.5)  # the watcher has measured the tenants
        oom0, swap0 = _vmstat("oom_kill"), psutil.swap_memory()
        base_basic = _used_mb() - sum(_mem_mb(c) for _, c in servers)
        target = 2 * UNIT_MB + headroom_mb + 150  # two tenants must go
        hog = subprocess.Popen([sys.executable, "-c", _HOG], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
        samples: list[tuple[float, float, dict[str, bool]]] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                alive = {c: _running(c) for _, c in servers}
                inside = 0.0
                for c, up in alive.items():
                    if up:
                        inside += _mem_mb(c)
                basic = _used_mb() - inside
                held = UNIT_MB * sum(alive.values())
                samples.append((time.monotonic(), capacity - basic - held, alive))
                time.sleep(0.005)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        t0 = time.monotonic()
        step_mb = max(1, int(rate_mb_s / 20))
        mb = 0
        while mb < target:
            mb += step_mb
            hog.stdin.write(f"{mb}\n")
            hog.stdin.flush()
            hog.stdout.readline()
            time.sleep(max(0.0, t0 + mb / rate_mb_s - time.monotonic()))
        time.sleep(3)
        stop.set()
        th.join()
        # Each eviction: from the first sample below the threshold while the tenant was
        # still running (and every lower-priority one already gone) to its stop.
        evictions = []
        for prio, c in servers:
            stopped = next((t for t, _, a in samples if not a[c]), None)
            if stopped is None:
                continue
            crossed = next((t for t, left, a in samples
                            if left < headroom_mb and a[c]
                            and not any(a[o] for p, o in servers if p < prio)), None)
            evictions.append({"priority": prio, "stopped_after_s": round(stopped - t0, 3),
                              "threshold_to_stopped_s": None if crossed is None
                              else round(stopped - crossed, 3)})
        swap1 = psutil.swap_memory()
        return {"capacity_mb": capacity, "basic_before_mb": round(base_basic),
                "hog_mb": mb, "evictions": evictions,
                "min_left_mb": round(min(left for _, left, _ in samples)),
                "oom_kills": _vmstat("oom_kill") - oom0,
                "swapped_mb": round((swap1.sin + swap1.sout - swap0.sin - swap0.sout)
                                    / (1 << 20), 1),
                "samples": len(samples)}
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
        node.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--interval-s", type=float, default=0.1)
    p.add_argument("--headroom-mb", type=int, default=200)
    p.add_argument("--rate-mb-s", type=float, default=200.0)
    p.add_argument("--out", type=Path, default=RESULTS / "pressure.json")
    a = p.parse_args(argv)
    runs = []
    for i in range(a.runs):
        with tempfile.TemporaryDirectory(prefix="enorm-bpres-") as tmp:
            r = one_run(a.interval_s, a.headroom_mb, a.rate_mb_s, tmp)
        print(f"run {i}: {json.dumps(r)}", flush=True)
        runs.append(r)
    lat = [e["threshold_to_stopped_s"] for r in runs for e in r["evictions"]
           if e["threshold_to_stopped_s"] is not None]
    out = {"interval_s": a.interval_s, "headroom_mb": a.headroom_mb,
           "rate_mb_s": a.rate_mb_s, "unit_mb": UNIT_MB, "tenants": TENANTS,
           "threshold_to_stopped_s": {"p50": statistics.median(lat) if lat else None,
                                      "max": max(lat) if lat else None, "n": len(lat)},
           "evicted_per_run": [len(r["evictions"]) for r in runs],
           "oom_kills": sum(r["oom_kills"] for r in runs),
           "swapped_mb": sum(r["swapped_mb"] for r in runs),
           "goal_s": 1.0, "runs": runs}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "runs"}, indent=1))


if __name__ == "__main__":
    main()
