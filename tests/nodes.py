"""Real edge nodes for tests: an `enorm serve` process with its own name, bridge, subnet,
ports and state, and `enorm down` at the end so nothing is left behind.

Every name a test node makes starts with `t` + a number (node `t17`: containers
`enorm-t17-*`, bridge `entb17`, chains `ENORM-T17*`), subnets are 10.89.<n>.0/24.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

VENV_BIN = Path(sys.executable).parent
_held: list[int] = []  # lock files of the indexes this process holds


def node_index() -> int:
    """A node number no other test process on this machine holds (a flock per number),
    so that concurrent test runs never share a name, bridge, subnet or port."""
    lockdir = Path("/run/enorm-test-nodes")
    lockdir.mkdir(parents=True, exist_ok=True)
    start = random.randrange(180)
    for i in range(180):
        n = 20 + (start + i) % 180
        fd = os.open(lockdir / str(n), os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        _held.append(fd)
        return n
    raise RuntimeError("no free test node number (180 in use)")


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

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(VENV_BIN / "enorm"), *args, "-c", str(self.config_path)],
                              capture_output=True, text=True, timeout=300)

    def down(self) -> None:
        self.stop()
        r = self.cli("down")
        if r.returncode != 0:
            raise RuntimeError(f"enorm down failed: {r.stdout}{r.stderr}")


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
    node = EdgeNode(name=name, dir=base, settings=settings, tokens=tokens, cloud_port=cloud_port)
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
    for node in made:
        node.down()


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
