"""Shared fixtures: real redis-server processes on loopback, started and stopped per test.

Each server runs in the test's tmp dir on a free port with persistence off. Only the
processes started here are stopped here.
"""

from __future__ import annotations

import fcntl
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from enorm.network import wait_tcp

# The longest files first: `make test` hands whole files to two workers in collection
# order, so a long file collected last would run alone at the end.
LONGEST_FIRST = ("integration/test_ansible.py", "integration/test_fuzz.py",
                 "integration/test_soak.py", "integration/test_testbed.py",
                 "e2e/test_nearby.py", "integration/test_leftovers.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        path = item.path.as_posix()
        return next((i for i, f in enumerate(LONGEST_FIRST) if path.endswith(f)),
                    len(LONGEST_FIRST))
    items.sort(key=rank)  # stable: the rest keep their order

def free_port(below: int | None = None) -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now (optionally < below)."""
    if below is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    for _ in range(200):
        port = random.randrange(20000, below)
        if _is_free(port) and _is_free(port + 10000):
            return port
    raise RuntimeError(f"no free port pair below {below}")


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def wait_port(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
    """Block until something accepts on host:port."""
    wait_tcp(host, port, timeout, interval=0.02)


@dataclass
class RedisServer:
    port: int
    proc: subprocess.Popen
    dir: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _start_redis(base: Path, *extra: str) -> RedisServer:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (scripts/setup.sh installs it)")
    # a cluster node also listens on port + 10000 (the cluster bus)
    port = free_port(below=30000 if "--cluster-enabled" in extra else None)
    d = base / f"redis-{port}"
    d.mkdir(parents=True)
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(d), "--protected-mode", "no", *extra],
        stdout=(d / "redis.log").open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    server = RedisServer(port, proc, d)
    try:
        wait_port(port)
    except TimeoutError:
        server.stop()
        raise
    return server


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Factory: `redis_server()` starts a fresh redis-server; extra args are passed on."""
    started: list[RedisServer] = []

    def start(*extra: str) -> RedisServer:
        server = _start_redis(tmp_path, *extra)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@dataclass
class RedisClusterInfo:
    nodes: list[RedisServer]

    @property
    def url(self) -> str:
        return self.nodes[0].url


@pytest.fixture
def redis_cluster(redis_server: Callable[..., RedisServer]) -> RedisClusterInfo:
    """A 3-master Redis Cluster on loopback, no replicas (stopped with redis_server)."""
    if shutil.which("redis-cli") is None:
        pytest.fail("redis-cli is not installed (scripts/setup.sh installs it)")
    nodes = [
        redis_server("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                     "--cluster-node-timeout", "5000")
        for _ in range(3)
    ]  # fmt: skip
    subprocess.run(
        ["redis-cli", "--cluster", "create", *[f"127.0.0.1:{n.port}" for n in nodes],
         "--cluster-replicas", "0", "--cluster-yes"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    deadline = time.monotonic() + 15
    for n in nodes:
        while True:
            out = subprocess.run(
                ["redis-cli", "-p", str(n.port), "cluster", "info"],
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout
            if "cluster_state:ok" in out:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster node {n.port} not ok: {out}")
            time.sleep(0.1)
    return RedisClusterInfo(nodes)


@pytest.fixture
def free_tcp_port() -> Callable[[], int]:
    """`free_tcp_port()`: a port on 127.0.0.1 nobody listens on right now."""
    return free_port


def free_port_span(n: int) -> list[int]:
    """[first, last] of `n` consecutive free ports below the kernel's ephemeral range
    (32768 up), where no other test's outgoing connection can take one meanwhile."""
    for _ in range(200):
        lo = random.randrange(25000, 32000)
        if all(_is_free(p) for p in range(lo, lo + n)):
            return [lo, lo + n - 1]
    raise RuntimeError(f"no {n} consecutive free ports in 25000-32000")


@pytest.fixture
def free_tcp_span() -> Callable[[int], list[int]]:
    """`free_tcp_span(n)`: a node's `port_range` of n free ports (`free_port_span`)."""
    return free_port_span


@pytest.fixture
def wait_tcp_port() -> Callable[..., None]:
    """`wait_tcp_port(port, timeout=10)`: block until 127.0.0.1:port accepts."""
    return wait_port


@pytest.fixture
def bench_lock():
    """The machine-wide bench lock: the testbed's names and ports are fixed."""
    with open("/run/enorm-bench.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield
