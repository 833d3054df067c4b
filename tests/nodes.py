"""Real edge nodes for tests: an `enorm serve` process with its own name, bridge, subnet,
ports and state, and `enorm down` at the end so nothing is left behind.

Every name a test node makes starts with `t` + a number (node `t17`: containers
`enorm-t17-*`, bridge `entb17`, chains `ENORM-T17*`), subnets are 10.89.<n>.0/24. A
number is held (a flock) from `make_node` until the node is down with nothing of it
left on the machine (`traces`); a node that was not is never reused by another test
process until this one exits.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests

from enorm import idmap, sizing

VENV_BIN = Path(sys.executable).parent
LXC_PATH = Path("/var/lib/lxc")
BASE = "enorm-base-debian"
_held: dict[int, int] = {}  # node number -> the fd of its lock file


def node_index() -> int:
    """A node number no other test process on this machine holds (a flock per number),
    so that concurrent test runs never share a name, bridge, subnet or port."""
    lockdir = Path("/run/enorm-test-nodes")
    lockdir.mkdir(parents=True, exist_ok=True)
    start = random.randrange(180)
    for i in range(180):
        n = 20 + (start + i) % 180
        if n in _held:
            continue  # flock(2) would grant this process its own lock again
        fd = os.open(lockdir / str(n), os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        _held[n] = fd
        return n
    raise RuntimeError("no free test node number (180 in use)")


def release_index(n: int) -> None:
    """Give the number back (its node is down and nothing of it is left)."""
    fd = _held.pop(n, None)
    if fd is not None:
        os.close(fd)  # the flock goes with the last fd


def traces(name: str, settings: dict) -> dict[str, list[str]]:
    """Everything of node `name` on this machine, found without the node's own code:
    containers and their directories, mounts, idmapped mount points, loop devices, id
    claims, iptables and ebtables chains and rules, its bridge, its store's Redis. Empty
    when the node is entirely down (the subnet's unreachable route stays by design)."""
    lxc_path = Path(settings.get("lxc_path", LXC_PATH))
    prefix = f"enorm-{name}-"
    chain = re.compile(rf"ENORM-{name.upper()}(?![A-Z0-9])|enorm:{name}(?![a-z0-9])")
    with open("/proc/self/mountinfo") as f:
        mounts = [ln.split()[4] for ln in f if f"/{prefix}" in ln.split()[4]]
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    claims = lxc_path / ".enorm-idmap"
    sock = str(Path(settings["state_dir"]) / "store.sock")
    found = {
        "directories": sorted(p.name for p in lxc_path.glob(prefix + "*")),
        "mounts": mounts,
        "idmap_points": sorted(p.name for p in idmap.MOUNTS.glob(prefix + "*")),
        "loop_devices": [ln for ln in loops.splitlines() if f"/{prefix}" in ln],
        "id_claims": sorted(f"{p.name}: {_read(p)}" for p in claims.glob("[0-9]*")
                            if _read(p).startswith(prefix)),
        "iptables": [ln for table in ("nat", "filter")
                     for ln in _run("iptables-save", "-t", table).splitlines()
                     if chain.search(ln)],
        "ebtables": [ln for ln in _run("ebtables-save").splitlines() if chain.search(ln)],
        "bridge": [settings["bridge"]] if subprocess.run(
            ["ip", "link", "show", "dev", settings["bridge"]],
            capture_output=True).returncode == 0 else [],
        "store": [str(p.pid) for p in psutil.process_iter(["cmdline"])
                  if f"unixsocket:{sock}" in " ".join(p.info["cmdline"] or []).split()],
    }
    return {k: v for k, v in found.items() if v}


def eventually(check: Callable[[], Any], timeout: float = 10.0) -> Any:
    """The first true value of `check()` within `timeout` s (what a node does after it
    answered: a terminated server's release, the layer pool's refill); the last value
    otherwise."""
    deadline = time.monotonic() + timeout
    while not (got := check()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return got


def destroyed(container: str, timeout: float = 30.0) -> bool:
    """The container is gone, or goes within `timeout` s (a termination's release runs
    after its answer); one half destroyed (liblxc errs on its config) counts as gone."""
    import lxc

    def gone() -> bool:
        try:
            return not lxc.Container(container).defined
        except RuntimeError:
            return True
    return eventually(gone, timeout)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:  # released meanwhile (another node's)
        return ""


def _run(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f'"{k}" = {toml_value(x)}' for k, x in v.items()) + " }"
    return str(v)


@dataclass
class EdgeNode:
    name: str
    dir: Path
    settings: dict
    index: int
    proc: subprocess.Popen | None = None
    tokens: dict[str, str] = field(default_factory=dict)
    # The one host port (at the gateway) its containers may connect to: a cloud game
    # server on this machine (tests/e2e). Nothing else on the host answers them.
    cloud_port: int | None = None

    @property
    def config_path(self) -> Path:
        return self.dir / "node.toml"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.settings['listen_port']}"

    def write_config(self) -> None:
        self.config_path.write_text(
            "".join(f"{k} = {toml_value(v)}\n" for k, v in self.settings.items()))

    def start(self, timeout: float = 30, umask: int = -1) -> None:
        log = open(self.dir / "daemon.log", "ab")
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "enorm"), "serve", "-c", str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, umask=umask)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if requests.get(self.url + "/healthz", timeout=0.5).ok:
                    return
            except requests.ConnectionError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"node {self.name} did not start:\n"
                                   + (self.dir / "daemon.log").read_text()[-3000:])
            time.sleep(0.05)

    def kill(self) -> None:
        """kill -9, as a crash would."""
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def client(self, owner: str = "cloud-a") -> requests.Session:
        token = next(t for t, o in self.tokens.items() if o == owner)
        s = requests.Session()
        s.headers["Authorization"] = f"Bearer {token}"
        return s

    def released(self, timeout: float = 30.0) -> None:
        """Wait until every terminated server's release (forwards, container, guard:
        after the answer, enorm.release) is done."""
        op = {"Authorization": f"Bearer {self.settings['operator_token']}"}

        def pending() -> float:
            text = requests.get(self.url + "/metrics", headers=op, timeout=10).text
            return float(re.search(r"^enorm_releases_pending (\S+)$", text, re.M).group(1))

        assert eventually(lambda: pending() == 0, timeout), "releases still pending"

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(VENV_BIN / "enorm"), *args, "-c", str(self.config_path)],
                              capture_output=True, text=True, timeout=300)

    def down(self) -> None:
        """Stop the daemon and take the node down; its number goes back only once
        nothing of it is left (else it stays held, so that no other test meets it)."""
        self.stop()
        try:
            r = self.cli("down")
        except subprocess.TimeoutExpired as exc:
            r = subprocess.CompletedProcess(exc.cmd, -1, str(exc.stdout), str(exc.stderr))
        failed = f"enorm down exited {r.returncode}: {r.stdout}{r.stderr}" if r.returncode else ""
        from enorm import store  # a store left running (a down that died) is stopped here

        if store.stop_managed(Path(self.settings["state_dir"])) and not failed:
            failed = "enorm down left the store's Redis running"
        left = traces(self.name, self.settings)
        if failed or left:
            raise RuntimeError(f"node {self.name}: {failed or 'enorm down exited 0'}"
                               + (f"; left on the machine: {left}" if left else ""))
        release_index(self.index)


def make_node(base: Path, cloud_port: int | None = None, **overrides: Any) -> EdgeNode:
    n = node_index()
    name = f"t{n}"
    tokens = {f"tok-a-{n}": "cloud-a", f"tok-b-{n}": "cloud-b"}
    settings = {
        "name": name,
        "listen_port": 18000 + n,
        "state_dir": str(base / "state"),
        "bridge": f"entb{n}",
        "subnet": f"10.89.{n}.0/24",
        "port_range": [30000 + n * 100, 30000 + n * 100 + 99],
        "cores": 2.0,
        "memory_mb": 4096,
        "reserve_cores": 0.0,
        "reserve_memory_mb": 0,
        "basic_service": "reserve",
        "unit": {"cores": 0.25, "memory_mb": 64},
        "tokens": tokens,
        # The tests' cloud Redis and callbacks listen on loopback.
        "destinations": {"*": ["127.0.0.0/8"]},
        "operator_token": f"op-{n}",
        "container_egress": [f"10.89.{n}.1/32:{cloud_port}"] if cloud_port else [],
        **overrides,
    }
    base.mkdir(parents=True, exist_ok=True)
    node = EdgeNode(name=name, dir=base, settings=settings, index=n, tokens=tokens,
                    cloud_port=cloud_port)
    node.write_config()
    return node


@pytest.fixture
def edge_node(tmp_path: Path) -> Iterator[Callable[..., EdgeNode]]:
    """Factory: `edge_node(**settings)` writes a config and starts a real daemon.

    The nodes of one test share a `cloud_port` their containers may reach at the gateway.
    """
    made: list[EdgeNode] = []
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        cloud_port = s.getsockname()[1]

    def make(start: bool = True, **overrides: Any) -> EdgeNode:
        node = make_node(tmp_path / f"node{len(made)}", cloud_port, **overrides)
        made.append(node)
        if start:
            node.start()
        return node

    yield make
    down_all(made)


def down_all(nodes: list) -> None:
    """Take every node down, whatever the others did; fail naming every failure."""
    failures = []
    for node in nodes:
        try:
            node.down()
        except Exception as exc:
            failures.append(f"{type(exc).__name__}: {exc}")
    if failures:
        pytest.fail("\n".join(failures), pytrace=False)


@pytest.fixture
def own_base() -> Iterator[Callable[..., Path]]:
    """Factory: `own_base(init=..., needs=...)` makes an LXC path of the test's own (a
    node's `lxc_path`) with a base container that reads the machine's base rootfs
    (linked, read-only) but has its own config and its own `enorm-needs.json`, so that
    nothing a test changes there (the image's measured needs, its init) reaches another
    node on the machine. `needs`: "machine" (a copy of the machine's figure), None (not
    measured yet) or a `sizing.Needs`. Request it before `edge_node`: removed after the
    nodes are down."""
    made: list[Path] = []

    def make(init: str | None = None, needs: Any = "machine") -> Path:
        # Not under /tmp: the containers' root must traverse the path (pytest's is 0700).
        top = Path("/var/lib/enorm-test")
        top.mkdir(mode=0o755, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix="lxc-", dir=top))
        path.chmod(0o755)
        made.append(path)
        machine = LXC_PATH / BASE
        (path / BASE).mkdir()
        conf = (machine / "config").read_text()
        if init is not None:
            conf = re.sub(r"^lxc\.init\.cmd = .*$", f"lxc.init.cmd = {init}", conf, flags=re.M)
        (path / BASE / "config").write_text(conf)
        (path / BASE / "rootfs").symlink_to(machine / "rootfs")
        if needs == "machine":
            needs = sizing.load(LXC_PATH, BASE)
        if needs is not None:
            sizing.save(path, BASE, needs)
        return path

    yield make
    for path in made:
        inside = [p for p in idmap.mount_points() if p.startswith(f"{path}/")]
        assert not inside, f"{path}: still mounted: {inside}"
        shutil.rmtree(path)


@contextlib.contextmanager
def user_namespace(n: int) -> Iterator[tuple[str, str, str]]:
    """A network namespace standing for a user device: (netns, its address, host address).

    Uses 10.90.<n>.0/30; the subnet is guarded by an unreachable route while it exists.
    """
    ns, host_if, ns_if = f"entu{n}", f"entuh{n}", f"entun{n}"
    host_ip, ns_ip, net = f"10.90.{n}.1", f"10.90.{n}.2", f"10.90.{n}.0/30"

    def ip(*args: str, check: bool = True) -> None:
        subprocess.run(["ip", *args], check=check, capture_output=True)

    ip("route", "replace", "unreachable", net, "metric", "4000")
    try:
        ip("netns", "add", ns)
        ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if, "netns", ns)
        ip("addr", "add", f"{host_ip}/30", "dev", host_if)
        ip("link", "set", host_if, "up")
        ip("-n", ns, "addr", "add", f"{ns_ip}/30", "dev", ns_if)
        ip("-n", ns, "link", "set", ns_if, "up")
        ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", ns, "route", "add", "default", "via", host_ip)
        yield ns, ns_ip, host_ip
    finally:
        ip("link", "del", host_if, check=False)
        ip("netns", "del", ns, check=False)
        ip("route", "del", "unreachable", net, "metric", "4000", check=False)
