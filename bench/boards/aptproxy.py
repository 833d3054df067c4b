"""apt-cacher-ng on 127.0.0.1: the VMs' only way to Debian packages.

The lab starts its own instance (own configuration, cache under
/var/cache/enorm/boards/apt-cacher-ng, so that a rerun downloads nothing again), bound to
127.0.0.1 on a free port, and stops it by its pid. A VM reaches it through a `guestfwd`
of its restricted user-mode network; the host's debootstrap of the VM disks goes through
it too (`http_proxy`), so the packages the disks and the playbook need are fetched once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from enorm.network import wait_tcp

CACHE = Path("/var/cache/enorm/boards/apt-cacher-ng")


class AptProxy:
    """One apt-cacher-ng process of this lab run."""

    def __init__(self, port: int, cache: Path = CACHE) -> None:
        self.port = port
        self.cache = cache
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> str:
        c = self.cache
        return "\n".join([
            f"CacheDir: {c}/cache",
            f"LogDir: {c}/log",
            "SupportDir: /usr/lib/apt-cacher-ng",
            f"Port: {self.port}",
            "BindAddress: 127.0.0.1",
            f"SocketPath: {c}/run/socket",
            f"PidFile: {c}/run/pid",
            "ForeGround: 1",
            "ExThreshold: 4",
            # The package files never change under one name: keep them, however old
            # the index that named them.
            "ExStartTradeOff: 0",
            "",
        ])

    def start(self) -> None:
        for d in ("conf", "cache", "log", "run"):
            (self.cache / d).mkdir(parents=True, exist_ok=True)
        (self.cache / "conf/acng.conf").write_text(self.config())
        # A socket left by an earlier run of ours (its own directory) makes it refuse.
        for f in ("socket", "pid"):
            (self.cache / "run" / f).unlink(missing_ok=True)
        log = open(self.cache / "log/enorm-board-stdout.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            ["apt-cacher-ng", "-c", str(self.cache / "conf")],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        log.close()
        try:
            wait_tcp("127.0.0.1", self.port, 15)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"apt-cacher-ng did not listen on 127.0.0.1:{self.port} "
                               f"(see {self.cache}/log)") from None

    def stop(self) -> None:
        """Stop the process this object started (by its pid), nothing else."""
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()

    def __enter__(self) -> AptProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
