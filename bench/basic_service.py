"""Experiment f: the board's basic service changing over a day, compressed in time.

A real node (`enorm serve`, basic service "measured": the whole machine's use minus its
containers) runs its auto-scaler every second while a process on the host (the stand-in
for the board's own service) grows and shrinks its memory along an hourly pattern of the
shape of mobile-phone use over a day (DAY below: a night trough, a morning rise, a midday
plateau and an evening peak; synthetic, documented in bench/README.md, compressed to
`--hour-s` seconds per hour). Eight tenants (one unit each, priorities 1..8, the cloud's
override flag set so that idle tenants are not terminated for need) are offered at the
start, and a cloud-side driver offers every missing tenant again at each hour.

Measured from samples every 0.25 s: the basic service, what the tenants hold, the
headroom left for the basic service (capacity - basic - allocated, memory), the
terminations the node made and the re-admissions; the time from each headroom deficit to
its end; and whether the kernel's OOM killer ran (/proc/vmstat oom_kill) or the host
swapped. The basic service must never be starved: a deficit lasts at most about one
round plus one termination.

    flock /run/enorm-bench.lock python -m bench.basic_service [--hour-s 8] [--peak-mb 2000]

Writes bench/results/basic_service.json and basic_service.png (or into --out). The node
is `bday` (containers enorm-bday-*, bridge enbday0, 10.80.0.0/24), closed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import requests

from games.local import LocalEdgeNode

RESULTS = Path(__file__).resolve().parent / "results"
NAME = "bday"
UNIT_MB = 200
# Memory is the experiment's dimension: a small CPU unit keeps the tenants' cores (0.8 in
# all) clear of the CPU that the machine's other work uses, which the node measures too.
UNIT_CORES = 0.1
TENANTS = 8
# Share of the basic service's peak extra memory, hour by hour (0-23): the shape of
# phone use over a day (low 01-06, rising from 07, a midday plateau, the peak 19-22).
DAY = [0.30, 0.18, 0.10, 0.06, 0.05, 0.06, 0.12, 0.30, 0.50, 0.60, 0.65, 0.70,
       0.78, 0.75, 0.68, 0.65, 0.68, 0.75, 0.85, 0.95, 1.00, 0.98, 0.80, 0.50]

# The basic service: holds the number of MB it reads from stdin, touching every page.
# Anonymous mappings, not the heap: what it lets go of goes back to the kernel at once.
_HOG = r"""
import mmap, sys
blocks = []
for line in sys.stdin:
    want = int(line)
    while len(blocks) < want:
        m = mmap.mmap(-1, 1 << 20)
        m.write(b"\x01" * (1 << 20))
        blocks.append(m)
    while len(blocks) > want:
        blocks.pop().close()
    print(len(blocks), flush=True)
"""


def _used_mb() -> float:
    vm = psutil.virtual_memory()
    return (vm.total - vm.available) / (1 << 20)


def _vmstat(key: str) -> int:
    for ln in Path("/proc/vmstat").read_text().splitlines():
        k, v = ln.split()
        if k == key:
            return int(v)
    return 0


class Tenants:
    """The cloud side: offers the tenants that are not on the node (again)."""

    def __init__(self, node: LocalEdgeNode, pub: str, user_address: str):
        self.url = node.url
        # The node's own bridge address: its latency probes get an instant answer, so
        # tenants stay at their minimum and only the basic service moves the allocation.
        self.user_address = user_address
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {node.token_of('day')}"
        self.pub = pub
        self.running: dict[int, str] = {}  # priority -> server id
        self.admitted = 0
        self.refused: dict[str, int] = {}

    def sync(self) -> None:
        alive = {s["id"] for s in self.http.get(self.url + "/v1/servers", timeout=30).json()}
        self.running = {p: sid for p, sid in self.running.items() if sid in alive}

    def offer_missing(self) -> None:
        self.sync()
        for prio in range(TENANTS, 0, -1):  # the most important first
            if prio in self.running:
                continue
            r = self.http.post(self.url + "/v1/servers", timeout=120, json={
                "app": f"tenant{prio}", "priority": prio, "ports": [8080],
                "latency_objective_ms": 50, "override": True, "ssh_public_key": self.pub,
                "users": [{"id": f"u{prio}", "address": self.user_address}]})
            if r.status_code == 201:
                self.running[prio] = r.json()["server_id"]
                self.admitted += 1
            else:
                why = r.json().get("error", str(r.status_code))
                self.refused[why] = self.refused.get(why, 0) + 1

    def close(self) -> None:
        self.sync()
        for sid in self.running.values():
            self.http.delete(f"{self.url}/v1/servers/{sid}", timeout=120)


def run(hour_s: float, peak_mb: int, headroom_mb: int, out_key: Path) -> dict:
    base_mb = int(_used_mb())
    capacity_mb = base_mb + headroom_mb
    node = LocalEdgeNode(name=NAME, bridge="enbday0", subnet="10.80.0.0/24",
                         port_range=[27000, 27499], listen_port=18700,
                         cores=float(os.cpu_count() or 2), memory_mb=capacity_mb,
                         reserve_cores=0.0, reserve_memory_mb=0,
                         unit={"cores": UNIT_CORES, "memory_mb": UNIT_MB},
                         basic_service="measured", autoscale_interval_s=1.0,
                         tokens={"day-token": "day"}, operator_token="day-operator")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(out_key)],
                   check=True)
    pub = out_key.with_suffix(".pub").read_text().strip()
    hog = subprocess.Popen([sys.executable, "-c", _HOG], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True)
    node.start()
    op = requests.Session()
    op.headers["Authorization"] = "Bearer day-operator"
    tenants = Tenants(node, pub, user_address="10.80.0.1")
    clock = {"hour": 0.0}  # the day's time, set by the driver
    samples: list[dict] = []
    stop = threading.Event()
    oom0, swap0 = _vmstat("oom_kill"), _vmstat("pswpout")
    t0 = time.monotonic()

    def sample() -> None:
        while not stop.is_set():
            o = op.get(node.url + "/v1/node", timeout=10).json()
            samples.append({
                "t": round(time.monotonic() - t0, 2),
                "hour": round(clock["hour"], 3),
                "basic_mb": o["basic_service"]["memory_mb"],
                "allocated_mb": o["allocated"]["memory_mb"],
                "servers": o["servers"],
                "basic_cores": o["basic_service"]["cores"],
                "allocated_cores": o["allocated"]["cores"],
                "free_cores": o["free"]["cores"],
                "headroom_mb": capacity_mb - o["basic_service"]["memory_mb"]
                - o["allocated"]["memory_mb"]})
            stop.wait(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    try:
        hog.stdin.write("0\n")
        hog.stdin.flush()
        hog.stdout.readline()
        tenants.offer_missing()
        t0 = time.monotonic()
        sampler.start()
        for hour in range(24):
            clock["hour"] = hour
            tenants.offer_missing()
            start, end = DAY[hour], DAY[(hour + 1) % 24]
            h0 = time.monotonic()
            while (f := (time.monotonic() - h0) / hour_s) < 1.0:  # a ramp within the hour
                clock["hour"] = hour + f
                hog.stdin.write(f"{int(peak_mb * (start + (end - start) * f))}\n")
                hog.stdin.flush()
                hog.stdout.readline()
                time.sleep(0.2)
        stop.set()
        sampler.join()
        events = op.get(node.url + "/v1/events", params={"limit": 10_000}, timeout=30).json()
    finally:
        stop.set()
        hog.terminate()
        hog.wait(10)
        try:
            tenants.close()
        finally:
            node.close()
    terminated = [e for e in events if e["type"] == "server.terminated"]
    return {
        "hour_s": hour_s, "peak_mb": peak_mb, "day_pattern": DAY,
        "capacity_mb": capacity_mb, "machine_used_at_start_mb": base_mb,
        "tenants": TENANTS, "unit_mb": UNIT_MB,
        "terminations": len(terminated),
        "termination_reasons": sorted({e["reason"] for e in terminated}),
        "admitted": tenants.admitted, "refused_by_reason": tenants.refused,
        "deficits": deficits(samples),
        "oom_kills": _vmstat("oom_kill") - oom0, "swapped_pages": _vmstat("pswpout") - swap0,
        "samples": samples,
    }


def deficits(samples: list[dict]) -> dict:
    """The stretches where the basic service had less than it used (headroom < 0)."""
    spans, start = [], None
    for s in samples:
        if s["headroom_mb"] < 0 and start is None:
            start = s["t"]
        elif s["headroom_mb"] >= 0 and start is not None:
            spans.append(round(s["t"] - start, 2))
            start = None
    if start is not None:
        spans.append(round(samples[-1]["t"] - start, 2))
    return {"count": len(spans), "total_s": round(sum(spans), 2),
            "longest_s": max(spans, default=0.0),
            "worst_mb": min((s["headroom_mb"] for s in samples), default=0),
            "spans_s": spans}


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = res["samples"]
    h = [x["hour"] for x in s]
    cap = res["capacity_mb"]
    fig, (a, b) = plt.subplots(2, 1, figsize=(10, 6), sharex=True,
                               gridspec_kw={"height_ratios": [3, 1]})
    basic = [x["basic_mb"] for x in s]
    a.stackplot(h, basic, [x["allocated_mb"] for x in s],
                labels=["basic service (measured)", "tenants' allocation"],
                colors=["#888", "#4a90d9"])
    a.axhline(cap, color="red", linestyle="--", label="capacity")
    a.set_ylabel("memory (MB)")
    a.set_ylim(min(basic, default=0) * 0.9, cap * 1.08)
    a.legend(loc="upper left", fontsize=8)
    d = res["deficits"]
    a.set_title(f"A compressed day ({res['hour_s']:g} s per hour): {res['terminations']} "
                f"terminations, {res['admitted']} admissions; headroom deficits "
                f"{d['count']} (longest {d['longest_s']} s)", fontsize=9)
    b.plot(h, [x["servers"] for x in s], drawstyle="steps-post")
    b.set_ylabel("tenants")
    b.set_xlabel("hour of the day")
    b.set_xticks(range(0, 25, 3))
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hour-s", type=float, default=8.0, help="seconds per hour of the day")
    ap.add_argument("--peak-mb", type=int, default=2000,
                    help="the basic service's extra memory at its daily peak")
    ap.add_argument("--headroom-mb", type=int, default=2400,
                    help="node capacity above the machine's use at the start")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="enorm-bday-") as tmp:
        res = run(a.hour_s, a.peak_mb, a.headroom_mb, Path(tmp) / "key")
    (a.out / "basic_service.json").write_text(json.dumps(res, indent=1) + "\n")
    plot(res, a.out / "basic_service.png")
    print(json.dumps({k: v for k, v in res.items() if k not in ("samples",)}, indent=1))


if __name__ == "__main__":
    main()
