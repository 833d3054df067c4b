"""Local stand-ins of a cloud and an edge node, for the game's demo, the benchmarks and the
tests: a real `enorm serve` subprocess, a throw-away redis-server and a cloud server on a
real HTTP port, each stopped by whoever started it (`close`), also after a failure.

They live with the apps, not in the library: a cloud application server brings its own
cloud, and only these tools start one on this machine. (Here rather than in bench/ or
tests/: the demo is installed with the distribution, and neither of those is.)"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import requests
from werkzeug.serving import make_server

from enorm import config as node_config
from enorm import datasync


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _wait(check, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 (not up yet)
            pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not up after {timeout}s")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen | None, timeout: float = 10) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


class LocalRedis:
    """A redis-server on 127.0.0.1 with persistence off, in its own temp dir."""

    def __init__(self, port: int | None = None):
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed")
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="enorm-cloud-redis-")
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir, "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        try:
            client = datasync.connect(self.url)
            _wait(client.ping, 10, f"redis-server on {self.port}", self.proc)
            client.close()
        except BaseException:
            self.close()
            raise

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def close(self) -> None:
        _stop(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


class LocalEdgeNode:
    """`enorm serve` as a subprocess with the embedded defaults plus `settings` (passed as
    ENORM_* variables), and `enorm down` when closed."""

    def __init__(self, **settings: Any):
        # Everything of a local run (cloud Redis, callback) is on loopback.
        settings.setdefault("destinations", {"*": ["127.0.0.0/8"]})
        self.env = {**os.environ, **{f"ENORM_{k.upper()}": _env_value(v)
                                     for k, v in settings.items()}}
        self.config = node_config.load(None, **settings)
        self.log = tempfile.NamedTemporaryFile(prefix=f"enorm-{self.config.name}-",  # noqa: SIM115
                                               suffix=".log", delete=False)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return self.config.url

    def _cli(self, *args: str, **kw: Any) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "enorm.cli", *args], env=self.env,
                              capture_output=True, text=True, **kw)

    def start(self, timeout: float = 60) -> None:
        try:
            if requests.get(self.url + "/healthz", timeout=0.5).ok:
                raise RuntimeError(f"an edge node already answers at {self.url}")
        except requests.ConnectionError:
            pass
        self.proc = subprocess.Popen([sys.executable, "-m", "enorm.cli", "serve"], env=self.env,
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)  # fmt: skip
        try:
            _wait(lambda: requests.get(self.url + "/healthz", timeout=0.5).ok, timeout,
                  f"edge node {self.config.name}", self.proc)
        except BaseException:
            self.close()
            raise

    def operator_token(self) -> str:
        from enorm.daemon import operator_token

        return operator_token(self.config)

    def token_of(self, owner: str) -> str:
        return next(t for t, o in self.config.tokens.items() if o == owner)

    def log_tail(self, n: int = 3000) -> str:
        return Path(self.log.name).read_text(errors="replace")[-n:]

    def close(self) -> None:
        """Stop the daemon, then `enorm down` (terminates what is left, data merged back,
        removes chains, store and bridge)."""
        if self.proc is None:
            return
        _stop(self.proc, timeout=30)
        self.proc = None
        r = self._cli("down", timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"enorm down failed: {r.stdout}{r.stderr}")


def _env_value(v: Any) -> str:
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v)
    return str(v)


class CloudServer:
    """The cloud game server (plus any blueprints) served by werkzeug in a thread."""

    def __init__(self, app, host: str = "0.0.0.0", port: int | None = None):
        self.port = port or free_port(host)
        self.app = app
        self._http = make_server(host, self.port, app, threaded=True)
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True,
                                        name="cloud-server")
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._http.shutdown()
        self._thread.join(5)
