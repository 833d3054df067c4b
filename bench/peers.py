"""enorm beside what a board operator would install instead: Docker and LXD, same jobs,
same machine, same base rootfs, same run, interleaved so that noise hits all alike.

Jobs (each n >= 30 unless --quick):
  1. handshake: a container with 1 core and 200 MB, one port forwarded from the host,
     until sshd's banner comes back through the forwarded port;
  2. resize a running container by one unit (1 -> 2 cores, 200 -> 400 MB), alone and for
     each of 128 running containers;
  3. terminate (no data to merge);
  4. the manager's memory (PSS) idle and with 32 containers: its daemons, and its daemons
     plus the helper processes it keeps per container (shims, proxies, monitors).
The floor is python3-lxc alone (clone + start + sshd; cgroup writes; kill + destroy).

The peers are installed from Debian (docker.io, lxd) by this script, their daemons
started here with their own state under /var/lib/enorm-peers and /run/enorm-peers and
stopped at the end; Docker gets its own bridge (10.84.0.0/24) with no iptables changes
(published ports go through its userland proxy), LXD its own bridge (10.83.0.0/24, no NAT,
no firewall) and a btrfs loop pool (its fastest local backend: snapshot clones).

    python -m bench.peers [--n 30] [--many 128] [--quick]

Writes bench/results/peers.json and peers.png.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import random
import re
import signal
import socket
import statistics
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import lxc
import psutil
import requests

from games.local import LocalEdgeNode

RESULTS = Path(__file__).resolve().parent / "results"
STATE = Path("/var/lib/enorm-peers")
RUN = Path("/run/enorm-peers")
BASE = "enorm-base-debian"
INIT = "/usr/local/sbin/enorm-init"
PACKAGES = ("docker.io", "lxd", "lxd-client", "btrfs-progs")
UNIT = (1.0, 200)  # cores, MB: the paper's unit
# Host ports of their own (other benches and the tests use 24000-50199).
PORTS = {"enorm": 51000, "docker": 52000, "lxd": 53000, "floor": None}
NODE = dict(
    name="bpeer", bridge="enbpeer0", subnet="10.85.0.0/24", port_range=[51000, 51999],
    listen_port=18650, cores=512.0, memory_mb=262144, reserve_cores=0.0,
    reserve_memory_mb=0, unit={"cores": UNIT[0], "memory_mb": UNIT[1]},
    basic_service="reserve", autoscale_interval_s=86400, tokens={"peers-token": "peers"},
)
FLOOR_PREFIX = "enorm-bpeer-floor"


def log(msg: str) -> None:
    print(msg, flush=True)


def summary(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {"p50": round(statistics.median(xs), 4),
            "p95": round(xs[min(len(xs) - 1, int(0.95 * len(xs)))], 4), "n": len(xs)}


def wait_banner(port: int, timeout: float = 30.0) -> None:
    """Until sshd's banner arrives through 127.0.0.1:port. A userland proxy accepts before
    the container is up, so an accepted connection alone proves nothing."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.settimeout(1)
                if s.recv(8).startswith(b"SSH-"):
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"no SSH banner on 127.0.0.1:{port} after {timeout}s")
        time.sleep(0.003)


def pss_mb(pids: list[int]) -> float:
    """Proportional set size: a page shared by k processes counts 1/k to each. RSS would
    count a forked monitor's copy-on-write pages (python3-lxc forks the daemon) or the
    shims' shared binary once per process."""
    total = 0
    for pid in set(pids):
        with contextlib.suppress(psutil.Error):
            total += psutil.Process(pid).memory_full_info().pss
    return round(total / 2**20, 1)


def tree(pid: int) -> list[int]:
    try:
        p = psutil.Process(pid)
        return [pid, *(c.pid for c in p.children(recursive=True))]
    except psutil.Error:
        return []


def pids_named(*names: str) -> list[int]:
    return [p.pid for p in psutil.process_iter(["name", "cmdline"])
            if p.info["name"] in names
            or any(n in " ".join(p.info["cmdline"] or [])[:200] for n in names if "/" in n)]


# -- installation -------------------------------------------------------------------------
def install() -> None:
    missing = [p for p in PACKAGES if subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", p], capture_output=True, text=True
    ).stdout != "install ok installed"]
    if missing:
        log(f"peers: installing {' '.join(missing)}")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "-o", "DPkg::Lock::Timeout=600", "install", "-y", "-qq",
                        "--no-install-recommends", *missing], check=True, env=env,
                       stdout=subprocess.DEVNULL)


def rootfs_tarball() -> Path:
    """The base container's rootfs as a tarball (built once per base), with /sbin/init
    pointing at enorm's init so that all three start the same PID 1."""
    src = Path(lxc.Container(BASE).get_config_item("lxc.rootfs.path").split(":", 1)[-1])
    stamp = str(int(src.stat().st_mtime))
    out = STATE / f"rootfs-{stamp}.tar"
    if out.exists():
        return out
    STATE.mkdir(parents=True, exist_ok=True)
    for old in STATE.glob("rootfs-*.tar"):
        old.unlink()
    tmp = out.with_suffix(".part")
    with tarfile.open(tmp, "w") as tar:
        tar.add(src, arcname=".")
        link = tarfile.TarInfo("./sbin/init")
        link.type, link.linkname = tarfile.SYMTYPE, INIT
        tar.addfile(link)
    tmp.rename(out)
    return out


# -- the peers ----------------------------------------------------------------------------
class Peer:
    name = ""

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def handshake(self, i: int) -> Any: ...
    def resize(self, handle: Any, cores: float, memory_mb: int) -> None: ...
    def terminate(self, handle: Any) -> None: ...
    def manager_pids(self) -> list[int]: ...
    def helper_pids(self) -> list[int]: ...

    def settle(self) -> None:
        """Wait (untimed) for work a peer does after it answered, so that it does not
        land on the next job's time."""


class Enorm(Peer):
    name = "enorm"

    def __init__(self, tmp: Path) -> None:
        key = tmp / "key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                       check=True)
        self.pub = key.with_suffix(".pub").read_text().strip()
        self.node = LocalEdgeNode(**NODE, state_dir=str(tmp / "state"))
        self.s = requests.Session()
        self.s.headers["Authorization"] = "Bearer peers-token"

    def start(self) -> None:
        self.node.start()
        self.op = requests.Session()
        self.op.headers["Authorization"] = f"Bearer {self.node.operator_token()}"

    def stop(self) -> None:
        self.node.close()

    def handshake(self, i: int) -> tuple[str, int]:
        r = self.s.post(self.node.url + "/v1/servers", timeout=60, json={
            "app": "peers", "priority": 5, "users": [], "latency_objective_ms": 50,
            "ssh_public_key": self.pub})
        r.raise_for_status()
        body = r.json()
        port = body["access"]["port"]
        wait_banner(port)
        return body["server_id"], port

    def resize(self, handle: tuple[str, int], cores: float, memory_mb: int) -> None:
        r = self.op.put(f"{self.node.url}/v1/servers/{handle[0]}/limits", timeout=60,
                        json={"cores": cores, "memory_mb": memory_mb})
        r.raise_for_status()

    def terminate(self, handle: tuple[str, int]) -> None:
        self.s.delete(f"{self.node.url}/v1/servers/{handle[0]}", timeout=60).raise_for_status()

    def settle(self) -> None:
        """A termination answers before its release (forwards, container, guard) is
        done: wait for the node's `enorm_releases_pending` to reach 0."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            text = self.op.get(self.node.url + "/metrics", timeout=10).text
            m = re.search(r"^enorm_releases_pending (\S+)$", text, re.M)
            if m is None or float(m.group(1)) == 0:  # None: a node that releases at once
                return
            time.sleep(0.01)

    def manager_pids(self) -> list[int]:
        assert self.node.proc is not None
        return tree(self.node.proc.pid) + pids_named(f"{self.node.config.state_dir}/store.sock")

    def helper_pids(self) -> list[int]:
        # python3-lxc's per-container monitor ("[lxc monitor] <path> <name>").
        return [p.pid for p in psutil.process_iter(["cmdline"])
                if "[lxc monitor]" in " ".join(p.info["cmdline"] or [])
                and "enorm-bpeer-" in " ".join(p.info["cmdline"] or [])]


class Docker(Peer):
    name = "docker"
    BRIDGE, NET = "enpd0", "10.84.0.1/24"

    def __init__(self, tarball: Path) -> None:
        self.tarball = tarball
        self.sock = RUN / "docker.sock"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        import docker

        RUN.mkdir(parents=True, exist_ok=True)
        subprocess.run(["ip", "route", "replace", "unreachable", "10.84.0.0/24", "metric",
                        "4000"], check=True)
        subprocess.run(["ip", "link", "add", self.BRIDGE, "type", "bridge"],
                       capture_output=True)
        subprocess.run(["ip", "addr", "replace", self.NET, "dev", self.BRIDGE], check=True)
        subprocess.run(["ip", "link", "set", self.BRIDGE, "up"], check=True)
        self.log = open(STATE / "dockerd.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            ["dockerd", "--data-root", str(STATE / "docker"), "--exec-root",
             str(RUN / "docker"), "--pidfile", str(RUN / "dockerd.pid"), "-H",
             f"unix://{self.sock}", "--bridge", self.BRIDGE, "--iptables=false",
             "--ip-masq=false", "--ip-forward=false", "--ip6tables=false",
             "--userland-proxy=true", "--dns", "127.0.0.1"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while not self.sock.exists() or not self._ping():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("dockerd did not start; see " + str(STATE / "dockerd.log"))
            time.sleep(0.1)
        self.client = docker.DockerClient(base_url=f"unix://{self.sock}", timeout=120)
        try:
            self.client.images.get("enorm-peers/debian:base")
        except docker.errors.ImageNotFound:
            self.client.api.import_image_from_file(str(self.tarball),
                                                   repository="enorm-peers/debian", tag="base")

    def _ping(self) -> bool:
        try:
            import docker

            return bool(docker.DockerClient(base_url=f"unix://{self.sock}", timeout=2).ping())
        except Exception:
            return False

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(Exception):
            for c in self.client.containers.list(all=True, filters={"name": "enpd-"}):
                c.remove(force=True)
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc = None
        subprocess.run(["ip", "link", "del", self.BRIDGE], capture_output=True)
        subprocess.run(["ip", "route", "del", "unreachable", "10.84.0.0/24", "metric", "4000"],
                       capture_output=True)

    def handshake(self, i: int) -> Any:
        port = PORTS["docker"] + i
        c = self.client.containers.run(
            "enorm-peers/debian:base", entrypoint=[INIT], name=f"enpd-{i}", detach=True,
            cpu_period=100_000, cpu_quota=int(UNIT[0] * 100_000), mem_limit=f"{UNIT[1]}m",
            ports={"22/tcp": ("127.0.0.1", port)})
        wait_banner(port)
        return c

    def resize(self, c: Any, cores: float, memory_mb: int) -> None:
        c.update(cpu_period=100_000, cpu_quota=int(cores * 100_000), mem_limit=f"{memory_mb}m",
                 memswap_limit=f"{2 * memory_mb}m")

    def terminate(self, c: Any) -> None:
        c.remove(force=True)

    def manager_pids(self) -> list[int]:
        assert self.proc is not None
        return [p for p in tree(self.proc.pid)
                if psutil.Process(p).name() in ("dockerd", "containerd")]

    def helper_pids(self) -> list[int]:
        """containerd's shims (their command line names our containerd's socket) and the
        userland port proxies (children of our dockerd)."""
        assert self.proc is not None
        out = []
        for p in psutil.process_iter(["name", "cmdline", "ppid"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if (p.info["name"].startswith("containerd-shim") and str(RUN) in cmd) or \
                    (p.info["name"] == "docker-proxy" and p.info["ppid"] == self.proc.pid):
                out.append(p.pid)
        return out


class Lxd(Peer):
    name = "lxd"
    BRIDGE = "enpl0"

    def __init__(self, tarball: Path) -> None:
        self.tarball = tarball
        self.dir = STATE / "lxd"
        self.proc: subprocess.Popen | None = None

    def _lxc(self, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(["lxc", *args], env={**os.environ, "LXD_DIR": str(self.dir)},
                              capture_output=True, input=input, check=True)

    def start(self) -> None:
        from pylxd import Client

        self.dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(["ip", "route", "replace", "unreachable", "10.83.0.0/24", "metric",
                        "4000"], check=True)
        env = {**os.environ, "LXD_DIR": str(self.dir)}
        self.log = open(STATE / "lxd.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(["lxd", "--group", "root", "--logfile",
                                      str(STATE / "lxd.daemon.log")], env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        subprocess.run(["lxd", "waitready", "--timeout", "120"], env=env, check=True)
        self.client = Client(endpoint=str(self.dir / "unix.socket"))
        if not self.client.storage_pools.exists("enpl"):
            preseed = f"""
config: {{}}
networks:
- name: {self.BRIDGE}
  type: bridge
  config:
    ipv4.address: 10.83.0.1/24
    ipv4.nat: "false"
    ipv4.firewall: "false"
    ipv6.address: none
storage_pools:
- name: enpl
  driver: btrfs
  config:
    size: 24GiB
profiles:
- name: default
  devices:
    eth0: {{name: eth0, network: {self.BRIDGE}, type: nic}}
    root: {{path: /, pool: enpl, type: disk}}
"""
            subprocess.run(["lxd", "init", "--preseed"], env=env, input=preseed.encode(),
                           check=True, capture_output=True)
        if not any("enorm-peers-debian" == a["name"] for i in self.client.images.all()
                   for a in i.aliases):
            meta = io.BytesIO()
            with tarfile.open(fileobj=meta, mode="w") as tar:
                data = (b"architecture: x86_64\ncreation_date: %d\n"
                        b"properties:\n  description: enorm base (debian)\n" % int(time.time()))
                info = tarfile.TarInfo("metadata.yaml")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            metafile = STATE / "lxd-meta.tar"
            metafile.write_bytes(meta.getvalue())
            self._lxc("image", "import", str(metafile), str(self.tarball),
                      "--alias", "enorm-peers-debian")

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(Exception):
            for inst in self.client.instances.all():
                if inst.name.startswith("enpl-"):
                    with contextlib.suppress(Exception):
                        inst.stop(force=True, wait=True)
                    inst.delete(wait=True)
        env = {**os.environ, "LXD_DIR": str(self.dir)}
        subprocess.run(["lxd", "shutdown", "--timeout", "60"], env=env, capture_output=True)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(30)
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc = None
        # dnsmasq and the bridge belong to LXD's network: remove what it left.
        for p in psutil.process_iter(["name", "cmdline"]):
            if p.info["name"] == "dnsmasq" and str(self.dir) in " ".join(p.info["cmdline"] or []):
                p.kill()
        subprocess.run(["ip", "link", "del", self.BRIDGE], capture_output=True)
        subprocess.run(["ip", "route", "del", "unreachable", "10.83.0.0/24", "metric", "4000"],
                       capture_output=True)

    def handshake(self, i: int) -> Any:
        port = PORTS["lxd"] + i
        inst = self.client.instances.create({
            "name": f"enpl-{i}", "source": {"type": "image", "alias": "enorm-peers-debian"},
            "config": {"limits.cpu": str(int(UNIT[0])), "limits.memory": f"{UNIT[1]}MB"},
            "devices": {"ssh": {"type": "proxy", "listen": f"tcp:127.0.0.1:{port}",
                                "connect": "tcp:127.0.0.1:22"}},
        }, wait=True)
        inst.start(wait=True)
        wait_banner(port)
        return inst

    def resize(self, inst: Any, cores: float, memory_mb: int) -> None:
        inst.config["limits.cpu"] = str(int(cores))
        inst.config["limits.memory"] = f"{memory_mb}MB"
        inst.save(wait=True)

    def terminate(self, inst: Any) -> None:
        inst.stop(force=True, wait=True)
        inst.delete(wait=True)

    def manager_pids(self) -> list[int]:
        assert self.proc is not None
        return [p for p in tree(self.proc.pid) if psutil.Process(p).name() == "lxd"]

    def helper_pids(self) -> list[int]:
        me = str(self.dir)
        out = []
        for p in psutil.process_iter(["name", "cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if (p.info["name"] in ("lxd", "dnsmasq") and me in cmd and "forkproxy" in cmd) \
                    or ("[lxc monitor]" in cmd and me in cmd) \
                    or (p.info["name"] == "dnsmasq" and me in cmd):
                out.append(p.pid)
        return out


class Floor(Peer):
    """python3-lxc alone: what any of them must at least do."""

    name = "floor"
    # enorm's own bridge, with a second subnet of its own so that the two never collide.
    BRIDGE, PREFIX, NET = "enbpeer0", "10.85.1", "10.85.1.0/24"

    def start(self) -> None:
        subprocess.run(["ip", "route", "replace", "unreachable", self.NET, "metric", "4000"],
                       check=True)
        subprocess.run(["ip", "addr", "replace", f"{self.PREFIX}.1/24", "dev", self.BRIDGE],
                       check=True)

    def stop(self) -> None:
        self.cleanup()
        subprocess.run(["ip", "addr", "del", f"{self.PREFIX}.1/24", "dev", self.BRIDGE],
                       capture_output=True)
        subprocess.run(["ip", "route", "del", "unreachable", self.NET, "metric", "4000"],
                       capture_output=True)

    def handshake(self, i: int) -> Any:
        name = f"{FLOOR_PREFIX}{i:03d}"
        addr = f"{self.PREFIX}.{2 + i % 250}"
        c = lxc.Container(BASE).clone(name, flags=lxc.LXC_CLONE_SNAPSHOT, bdevtype="overlay")
        c.clear_config_item("lxc.net.0.type")
        # The MAC follows the address, as Docker's does: the bulk reuses the rounds'
        # addresses, and a random MAC can meet the host's neighbour entry still naming
        # the previous container's (the likely cause of a floor sshd unreachable for
        # 30 s in session 8's quick run; enorm pins the entry, `pin_neighbour`).
        mac = "02:00:" + ":".join(f"{int(o):02x}" for o in addr.split("."))
        for k, v in (("lxc.net.0.type", "veth"), ("lxc.net.0.link", self.BRIDGE),
                     ("lxc.net.0.flags", "up"), ("lxc.net.0.name", "eth0"),
                     ("lxc.net.0.hwaddr", mac),
                     ("lxc.net.0.ipv4.address", f"{addr}/24"),
                     ("lxc.net.0.ipv4.gateway", f"{self.PREFIX}.1"),
                     ("lxc.cgroup.cpu.cfs_quota_us", str(int(UNIT[0] * 100000))),
                     ("lxc.cgroup.memory.limit_in_bytes", f"{UNIT[1]}M")):
            c.set_config_item(k, v)
        c.save_config()
        c.start()
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection((addr, 22), timeout=1) as s:
                    s.settimeout(1)
                    if s.recv(8).startswith(b"SSH-"):
                        break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.003)
        return c

    def resize(self, c: Any, cores: float, memory_mb: int) -> None:
        c.set_cgroup_item("cpu.cfs_quota_us", str(int(cores * 100000)))
        c.set_cgroup_item("memory.limit_in_bytes", str(memory_mb * 2**20))

    def terminate(self, c: Any) -> None:
        os.kill(c.init_pid, signal.SIGKILL)
        while c.state != "STOPPED":
            time.sleep(0.002)
        c.destroy()

    @staticmethod
    def cleanup() -> None:
        for name in lxc.list_containers():
            if name.startswith(FLOOR_PREFIX):
                c = lxc.Container(name)
                c.stop()
                c.destroy()


# -- the jobs -----------------------------------------------------------------------------
def single_jobs(peers: list[Peer], n: int) -> dict[str, dict[str, list[float]]]:
    """n rounds; in each, every peer (in a fresh random order) does handshake, resize up
    by one unit and terminate on one container (and resizes back, untimed)."""
    out: dict[str, dict[str, list[float]]] = {
        p.name: {"handshake": [], "resize": [], "terminate": []} for p in peers}
    for i in range(n):
        for p in random.sample(peers, len(peers)):
            t0 = time.perf_counter()
            h = p.handshake(i)
            t1 = time.perf_counter()
            p.resize(h, 2 * UNIT[0], 2 * UNIT[1])
            t2 = time.perf_counter()
            p.resize(h, *UNIT)
            t3 = time.perf_counter()
            p.terminate(h)
            t4 = time.perf_counter()
            p.settle()
            out[p.name]["handshake"].append(t1 - t0)
            out[p.name]["resize"].append(t2 - t1)
            out[p.name]["terminate"].append(t4 - t3)
        if i % 10 == 9:
            log(f"  round {i + 1}/{n}")
    return out


def many_jobs(peers: list[Peer], many: int) -> dict[str, dict[str, Any]]:
    """Per peer: `many` containers up (memory idle and at 32), resize each by one unit
    (the total), then terminate them all."""
    out: dict[str, dict[str, Any]] = {}
    for p in random.sample(peers, len(peers)):
        log(f"  {p.name}: {many} containers")
        res: dict[str, Any] = {}
        measure = p.name != "floor"
        if measure:
            time.sleep(1)
            res["memory_idle_mb"] = {"manager": pss_mb(p.manager_pids()),
                                     "with_helpers": pss_mb(p.manager_pids() + p.helper_pids())}
        handles = []
        for i in range(many):
            handles.append(p.handshake(500 + i))
            if i == 31 and measure:
                time.sleep(1)
                res["memory_32_mb"] = {"manager": pss_mb(p.manager_pids()),
                                       "with_helpers": pss_mb(p.manager_pids()
                                                              + p.helper_pids())}
        t0 = time.perf_counter()
        for h in handles:
            p.resize(h, 2 * UNIT[0], 2 * UNIT[1])
        res["resize_all_s"] = round(time.perf_counter() - t0, 4)
        t0 = time.perf_counter()
        for h in handles:
            p.terminate(h)
        res["terminate_all_s"] = round(time.perf_counter() - t0, 4)
        p.settle()  # enorm: until the last release is done too
        res["terminate_all_released_s"] = round(time.perf_counter() - t0, 4)
        out[p.name] = res
    return out


def run(n: int, many: int) -> dict:
    install()
    tarball = rootfs_tarball()
    with tempfile.TemporaryDirectory(prefix="enorm-bpeer-") as tmp:
        enorm, docker, lxd, floor = (Enorm(Path(tmp)), Docker(tarball), Lxd(tarball),
                                     Floor())
        started: list[Peer] = []
        try:
            for p in (enorm, floor, docker, lxd):  # enorm first: it makes the bridge
                log(f"peers: starting {p.name}")
                p.start()
                started.append(p)
            peers: list[Peer] = [enorm, docker, lxd, floor]
            log(f"peers: {n} rounds of handshake / resize / terminate")
            single = single_jobs(peers, n)
            log(f"peers: {many} containers each")
            bulk = many_jobs(peers, many)
        finally:
            for p in reversed(started):
                with contextlib.suppress(Exception):
                    p.stop()
    jobs = {name: {job: summary(xs) for job, xs in d.items()} for name, d in single.items()}
    e = jobs["enorm"]
    ratios = {peer: {job: round(jobs[peer][job]["p50"] / e[job]["p50"], 2) for job in e}
              for peer in ("docker", "lxd")}
    ratios["floor"] = {job: round(e[job]["p50"] / jobs["floor"][job]["p50"], 2) for job in e}
    for peer in ("docker", "lxd"):
        ratios[peer]["resize_all"] = round(bulk[peer]["resize_all_s"]
                                           / bulk["enorm"]["resize_all_s"], 2)
        ratios[peer]["memory_32_with_helpers"] = round(
            bulk[peer]["memory_32_mb"]["with_helpers"]
            / bulk["enorm"]["memory_32_mb"]["with_helpers"], 2)
    ratios["floor"]["resize_all"] = round(bulk["enorm"]["resize_all_s"]
                                          / bulk["floor"]["resize_all_s"], 2)
    # Terminating them all one by one, until the last one's release is done too.
    for peer in ("docker", "lxd"):
        ratios[peer]["terminate_all_released"] = round(
            bulk[peer]["terminate_all_released_s"] / bulk["enorm"]["terminate_all_released_s"],
            2)
    ratios["floor"]["terminate_all_released"] = round(
        bulk["enorm"]["terminate_all_released_s"] / bulk["floor"]["terminate_all_s"], 2)
    return {
        "jobs": jobs,
        "many": {"containers": many, **bulk},
        "ratios": ratios,
        "ratio_meaning": "peer p50 / enorm p50 (above 1: enorm faster); floor: enorm / floor",
        "versions": versions(),
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                    "load_1m_at_end": os.getloadavg()[0]},
        "raw": single,
    }


def versions() -> dict[str, str]:
    def out(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""

    return {"docker": out("dockerd", "--version"), "lxd": out("lxd", "--version"),
            "lxc": lxc.version}


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["floor", "enorm", "docker", "lxd"]
    colors = {"floor": "#9e9e9e", "enorm": "#1565c0", "docker": "#0db7ed", "lxd": "#e95420"}
    fig, axes = plt.subplots(1, 4, figsize=(16, 4))
    for ax, job in zip(axes[:3], ("handshake", "resize", "terminate"), strict=True):
        p50 = [res["jobs"][n][job]["p50"] for n in names]
        p95 = [res["jobs"][n][job]["p95"] for n in names]
        ax.bar(names, p50, color=[colors[n] for n in names])
        ax.errorbar(names, p50, yerr=[[0] * 4, [b - a for a, b in zip(p50, p95, strict=True)]],
                    fmt="none", ecolor="black", capsize=3)
        ax.set_title(f"{job} (p50, bar to p95), n={res['jobs']['enorm'][job]['n']}")
        ax.set_ylabel("seconds")
        ax.set_yscale("log")
    ax = axes[3]
    m = res["many"]
    peers = ["enorm", "docker", "lxd"]
    ax.bar([f"{p}\nidle" for p in peers], [m[p]["memory_idle_mb"]["with_helpers"]
                                           for p in peers], color="#bbb")
    ax.bar([f"{p}\n32" for p in peers], [m[p]["memory_32_mb"]["with_helpers"] for p in peers],
           color=[colors[p] for p in peers])
    ax.set_title("manager memory (PSS) incl. per-container helpers (MB)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=30, help="rounds of single-container jobs")
    ap.add_argument("--many", type=int, default=128, help="containers for the bulk jobs")
    ap.add_argument("--quick", action="store_true", help="n=5, 32 containers")
    args = ap.parse_args()
    n, many = (5, 32) if args.quick else (args.n, args.many)
    res = run(n, many)
    RESULTS.mkdir(exist_ok=True)
    name = "peers-quick" if args.quick else "peers"
    (RESULTS / f"{name}.json").write_text(json.dumps(res, indent=2) + "\n")
    plot(res, RESULTS / f"{name}.png")
    print(json.dumps({k: v for k, v in res.items() if k != "raw"}, indent=2))


if __name__ == "__main__":
    main()
