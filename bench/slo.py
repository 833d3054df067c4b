"""A load step on one edge server: the paper's 5-minute round against the fast latency loop.

A real node in this process (`Daemon.open`, its control loop running) with a quarter-core
unit (0.25 core, 128 MB) and room for four; one server (objective `OBJECTIVE_MS`), in whose
container a small threaded HTTP app runs (each request costs a fixed amount of CPU and is
written to the request log, as the game's server does). A paced load generator on the
host sends `LOW_RPS` for `STEP_AT_S` seconds, then `HIGH_RPS`: more than one unit serves
in time, less than two. The same step is run with `policy = "paper"` (a round every
300 s, the paper's interval, scaling by one unit on the round's latency) and
`policy = "fast"` (the latency loop with the defaults: every 5 s, 30 % hysteresis band,
10 s cool-down, a step down 60 s after the last change); the round stays at 300 s in both.

Reported per mode: the users' latency each second (mean of the requests that ended in it,
from the generator), the node's own measurement each round or tick, the server's units
(from the node's store), the time from the step to the first added unit
(`first_unit_after_s`) and to the first 10 s in a row under the objective (`recover_s`),
and the seconds in which the mean was over the objective (`violation_s`).

    flock /run/enorm-bench.lock python -m bench.slo [--seconds 340]

Writes bench/results/slo.json and slo.png. The node is `bslo` (containers enorm-bslo-*,
bridge enbslo0, chains ENORM-BSLO*); all of it is removed at the end, also on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from enorm import config
from enorm.daemon import Daemon
from enorm.protocol import SetupRequest, User

RESULTS = Path(__file__).resolve().parent / "results"
NODE, BRIDGE, SUBNET, PORTS = "bslo", "enbslo0", "10.86.20.0/24", (52400, 52499)
APP_PORT = 8080
OBJECTIVE_MS = 50.0
LOW_RPS, HIGH_RPS, WORKERS = 10.0, 60.0, 12
STEP_AT_S = 20.0
WORK_ITERATIONS = 8000  # ~6 ms of one core here per request (printed by the run)
SSH_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEnormBenchmarkKeyNobodyHoldsItsPrivatePart0 b"

# The tenant's app: a threaded HTTP server, a fixed CPU cost per request, one line per
# request in the request log the Monitor reads (`<ts> <path> <ms>`).
APP = f"""
import hashlib, http.server, os, threading, time
os.makedirs('/var/log/enorm-app', exist_ok=True)
log = open('/var/log/enorm-app/requests.log', 'a', buffering=1)
lock = threading.Lock()
class H(http.server.BaseHTTPRequestHandler):
    def setup(self):
        self.t0 = time.perf_counter()  # accepted: the request's time in the app starts
        super().setup()
    def do_GET(self):
        h = b'x' * 64
        for _ in range({WORK_ITERATIONS}):
            h = hashlib.sha256(h).digest()
        body = h.hex().encode()
        self.send_response(200)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        with lock:
            log.write('%.3f %s %.3f\\n' % (time.time(), self.path,
                                           (time.perf_counter() - self.t0) * 1000))
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer.request_queue_size = 128
s = http.server.ThreadingHTTPServer(('0.0.0.0', {APP_PORT}), H)
s.daemon_threads = True
s.serve_forever()
"""


def node_config(state: Path, policy: str) -> Path:
    path = state / f"node-{policy}.toml"
    path.write_text(
        f'name = "{NODE}"\nlisten_port = 18471\nstate_dir = "{state / policy}"\n'
        f'bridge = "{BRIDGE}"\nsubnet = "{SUBNET}"\nport_range = [{PORTS[0]}, {PORTS[1]}]\n'
        "cores = 1.0\nmemory_mb = 2048\nreserve_cores = 0.0\nreserve_memory_mb = 0\n"
        'basic_service = "reserve"\nprobe = "none"\n'
        "unit = { cores = 0.25, memory_mb = 128 }\n"
        f'autoscale_interval_s = 300.0\npolicy = "{policy}"\n'
        'operator_token = "bench-operator"\ntokens = { "bench-token" = "bench" }\n')
    return path


def node_down(cfg_path: Path) -> None:
    proc = subprocess.run([str(Path(sys.executable).parent / "enorm"), "down", "--force",
                           "-c", str(cfg_path)], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        print(f"enorm down failed:\n{proc.stdout}{proc.stderr}", file=sys.stderr)


class Load:
    """Paced workers: each sends one request every WORKERS / rate seconds (at once when
    the previous answer came later); records (end time, latency ms, ok)."""

    def __init__(self, url: str) -> None:
        self.url, self.rate = url, LOW_RPS
        self.samples: list[tuple[float, float, bool]] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._work, args=(i,), daemon=True)
                        for i in range(WORKERS)]

    def _work(self, i: int) -> None:
        nxt = time.monotonic() + i / self.rate  # spread out, not all at once
        self.stop.wait(i / self.rate)
        while not self.stop.is_set():
            t0 = time.monotonic()
            try:
                with urllib.request.urlopen(self.url, timeout=10) as r:
                    ok = r.status == 200 and bool(r.read())
            except OSError:
                ok = False
            t1 = time.monotonic()
            self.samples.append((t1, (t1 - t0) * 1000.0, ok))
            nxt = max(nxt + WORKERS / self.rate, t1)
            self.stop.wait(max(0.0, nxt - t1))

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=15)


def run_mode(policy: str, seconds: float, tmp: Path) -> dict:
    cfg_path = node_config(tmp, policy)
    cfg = config.load(cfg_path)
    d = Daemon.open(cfg, background=True)
    opened = time.monotonic()  # the first round comes one interval after this
    app = None
    try:
        mgr = d.manager
        resp = mgr.handshake(SetupRequest(
            app="slo-bench", priority=5, users=[User(id="u0", address="10.86.21.1")],
            latency_objective_ms=OBJECTIVE_MS, ssh_public_key=SSH_KEY), owner="bench")
        sid = resp.server_id
        app = subprocess.Popen(["lxc-attach", "-n", resp.container, "-P", str(cfg.lxc_path),
                                "--", "python3", "-c", APP],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://{resp.address}:{APP_PORT}/work"
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url, timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        load = Load(url)
        t0 = time.monotonic()
        units: list[tuple[float, float]] = []
        seen: list[tuple[float, float | None]] = []  # the node's latency, each round/tick
        last = None
        load.start()
        try:
            while (now := time.monotonic() - t0) < seconds:
                if now >= STEP_AT_S and load.rate != HIGH_RPS:
                    load.rate = HIGH_RPS
                rec = mgr.node.store.get(sid)
                units.append((round(now, 2), rec.limits.cores / cfg.unit.cores))
                assert d.loop is not None
                r = d.loop.last_tick if policy == "fast" else d.loop.last
                if r is not None and r is not last and r.snapshot and r.snapshot.servers:
                    last = r
                    seen.append((round(now, 2), r.snapshot.servers[0].latency_ms))
                time.sleep(0.5)
        finally:
            load.close()
        out = summarise(policy, load.samples, t0, units, seconds,
                        first_round_at_s=opened + cfg.autoscale_interval_s - t0)
        out["node_latency_ms"] = seen
        return out
    finally:
        if app is not None:
            app.kill()
            app.wait(timeout=10)
        d.close()
        node_down(cfg_path)


def summarise(policy: str, samples: list, t0: float, units: list, seconds: float,
              first_round_at_s: float) -> dict:
    per_s: dict[int, list[float]] = {}
    errors = 0
    for t, ms, ok in samples:
        if not ok:
            errors += 1
        per_s.setdefault(int(t - t0), []).append(ms)
    series = [(s, sum(v) / len(v), len(v)) for s, v in sorted(per_s.items())]
    after = [(s, mean) for s, mean, _ in series if s >= STEP_AT_S]
    over = [s for s, mean in after if mean > OBJECTIVE_MS]
    first_up = next((t for t, u in units if t >= STEP_AT_S and u > units[0][1]), None)
    return {
        "policy": policy,
        "latency_ms_per_s": [[s, round(m, 2), n] for s, m, n in series],
        "units": units,
        # Seconds (of the run after the step) whose mean latency was over the objective.
        "violation_s": len(over),
        # From the step: the first added unit, and the start of the first 10 s in a row
        # under the objective.
        "first_unit_after_s": None if first_up is None else round(first_up - STEP_AT_S, 1),
        "recover_s": settled_after(after),
        "max_units": max(u for _, u in units),
        "requests": len(samples), "errors": errors,
        "low_mean_ms": _mean([m for s, m, _ in series if 5 <= s < STEP_AT_S]),
        "end_mean_ms": _mean([m for s, m, _ in series if s >= seconds - 20]),
        "paper_round_at_s": round(first_round_at_s, 1),
    }


def settled_after(after: list[tuple[int, float]], run: int = 10) -> float | None:
    """Seconds from the step to the start of the first `run` seconds in a row under the
    objective, once it was over it; None if that never came."""
    streak = 0
    was_over = False
    for s, mean in after:
        if mean > OBJECTIVE_MS:
            was_over, streak = True, 0
            continue
        streak += 1
        if was_over and streak == run:
            return float(s - run + 1 - STEP_AT_S)
    return None


def _mean(v: list[float]) -> float | None:
    return round(sum(v) / len(v), 2) if v else None


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for mode, colour in (("paper", "tab:red"), ("fast", "tab:blue")):
        r = result["modes"][mode]
        axes[0].plot([x[0] for x in r["latency_ms_per_s"]], [x[1] for x in r["latency_ms_per_s"]],
                     color=colour, label=f"{mode}: {r['violation_s']} s over the objective")
        axes[1].step([x[0] for x in r["units"]], [x[1] for x in r["units"]], where="post",
                     color=colour, label=mode)
    axes[0].axhline(OBJECTIVE_MS, color="grey", ls="--", label="objective")
    axes[0].axvline(STEP_AT_S, color="grey", ls=":")
    axes[0].set_ylabel("users' mean latency (ms)")
    axes[0].set_yscale("log")
    axes[0].legend()
    axes[1].set_ylabel("units (0.25 core, 128 MB)")
    axes[1].set_xlabel(f"s (load {LOW_RPS:g} -> {HIGH_RPS:g} req/s at {STEP_AT_S:g} s)")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def work_ms() -> float:
    """What one request's work costs on one core of this machine (the app's loop)."""
    import hashlib

    t0 = time.process_time()
    for _ in range(20):
        h = b"x" * 64
        for _ in range(WORK_ITERATIONS):
            h = hashlib.sha256(h).digest()
    return (time.process_time() - t0) / 20 * 1000.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=340.0,
                    help="length of each run (the paper mode's first round comes at 300 s)")
    ap.add_argument("--out", type=Path, default=RESULTS / "slo.json")
    args = ap.parse_args(argv)

    def on_term(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    result: dict = {"objective_ms": OBJECTIVE_MS, "low_rps": LOW_RPS, "high_rps": HIGH_RPS,
                    "step_at_s": STEP_AT_S, "workers": WORKERS,
                    "work_ms_one_core": round(work_ms(), 2), "modes": {}}
    with tempfile.TemporaryDirectory(prefix="enorm-bench-slo-") as tmp:
        for policy in ("fast", "paper"):
            r = run_mode(policy, args.seconds, Path(tmp))
            result["modes"][policy] = r
            print(f"{policy}: violation {r['violation_s']} s, first unit after "
                  f"{r['first_unit_after_s']} s, 10 s under it from {r['recover_s']} s, "
                  f"max units {r['max_units']}, low {r['low_mean_ms']} ms, "
                  f"end {r['end_mean_ms']} ms, {r['requests']} requests, {r['errors']} errors")
    result["machine"] = {"python": platform.python_version(), "kernel": platform.release(),
                         "cpus": len(os.sched_getaffinity(0))}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
