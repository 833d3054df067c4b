"""A Redis Cluster of 3 masters, each with a replica, on loopback ports, for the fleet
bench and its test: started in a directory of its own (`enorm-fleet-*`), stopped and
removed with it. `kill_master` kills a master (kill -9) for its replica to take over.
With `host` (an address of this machine's, e.g. the host end of a network namespace's
veth), the nodes listen there too and announce it, so that a client in that namespace
follows the cluster's redirections (a cluster tells its clients its nodes' addresses)."""

from __future__ import annotations

import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

NODE_TIMEOUT_MS = 2000  # how long a silent master takes to be failed over (plus an election)


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _ports(n: int, avoid: frozenset[int] = frozenset()) -> list[int]:
    """`n` free ports whose cluster-bus port (+10000) is free too, both below the
    kernel's ephemeral range (32768 on): an outgoing connection of any process may take
    a free port there between this check and the server's bind."""
    out: list[int] = []
    while len(out) < n:
        p = random.randrange(20000, 22700)
        if p not in out and p not in avoid and _free(p) and _free(p + 10000):
            out.append(p)
    return out


@dataclass
class Cluster:
    masters: int = 3
    replicas: int = 1
    base: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="enorm-fleet-")))
    procs: dict[int, subprocess.Popen] = field(default_factory=dict)
    host: str = "127.0.0.1"  # the address the nodes announce

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.alive()[0]}/0"

    def start(self) -> Cluster:
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _server(self, p: int) -> subprocess.Popen:
        d = self.base / str(p)
        d.mkdir()
        return subprocess.Popen(
            ["redis-server", "--port", str(p), "--bind", *sorted({"127.0.0.1", self.host}),
             "--cluster-announce-ip", self.host, "--save", "",
             "--appendonly", "no", "--dir", str(d), "--protected-mode", "no",
             "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
             "--cluster-node-timeout", str(NODE_TIMEOUT_MS)],
            stdout=(d / "redis.log").open("wb"), stderr=subprocess.STDOUT)

    def _start(self) -> Cluster:
        ports = _ports(self.masters * (1 + self.replicas))
        tried = set(ports)
        for i, p in enumerate(ports):
            for attempt in range(5):  # a port taken since the check: the server exits
                self.procs[p] = self._server(p)
                if self._up(p):
                    break
                del self.procs[p]
                tail = (self.base / str(p) / "redis.log").read_bytes()[-300:]
                if attempt == 4:
                    raise RuntimeError(f"redis {p} did not start: {tail!r}")
                p = ports[i] = _ports(1, avoid=frozenset(tried))[0]
                tried.add(p)
        subprocess.run(["redis-cli", "--cluster", "create",
                        *[f"{self.host}:{p}" for p in ports],
                        "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                       check=True, capture_output=True, timeout=60)
        self._wait(self.ok, "cluster_state:ok")
        return self

    def _up(self, p: int, timeout: float = 30.0) -> bool:
        """The server on `p` answers (False: it exited first)."""
        deadline = time.monotonic() + timeout
        while self.procs[p].poll() is None:
            try:
                if redis.Redis(port=p, socket_timeout=1).ping():
                    return True
            except (redis.RedisError, OSError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis {p}")
            time.sleep(0.1)
        return False

    @staticmethod
    def _wait(check, what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if check():
                    return
            except (redis.RedisError, OSError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(what)
            time.sleep(0.1)

    def alive(self) -> list[int]:
        return [p for p, proc in self.procs.items() if proc.poll() is None]

    def ok(self) -> bool:
        return all(redis.Redis(port=p).execute_command("CLUSTER INFO")["cluster_state"] == "ok"
                   for p in self.alive())

    def roles(self) -> dict[int, str]:
        """port -> master | slave, for the nodes alive."""
        return {p: redis.Redis(port=p).execute_command("ROLE")[0].decode()
                for p in self.alive()}

    def master_ports(self) -> list[int]:
        return sorted(p for p, r in self.roles().items() if r == "master")

    def ops(self, replicas: bool = False) -> dict[int, int]:
        """port -> commands processed so far, of each master alive (and each replica:
        the count a phase starts from, so that a replica promoted during it is counted
        from there, not from its start)."""
        ports = self.alive() if replicas else self.master_ports()
        return {p: int(redis.Redis(port=p).info("stats")["total_commands_processed"])
                for p in ports}

    def memory(self) -> dict[int, int]:
        return {p: int(redis.Redis(port=p).info("memory")["used_memory"])
                for p in self.master_ports()}

    def kill_master(self, port: int | None = None) -> tuple[int, float]:
        """kill -9 of a master; returns its port and the seconds until its replica took
        over and the cluster answered ok again."""
        port = port or self.master_ports()[0]
        t0 = time.monotonic()
        self.procs[port].send_signal(signal.SIGKILL)
        self.procs[port].wait()
        self._wait(lambda: len(self.master_ports()) == self.masters and self.ok(),
                   "a replica promoted", timeout=60)
        return port, time.monotonic() - t0

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.base, ignore_errors=True)
