"""Figures taken on the board itself (run there by the lab over SSH, from the project
source the playbook installed): the node's handshake, resize and termination, each
beside the bare floor measured in the same run on the same VM, and the daemon's memory
idle and with `--servers` servers.

Floors: a plain python3-lxc overlay clone of the same base image, `start` and its sshd
accepting TCP (the handshake's), kill + destroy (the termination's), one write to the
container's `memory.max` (a resize's). Memory: the daemon's RSS and PSS (systemd's
MainPID of the unit), beside a bare interpreter that imports what the daemon imports,
and where the board's memory is at that moment (`board_memory`).

The servers fill the board: the last one is set up after the others' resizes (each one
unit up and back), which need a unit free. This process stays light: the node counts it
as the board's own use (the basic service) that the servers must fit beside.

    /opt/enorm/venv/bin/python -m bench.boards.onboard --token T --servers 8
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import lxc
import psutil
import requests

from enorm.network import wait_tcp

FLOOR_PREFIX = "enorm-board-floor"


@dataclass(frozen=True)
class Board:
    """What the figures need of the node's config."""

    listen_port: int
    lxc_path: str
    base_container: str
    bridge: str
    subnet: ipaddress.IPv4Network
    gateway: str
    unit_cores: float
    unit_memory_mb: int
    operator_token: str


READ_CONFIG = """import json, sys
from enorm import config
from enorm.daemon import operator_token
c = config.load(sys.argv[1])
print(json.dumps({"listen_port": c.listen_port, "lxc_path": str(c.lxc_path),
                  "base_container": c.base_container, "bridge": c.bridge,
                  "subnet": str(c.subnet), "gateway": str(c.gateway),
                  "unit_cores": c.unit.cores, "unit_memory_mb": c.unit.memory_mb,
                  "operator_token": operator_token(c)}))
"""


def read_board(config: str) -> Board:
    """The node's config, read by an interpreter of its own: its loader (pydantic
    settings) and the daemon's imports would have stayed in this process, 64 MB RSS
    against 29 MB without them (measured on the host), all counted as the board's own
    use beside the servers."""
    out = subprocess.run([sys.executable, "-c", READ_CONFIG, config], capture_output=True,
                         text=True, check=True).stdout
    d = json.loads(out)
    return Board(**{**d, "subnet": ipaddress.IPv4Network(d["subnet"])})


def p50(xs: list[float]) -> float:
    return round(statistics.median(xs), 4)


def memory(pid: int) -> dict:
    full = psutil.Process(pid).memory_full_info()
    return {"rss_mb": round(full.rss / 2**20, 1), "pss_mb": round(full.pss / 2**20, 1)}


def daemon_pid(unit: str) -> int:
    out = subprocess.run(["systemctl", "show", "-p", "MainPID", "--value", unit],
                         capture_output=True, text=True, check=True).stdout.strip()
    if not out or out == "0":
        raise RuntimeError(f"{unit} has no main process")
    return int(out)


def bare_interpreter() -> dict:
    """What the interpreter and the daemon's libraries take before any of its work."""
    code = ("import enorm.daemon, enorm.api, enorm.control_loop, waitress, lxc, psutil;"
            "import sys; sys.stdout.write('ok'); sys.stdout.flush(); sys.stdin.read()")
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE)
    try:
        p.stdout.read(2)  # type: ignore[union-attr]
        return memory(p.pid)
    finally:
        p.kill()
        p.wait()


def cgroup_dir(container: str) -> Path:
    """The container's cgroup on a unified tree (LXC's `lxc.payload.<name>`)."""
    c = lxc.Container(container)
    found = [p for p in Path("/sys/fs/cgroup").rglob(f"lxc.payload.{container}")
             if p.is_dir()] if c.running else []
    if not found:
        raise RuntimeError(f"{container}: no cgroup lxc.payload.{container}")
    return found[0]


def floor_once(i: int, cfg: Board) -> tuple[float, float, float]:
    """Clone + start + sshd up; one memory.max write; kill + destroy: python3-lxc alone."""
    name = f"{FLOOR_PREFIX}{i:02d}"
    hosts = list(cfg.subnet.hosts())
    addr = str(hosts[-2 - i])
    t0 = time.perf_counter()
    c = lxc.Container(cfg.base_container, str(cfg.lxc_path)).clone(
        name, config_path=str(cfg.lxc_path), flags=lxc.LXC_CLONE_SNAPSHOT, bdevtype="overlay")
    c.clear_config_item("lxc.net.0.type")
    # The host side named as the node names its own (en...): the board's networkd takes
    # any other veth off the bridge (its `Type=ether` match), and the role keeps it off
    # `en*` only. LXC's default name (veth...) left the first floor unreachable on the
    # amd64 board.
    for k, v in (("lxc.net.0.type", "veth"), ("lxc.net.0.link", cfg.bridge),
                 ("lxc.net.0.veth.pair", f"enfloor{i:02d}"),
                 ("lxc.net.0.flags", "up"), ("lxc.net.0.name", "eth0"),
                 ("lxc.net.0.ipv4.address", f"{addr}/{cfg.subnet.prefixlen}"),
                 ("lxc.net.0.ipv4.gateway", str(cfg.gateway))):
        c.set_config_item(k, v)
    c.save_config()
    if not c.start():
        raise RuntimeError(f"{name}: python3-lxc's start failed")
    try:
        wait_tcp(addr, 22, timeout=60, interval=0.002)
    except TimeoutError:
        raise RuntimeError(f"{name} at {addr}: sshd not up after 60 s ({seen(c)})") from None
    up = time.perf_counter() - t0
    mem = cgroup_dir(name) / "memory.max"
    t1 = time.perf_counter()
    mem.write_text(str(cfg.unit_memory_mb * 2 << 20))
    resize = time.perf_counter() - t1
    t2 = time.perf_counter()
    os.kill(c.init_pid, signal.SIGKILL)
    while lxc.Container(name, str(cfg.lxc_path)).state != "STOPPED":
        time.sleep(0.002)
    lxc.Container(name, str(cfg.lxc_path)).destroy()
    return up, resize, time.perf_counter() - t2


def seen(c: lxc.Container) -> str:
    """What a floor container whose sshd never answered looked like, from the host."""
    if not c.running:
        return f"state {c.state}"
    pid = c.init_pid
    procs = [f"{q.name()}({q.uids().real})" for q in
             [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]]
    netns = ["nsenter", "-t", str(pid), "-n"]
    out = [f"processes {' '.join(procs)}"]
    for cmd in (netns + ["ip", "-br", "addr"], netns + ["ss", "-ltn"],
                ["ls", "-ldn", f"/proc/{pid}/root/run/sshd",
                 f"/proc/{pid}/root/etc/ssh/ssh_host_ed25519_key"],
                ["ip", "neigh", "show", "dev", c.get_config_item("lxc.net.0.link")]):
        r = subprocess.run(cmd, capture_output=True, text=True)
        out.append(f"{' '.join(cmd[-3:])}: {(r.stdout + r.stderr).strip()}")
    return "; ".join(out)


def cleanup_floor(lxc_path: str) -> None:
    for name in lxc.list_containers(config_path=lxc_path):
        if name.startswith(FLOOR_PREFIX):
            c = lxc.Container(name, lxc_path)
            c.stop()
            c.destroy()


def setup_body(public_key_file_text: str) -> dict:
    """The setup request of each server. The key is one line without its newline: the
    API takes one authorized_keys line and refuses a trailing newline (a .pub file has
    one)."""
    return {"app": "board-figures", "priority": 5, "ports": [8080],
            "users": [{"id": "1", "address": "127.0.0.2"}], "latency_objective_ms": 50,
            "ssh_public_key": public_key_file_text.strip()}


def resize_each(base: str, ids: list[str], unit: tuple[float, int],
                headers: dict) -> tuple[list[float], list[str], list[str]]:
    """Each server one unit up and back down, one at a time, so that the board needs
    the room for one more unit only. A refusal (409, no room) and a server the node has
    ended meanwhile (404: its pressure watcher may end one on a full board) are counted
    and said, not fatal; anything else is."""
    one = {"cores": unit[0], "memory_mb": unit[1]}
    two = {"cores": unit[0] * 2, "memory_mb": unit[1] * 2}
    times: list[float] = []
    refused: list[str] = []
    gone: list[str] = []
    for sid in ids:
        for limits in (two, one):
            t0 = time.perf_counter()
            r = requests.put(f"{base}/v1/servers/{sid}/limits", json=limits,
                             headers=headers, timeout=60)
            took = time.perf_counter() - t0
            if r.status_code == 409 and limits is two:
                refused.append(f"{sid}: {r.text[:200]}")
                break
            if r.status_code == 404:
                gone.append(sid)
                break
            if not r.ok:
                raise RuntimeError(f"resize of {sid}: {r.status_code} {r.text[:500]}")
            times.append(took)
    if not times:
        raise RuntimeError(f"no resize done: refused {refused}, gone {gone}")
    return times, refused, gone


def resize_split(base: str, sid: str, headers: dict, lxc_path: str, n: int = 10) -> dict:
    """Where a resize's time goes, in parts measured alone on one running server (p50 of
    `n`, ms): an API request that does nothing (GET of the server: HTTP, the token, the
    store's read, JSON), the container's python3-lxc handle, liblxc's read and write of
    the three limit items (cpu.max, memory.max, cpuset.cpus: the values it has, written
    again), and the same three written to the cgroup files directly."""
    def p50_ms(f, k: int = n) -> float:
        took = []
        for _ in range(k):
            t0 = time.perf_counter()
            f()
            took.append(time.perf_counter() - t0)
        return round(statistics.median(took) * 1000, 2)

    url = f"{base}/v1/servers/{sid}"
    name = requests.get(url, headers=headers, timeout=30).json()["container"]
    items = ("memory.max", "cpu.max", "cpuset.cpus")
    c = lxc.Container(name, lxc_path)
    have = {k: c.get_cgroup_item(k).strip() for k in items}
    files = {k: cgroup_dir(name) / k for k in items}
    return {
        "api_get_ms": p50_ms(lambda: requests.get(url, headers=headers, timeout=30)),
        "lxc_handle_ms": p50_ms(lambda: lxc.Container(name, lxc_path).running),
        "lxc_get_3_ms": p50_ms(lambda: [c.get_cgroup_item(k) for k in items]),
        "lxc_set_3_ms": p50_ms(lambda: [c.set_cgroup_item(k, have[k]) for k in items]),
        "file_write_3_ms": p50_ms(lambda: [files[k].write_text(have[k]) for k in items]),
    }


def ended_by_node(base: str, ids: list[str], headers: dict) -> dict[str, list[str]]:
    """Why the node ended each of `ids` on its own: the reasons of its events."""
    out = {}
    for sid in ids:
        r = requests.get(f"{base}/v1/events", params={"server": sid}, headers=headers,
                         timeout=30)
        out[sid] = [f"{e['type']}: {e['reason']}" for e in r.json()] if r.ok else [r.text]
    return out


def board_memory() -> dict:
    """Where the board's memory is (MB): the kernel's figures, the node's containers
    (their cgroups' memory.current), and the board's own processes by PSS, largest
    first: what the node counts as its basic service."""
    info = {k: int(v.split()[0]) >> 10 for k, v in
            (ln.split(":", 1) for ln in Path("/proc/meminfo").read_text().splitlines())}
    kernel = {k: info[k] for k in ("MemTotal", "MemAvailable", "MemFree", "AnonPages",
                                   "Cached", "Shmem", "Slab", "SUnreclaim", "PageTables",
                                   "KernelStack") if k in info}
    containers = {p.name.removeprefix("lxc.payload."):
                  int((p / "memory.current").read_text()) >> 20
                  for p in Path("/sys/fs/cgroup").rglob("lxc.payload.*")
                  if (p / "memory.current").is_file()}
    own: Counter[str] = Counter()
    for p in psutil.process_iter(["name"]):
        try:
            if "lxc.payload." in Path(f"/proc/{p.pid}/cgroup").read_text():
                continue  # a container's: counted in its cgroup
            own[p.info["name"]] += p.memory_full_info().pss
        except (psutil.Error, OSError):
            continue
    return {"kernel_mb": kernel, "containers_mb": containers,
            "own_processes_pss_mb": {k: round(v / 2**20, 1) for k, v in own.most_common(12)},
            "own_processes_pss_total_mb": round(sum(own.values()) / 2**20, 1)}


def measure(cfg: Board, token: str, servers: int, unit_name: str) -> dict:
    s = requests.Session()
    s.headers["Authorization"] = f"Bearer {token}"
    op = {"Authorization": f"Bearer {cfg.operator_token}"}
    base = f"http://127.0.0.1:{cfg.listen_port}"
    pid = daemon_pid(unit_name)
    time.sleep(2)
    idle = memory(pid)
    body = setup_body(Path("/etc/ssh/ssh_host_ed25519_key.pub").read_text())
    hs: list[float] = []
    ids: list[str] = []
    term: list[float] = []

    def setup() -> None:
        t0 = time.perf_counter()
        r = s.post(base + "/v1/servers", json=body, timeout=300)
        hs.append(time.perf_counter() - t0)
        if not r.ok:
            node = requests.get(base + "/v1/node", headers=op, timeout=30).text
            raise RuntimeError(f"setup request {len(ids) + 1}: {r.status_code} "
                               f"{r.text[:500]}; the node: {node[:1500]}")
        ids.append(r.json()["server_id"])

    try:
        for _ in range(servers - 1):
            setup()
        resize, refused, gone = resize_each(base, ids, (cfg.unit_cores, cfg.unit_memory_mb),
                                            op)
        split = resize_split(base, next(i for i in ids if i not in gone), op, cfg.lxc_path)
        setup()
        time.sleep(2)
        loaded = memory(pid)
        node = requests.get(base + "/v1/node", headers=op, timeout=30).json()
        running = [x["id"] for x in requests.get(base + "/v1/servers", headers=op,
                                                 timeout=30).json()
                   if x["state"] == "running"]
        loaded_node = {"servers": node["servers"], "running": len(running),
                       "free": node["free"], "basic_service": node["basic_service"],
                       "allocated": node["allocated"], "capacity": node["capacity"]}
        where = board_memory()
        gone += [sid for sid in ids if sid not in running and sid not in gone]
    finally:
        for sid in ids:
            t0 = time.perf_counter()
            r = s.delete(f"{base}/v1/servers/{sid}", timeout=300)
            if r.ok:  # not one the node had ended already
                term.append(time.perf_counter() - t0)
    ended = ended_by_node(base, gone, op)
    floor_up, floor_resize, floor_down = [], [], []
    floor_error = None
    try:
        for i in range(servers):
            up, rs, down = floor_once(i, cfg)
            floor_up.append(up)
            floor_resize.append(rs)
            floor_down.append(down)
    except RuntimeError as exc:  # the node's figures stand without it: said, not lost
        floor_error = str(exc)
    finally:
        cleanup_floor(str(cfg.lxc_path))
    bare = bare_interpreter()

    def median(xs: list[float]) -> float | None:
        return p50(xs) if xs else None

    def over(a: list[float], b: list[float], digits: int) -> float | None:
        return round(p50(a) / p50(b), digits) if a and b else None

    return {
        "n": servers, "floor_error": floor_error,
        "handshake_s": p50(hs), "handshake_floor_s": median(floor_up),
        "handshake_over_floor": over(hs, floor_up, 2),
        "resize_s": p50(resize), "resize_floor_s": median(floor_resize),
        "resize_over_floor": over(resize, floor_resize, 1),
        "resize_split_ms": split, "resize_refused_no_room": refused, "ended_by_node": ended,
        "node_loaded": loaded_node, "board_memory_loaded": where,
        "terminate_s": p50(term), "terminate_floor_s": median(floor_down),
        "terminate_over_floor": over(term, floor_down, 2),
        "daemon_idle": idle, "daemon_loaded": loaded, "bare_interpreter": bare,
        "raw": {"handshake_s": hs, "handshake_floor_s": floor_up, "resize_s": resize,
                "resize_floor_s": floor_resize, "terminate_s": term,
                "terminate_floor_s": floor_down},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="/etc/enorm/node.toml")
    ap.add_argument("--unit", default="enorm")
    ap.add_argument("--token", required=True)
    ap.add_argument("--servers", type=int, default=8)
    a = ap.parse_args()
    print(json.dumps(measure(read_board(a.config), a.token, a.servers, a.unit)))


if __name__ == "__main__":
    main()
