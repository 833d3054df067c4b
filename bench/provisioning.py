"""Provisioning benchmark: handshake and termination on a real edge node, next to the floor.

The floor is what LXC itself needs for the same work without enorm: an overlay snapshot
clone of the base container, start, and its sshd accepting TCP (then stop + destroy),
one container at a time; and again with the earlier ones held (`floor_held`), as enorm's
n servers are held until their terminations: both grow with the containers already there.
Both are measured in the same run, on the same bridge, and enorm three times: with
privileged containers, with unprivileged ones (the default; an idmapped base per
container), and unprivileged without the sized writable layer (`disk_mb = 0`), which
prices the disk quota; then bursts of 2, 4 and 8 handshakes at once, which empty the
pool of layers made ahead (`layer_pool`, 2) and show what a handshake pays then.
Also records the daemon's resident memory idle and with 32 servers.

The one-at-a-time floor is the strict reference, and a fragile one: destroyed as soon as
its sshd answers, its container never runs the rest of its boot (Redis, the app's resume)
beside the next start, which a held container does; and a pause between two starts makes
the next one slower (the CPUs idle). `--pacing` measures both on the floor alone
(`pacing()`), so that a change of the bench's rhythm is not read as enorm's.

    python -m bench.provisioning [--n 60] [--pacing]

Writes bench/results/provisioning.json and provisioning.png (`--pacing`:
provisioning-pacing.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lxc
import psutil
import requests

from enorm.network import wait_tcp
from games.local import LocalEdgeNode

RESULTS = Path(__file__).resolve().parent / "results"
NODE = dict(
    name="bprov", bridge="enbprov0", subnet="10.87.0.0/24", port_range=[25000, 25999],
    listen_port=18600, cores=64.0, memory_mb=65536, reserve_cores=0.0, reserve_memory_mb=0,
    unit={"cores": 0.25, "memory_mb": 64}, basic_service="reserve",
    autoscale_interval_s=86400, tokens={"bench-token": "bench"},
)
FLOOR_PREFIX = "enorm-bprov-floor"
NODE_POOL = 2  # the default `layer_pool`
BURSTS = (2, 4, 8)
PAPER = {"handshake_s": 9.0, "terminate_s": 5.0}


def quarters(xs: list[float]) -> list[float]:
    """Median of each quarter of a series in its order (ms): how it grows as a run goes."""
    if len(xs) < 4:
        return [round(x * 1000, 1) for x in xs]
    q = len(xs) // 4
    return [round(statistics.median(xs[i:i + q]) * 1000, 1) for i in range(0, q * 4, q)]


def summary(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {"p50": round(statistics.median(xs), 4),
            "p95": round(xs[min(len(xs) - 1, int(0.95 * len(xs)))], 4), "n": len(xs)}


def _floor_up(name: str, addr: str, bridge: str) -> tuple[lxc.Container, float]:
    """Clone + start + sshd up with python3-lxc alone; the seconds it took."""
    t0 = time.perf_counter()
    c = lxc.Container("enorm-base-debian").clone(
        name, flags=lxc.LXC_CLONE_SNAPSHOT, bdevtype="overlay")
    c.clear_config_item("lxc.net.0.type")
    for k, v in (("lxc.net.0.type", "veth"), ("lxc.net.0.link", bridge),
                 ("lxc.net.0.flags", "up"), ("lxc.net.0.name", "eth0"),
                 ("lxc.net.0.ipv4.address", f"{addr}/24"),
                 ("lxc.net.0.ipv4.gateway", "10.87.0.1")):
        c.set_config_item(k, v)
    c.save_config()
    c.start()
    wait_tcp(addr, 22, interval=0.002)
    return c, time.perf_counter() - t0


def _floor_down(name: str, c: lxc.Container) -> float:
    """Kill + destroy; the seconds it took."""
    t1 = time.perf_counter()
    os.kill(c.init_pid, signal.SIGKILL)
    while lxc.Container(name).state != "STOPPED":
        time.sleep(0.002)
    lxc.Container(name).destroy()
    return time.perf_counter() - t1


def floor_once(i: int, bridge: str) -> tuple[float, float]:
    """Clone + start + sshd up, then stop + destroy: one container at a time."""
    name = f"{FLOOR_PREFIX}{i:03d}"
    c, up = _floor_up(name, f"10.87.0.{200 + i % 50}", bridge)
    return up, _floor_down(name, c)


def pacing(n: int, bridge: str, pause_s: float = 0.5) -> dict[str, dict]:
    """The one-at-a-time floor with a pause before each destroy (its container finishes
    booting), after it (the machine idles before the next start), both, and none."""
    out = {}
    for label, before, after in (("back_to_back", 0.0, 0.0), ("boot_finished", pause_s, 0.0),
                                 ("idle_before_start", 0.0, pause_s),
                                 ("both", pause_s, pause_s), ("back_to_back_again", 0.0, 0.0)):
        ups = []
        for i in range(n):
            name = f"{FLOOR_PREFIX}p{i:03d}"
            c, up = _floor_up(name, f"10.87.0.{200 + i % 50}", bridge)
            time.sleep(before)
            _floor_down(name, c)
            ups.append(up)
            time.sleep(after)
        out[label] = {**summary(ups), "by_quarter_ms": quarters(ups)}
    return out


def floor_held(n: int, bridge: str) -> list[float]:
    """The same clone + start + sshd up with the earlier ones still running, as enorm's
    handshakes run (its n servers are held until the terminations): what the machine
    pays for the containers already there, apart from what enorm adds. Then all are
    destroyed. At most 90 (their addresses)."""
    ups, held = [], []
    try:
        for i in range(min(n, 90)):
            name = f"{FLOOR_PREFIX}h{i:03d}"
            c, up = _floor_up(name, f"10.87.0.{100 + i}", bridge)
            held.append((name, c))
            ups.append(up)
    finally:
        for name, c in held:
            _floor_down(name, c)
    return ups


def cleanup_floor() -> None:
    for name in lxc.list_containers():
        if name.startswith(FLOOR_PREFIX):
            c = lxc.Container(name)
            c.stop()
            c.destroy()


def pool_figures(url: str, op: dict) -> dict[str, float]:
    """The node's writable-layer pool, from its /metrics: ready, hits, misses."""
    text = requests.get(url + "/metrics", headers=op, timeout=10).text
    series = dict(ln.rsplit(" ", 1) for ln in text.splitlines()
                  if ln.startswith("enorm_layer_pool_"))
    take = "enorm_layer_pool_takes_total{{result=\"{}\"}}"
    return {"ready": float(series.get("enorm_layer_pool_ready", -1)),  # -1: no pool
            "hit": float(series.get(take.format("hit"), 0)),
            "miss": float(series.get(take.format("miss"), 0))}


def burst(s: requests.Session, url: str, op: dict, body: dict, size: int,
          pooled: bool) -> dict:
    """`size` handshakes at once (after the pool has refilled), then their terminations:
    each one's time, the wall time, and how many found a layer made ahead."""
    deadline = time.monotonic() + 30
    while 0 <= (before := pool_figures(url, op))["ready"] < NODE_POOL and pooled:
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)

    def one(_: int) -> tuple[float, str]:
        t0 = time.perf_counter()
        r = s.post(url + "/v1/servers", json=body, timeout=120)
        r.raise_for_status()
        return time.perf_counter() - t0, r.json()["server_id"]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(size) as ex:
        done = list(ex.map(one, range(size)))
    wall = time.perf_counter() - t0
    after = pool_figures(url, op)
    for _, sid in done:
        s.delete(f"{url}/v1/servers/{sid}", timeout=60).raise_for_status()
    return {"size": size, "wall_s": round(wall, 4), "handshake_s": summary([t for t, _ in done]),
            "pool_ready_before": before["ready"], "hits": after["hit"] - before["hit"],
            "misses": after["miss"] - before["miss"]}


def enorm_runs(n: int, pub: str, tmp: str, label: str, bursts: tuple[int, ...] = (),
               **over) -> dict:
    """n handshakes then n terminations on a fresh node; its RSS idle and at 32; then
    bursts of handshakes at once."""
    node = LocalEdgeNode(**NODE, state_dir=f"{tmp}/state-{label}", **over)
    node.start()
    try:
        s = requests.Session()
        s.headers["Authorization"] = "Bearer bench-token"
        proc = psutil.Process(node.proc.pid)  # type: ignore[union-attr]
        time.sleep(1)
        rss_idle = proc.memory_info().rss / 2**20
        body = {"app": "bench", "priority": 5, "ports": [8080],
                "users": [{"id": "1", "address": "127.0.0.2"}],
                "latency_objective_ms": 50, "ssh_public_key": pub}
        hs, ids, rss_32 = [], [], None
        for i in range(n):
            t0 = time.perf_counter()
            r = s.post(node.url + "/v1/servers", json=body, timeout=60)
            hs.append(time.perf_counter() - t0)
            r.raise_for_status()
            ids.append(r.json()["server_id"])
            if i == 31:
                time.sleep(0.5)
                rss_32 = proc.memory_info().rss / 2**20
        term = []
        for sid in ids:
            t0 = time.perf_counter()
            r = s.delete(f"{node.url}/v1/servers/{sid}", timeout=60)
            term.append(time.perf_counter() - t0)
            r.raise_for_status()
        op = {"Authorization": f"Bearer {node.operator_token()}"}
        bursted = [burst(s, node.url, op, body, k, over.get("disk_mb") != 0) for k in bursts]
    finally:
        node.close()
    return {"hs": hs, "term": term, "rss_idle": rss_idle, "rss_32": rss_32, "bursts": bursted}


def run(n: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="enorm-bprov-") as tmp:
        key = Path(tmp) / "key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                       check=True)
        pub = key.with_suffix(".pub").read_text().strip()
        # The bridge the floor's containers join is the node's: bring one up first.
        floor, floor_down, held = [], [], []
        node = LocalEdgeNode(**NODE, state_dir=f"{tmp}/state-floor")
        node.start()
        try:
            for i in range(n):
                up, down = floor_once(i, NODE["bridge"])
                floor.append(up)
                floor_down.append(down)
            held = floor_held(n, NODE["bridge"])
        finally:
            cleanup_floor()
            node.close()
        # The same run, both kinds of container: privileged (root inside is root on the
        # board) and unprivileged (the default: an id range per container).
        priv = enorm_runs(n, pub, tmp, "priv", unprivileged=False)
        nodisk = enorm_runs(n, pub, tmp, "nodisk", BURSTS, unprivileged=True, disk_mb=0)
        unpriv = enorm_runs(n, pub, tmp, "unpriv", BURSTS, unprivileged=True)
    hs, term = unpriv["hs"], unpriv["term"]
    return {
        "handshake_s": summary(hs),
        "terminate_s": summary(term),
        "privileged": {"handshake_s": summary(priv["hs"]),
                       "terminate_s": summary(priv["term"])},
        "without_disk_quota": {"handshake_s": summary(nodisk["hs"]),
                               "terminate_s": summary(nodisk["term"])},
        "disk_quota_over_none": {
            "handshake_p50": round(statistics.median(hs) / statistics.median(nodisk["hs"]), 2),
            "terminate_p50": round(statistics.median(term)
                                   / statistics.median(nodisk["term"]), 2)},
        "unprivileged_over_privileged": {
            "handshake_p50": round(statistics.median(hs) / statistics.median(priv["hs"]), 2),
            "terminate_p50": round(statistics.median(term) / statistics.median(priv["term"]),
                                   2)},
        # Handshakes at once: with the pool of layers made ahead (hits, misses) and
        # without a disk limit, each burst after the pool has refilled.
        "bursts": {"unprivileged": unpriv["bursts"], "without_disk_quota": nodisk["bursts"],
                   "layer_pool": NODE_POOL},
        "floor_s": summary(floor),
        "floor_destroy_s": summary(floor_down),
        "handshake_over_floor": round(statistics.median(hs) / statistics.median(floor), 2),
        # The floor with its containers held, as enorm's are (see `floor_held`), and
        # the ratio in quarters of the run: both grow with the containers already there.
        "floor_held_s": summary(held),
        "handshake_over_floor_held": round(statistics.median(hs) / statistics.median(held),
                                           2),
        "by_quarter_ms": {k: quarters(v) for k, v in (
            ("handshake", hs), ("floor", floor), ("floor_held", held),
            ("handshake_no_disk_quota", nodisk["hs"]), ("handshake_privileged", priv["hs"]))},
        "paper_over_handshake": round(PAPER["handshake_s"] / statistics.median(hs), 1),
        "daemon_rss_mb": {"idle": round(unpriv["rss_idle"], 1),
                          "servers_32": round(unpriv["rss_32"] or 0, 1)},
        "targets": {"handshake_p50_s": 0.25, "terminate_p50_s": 0.2, "daemon_rss_mb": 80},
        "paper": PAPER,
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release()},
        "raw": {"handshake_s": hs, "terminate_s": term, "floor_s": floor, "floor_held_s": held,
                "privileged_handshake_s": priv["hs"], "privileged_terminate_s": priv["term"],
                "no_disk_quota_handshake_s": nodisk["hs"]},
    }


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    raw = res["raw"]
    a.boxplot([raw["floor_s"], raw.get("floor_held_s") or [0.0], raw["privileged_handshake_s"],
               raw["no_disk_quota_handshake_s"], raw["handshake_s"], raw["terminate_s"]])
    a.set_xticks([1, 2, 3, 4, 5, 6], ["floor:\nclone+start\n+sshd", "floor,\nthe others\nheld",
                                      "handshake\nprivileged",
                                   "handshake\nunpriv.,\nno disk quota",
                                   "handshake\nunpriv.\n(default)", "terminate\nunpriv."])
    a.set_ylabel("seconds")
    a.set_title(f"provisioning, n={res['handshake_s']['n']} (paper: ~9 s handshake)")
    rss = res["daemon_rss_mb"]
    b.bar(["idle", "32 servers"], [rss["idle"], rss["servers_32"]])
    b.axhline(80, color="red", linestyle="--", label="target 80 MB")
    b.set_ylabel("daemon RSS (MB)")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=60, help="handshakes/terminations (>= 50)")
    ap.add_argument("--pacing", action="store_true",
                    help="only the floor under five rhythms, 24 starts each")
    args = ap.parse_args()
    if args.pacing:
        with tempfile.TemporaryDirectory(prefix="enorm-bprov-") as tmp:
            node = LocalEdgeNode(**NODE, state_dir=f"{tmp}/state-floor")
            node.start()  # its bridge
            try:
                res = pacing(24, NODE["bridge"])
            finally:
                cleanup_floor()
                node.close()
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "provisioning-pacing.json").write_text(json.dumps(res, indent=1) + "\n")
        print(json.dumps(res, indent=1))
        return
    res = run(args.n)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "provisioning.json").write_text(json.dumps(res, indent=2) + "\n")
    plot(res, RESULTS / "provisioning.png")
    print(json.dumps({k: v for k, v in res.items() if k != "raw"}, indent=2))


if __name__ == "__main__":
    main()
