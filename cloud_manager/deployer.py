"""The deployer: puts the partitioned server into an edge container over SSH.

It reaches the container's sshd through the node's access port with the key sent in the
setup request, sends the application's files as one tar stream (the image has python3,
Flask and redis-py, so nothing is installed over a network), starts the server under the
image's supervisor (`enorm-app start -- CMD`) and waits until it answers on its
user-facing host port. The same SSH session carries the port forward to the container's
Redis for the data migration (`Session.forward`).
"""

from __future__ import annotations

import io
import shlex
import socket
import tarfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import TypeVar

import paramiko
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from enorm.protocol import Access

from .tunnel import Forward

T = TypeVar("T")

APP_DIR = "/opt/enorm-app"
SUPERVISOR = "/usr/local/bin/enorm-app"
APP_LOG = "/var/log/enorm-app/app.log"  # the app's stdout and stderr (the supervisor's)
# One line per start of the app (its pid): the supervisor restarts an app that exited,
# so a second line, or a first pid gone, says it exited.
STARTS = "/run/enorm-app.starts"
LOG_TAIL = 4000  # bytes of the app's log a failed deployment carries


class DeployError(Exception):
    """The server could not be deployed (SSH, upload, start, or it never answered).
    `app_log`: the tail of the app's log (its stdout and stderr) when it was read, e.g.
    the traceback of a server that exited at start."""

    def __init__(self, message: str, app_log: str | None = None):
        super().__init__(message)
        self.app_log = app_log

    def add_log(self, tail: str | None) -> None:
        self.app_log = tail
        if tail:
            self.args = (f"{self.args[0]}\n--- the tail of {APP_LOG} ---\n{tail.rstrip()}",)


def new_key() -> tuple[paramiko.PKey, str]:
    """A fresh ed25519 key pair: (paramiko key, OpenSSH public key line)."""
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption()).decode()  # fmt: skip
    public = private.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return paramiko.Ed25519Key.from_private_key(io.StringIO(pem)), public + " enorm-cloud"


def files_of(local_dir: Path, remote_dir: str,
             suffixes: Iterable[str] = (".py",)) -> dict[str, Path]:
    """remote path -> local file for the files under `local_dir` with one of `suffixes`
    (caches and everything else left out)."""
    out: dict[str, Path] = {}
    for path in sorted(local_dir.rglob("*")):
        if path.is_file() and path.suffix in tuple(suffixes) and "__pycache__" not in path.parts:
            out[str(PurePosixPath(remote_dir) / path.relative_to(local_dir).as_posix())] = path
    return out


def _bytes(data: Path | bytes | str) -> bytes:
    if isinstance(data, Path):
        return data.read_bytes()
    return data.encode() if isinstance(data, str) else data


class Session:
    """One SSH connection to one edge server."""

    def __init__(self, client: paramiko.SSHClient, access: Access):
        self.client = client
        self.access = access
        self._forwards: list[Forward] = []

    @property
    def transport(self) -> paramiko.Transport:
        t = self.client.get_transport()
        assert t is not None
        return t

    def _retry(self, open_: Callable[[], T], tries: int = 5) -> T:
        """Open a channel; a fresh container's sshd sometimes refuses the first ones."""
        for i in range(tries):
            try:
                return open_()
            except paramiko.SSHException:
                if i == tries - 1 or not self.transport.is_active():
                    raise
                time.sleep(0.05 * (i + 1))
        raise AssertionError("unreachable")

    def run(self, command: str, timeout: float = 30.0, check: bool = True,
            stdin: bytes | None = None) -> tuple[int, str, str]:  # fmt: skip
        """Run `command` on one exec channel, `stdin` (if any) written to it and closed."""
        inp, out, err = self._retry(lambda: self.client.exec_command(command, timeout=timeout))
        if stdin is not None:
            inp.write(stdin)
            inp.flush()
            inp.channel.shutdown_write()
        rc = out.channel.recv_exit_status()
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
        if check and rc != 0:
            raise DeployError(f"`{command}` exited {rc}: {stderr.strip() or stdout.strip()}")
        return rc, stdout, stderr

    def _install(self, files: Mapping[str, tuple[bytes, int]], then: str) -> None:
        """Write every remote path (parents created) with its mode, then run `then`.
        One exec channel carries a tar stream into `tar -x` and the command: about
        two round trips in all, where SFTP cost three or four per file (over a far
        cloud's 85 ms RTT, 6.8 s for the game's files)."""
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for remote in sorted(files):
                if not PurePosixPath(remote).is_absolute():
                    raise DeployError(f"remote path {remote!r} is not absolute")
                data, mode = files[remote]
                info = tarfile.TarInfo(remote.lstrip("/"))
                info.size, info.mode, info.mtime = len(data), mode, int(time.time())
                tar.addfile(info, io.BytesIO(data))
        cmd = "tar -x -o -f - -C /"  # -o: files owned by root (GNU tar and busybox)
        self.run(f"{cmd} && {{ {then}; }}", stdin=buf.getvalue())

    def start_app(self, command: list[str], env: Mapping[str, str], workdir: str = APP_DIR,
                  files: Mapping[str, Path | bytes | str] | None = None) -> None:  # fmt: skip
        """Start `command` under the image's supervisor (restarted if it exits), with
        `env` from a file only root can read (it holds the Redis password). `files`
        (the application) go in the same round trip."""
        env_file = f"{workdir}/app.env"
        script = "\n".join([
            "#!/bin/sh",
            f"echo $$ >> {STARTS}",  # exec keeps the pid: the app's
            "set -a",
            f". {shlex.quote(env_file)}",
            "set +a",
            f"cd {shlex.quote(workdir)}",
            "exec " + shlex.join(command),
            "",
        ])  # fmt: skip
        body = "".join(f"{k}={shlex.quote(v)}\n" for k, v in env.items())
        self._install({**{r: (_bytes(d), 0o644) for r, d in (files or {}).items()},
                       env_file: (body.encode(), 0o600),
                       f"{workdir}/run.sh": (script.encode(), 0o755)},
                      then=f"{SUPERVISOR} stop; rm -f {STARTS}; "
                           f"{SUPERVISOR} start -- {workdir}/run.sh")

    def stop_app(self) -> None:
        self.run(f"{SUPERVISOR} stop", check=False)

    def app_exited(self) -> bool:
        """The app started by `start_app` has exited since (the supervisor restarts it,
        so a deployment cannot wait for it to come up by itself)."""
        _, out, _ = self.run(f'[ -s {STARTS} ] || exit 0; set -- $(cat {STARTS}); '
                             f'[ $# -gt 1 ] || ! kill -0 "$1" 2>/dev/null && echo exited',
                             timeout=10, check=False)
        return out.strip() == "exited"

    def app_log(self, size: int = LOG_TAIL) -> str | None:
        """The last `size` bytes of the app's log; None if it cannot be read."""
        try:
            rc, out, _ = self.run(f"tail -c {int(size)} {APP_LOG}", timeout=10, check=False)
        except (paramiko.SSHException, OSError, EOFError):
            return None
        return out if rc == 0 else None

    def gateway(self) -> str:
        """The container's default gateway: the edge node's host on its bridge."""
        _, out, _ = self.run("ip -4 route show default")
        parts = out.split()
        if "via" not in parts:
            raise DeployError(f"no default route in the container: {out!r}")
        return parts[parts.index("via") + 1]

    def forward(self, remote_host: str, remote_port: int) -> Forward:
        """A local port on 127.0.0.1 that leads to remote_host:remote_port (container side)."""
        fw = Forward(self.transport, remote_host, remote_port)
        self._forwards.append(fw)
        return fw

    def close(self) -> None:
        for fw in self._forwards:
            fw.close()
        self._forwards.clear()
        self.client.close()


class Deployer:
    """SSH to edge servers with one key pair (its public half goes in setup requests)."""

    def __init__(self, key: paramiko.PKey | None = None, public_key: str | None = None,
                 connect_timeout: float = 20.0):
        if key is None:
            key, public_key = new_key()
        elif public_key is None:
            public_key = f"{key.get_name()} {key.get_base64()}"
        self.key, self.public_key = key, public_key
        # How long `connect` waits for a new server's sshd: longer for a slow edge (an
        # emulated board beside another missed 20 s once).
        self.connect_timeout = connect_timeout

    def connect(self, access: Access, timeout: float | None = None) -> Session:
        """SSH to the access endpoint, retrying while sshd comes up (`connect_timeout`
        unless `timeout` says otherwise)."""
        deadline = time.monotonic() + (self.connect_timeout if timeout is None else timeout)
        while True:
            client = paramiko.SSHClient()
            # The container made its host key at first boot; the access port is the
            # node's, reached over a channel the cloud trusts (token-authenticated API).
            client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
            try:
                client.connect(access.host, port=access.port, username=access.user,
                               pkey=self.key, timeout=5, banner_timeout=5, auth_timeout=5,
                               allow_agent=False, look_for_keys=False)  # fmt: skip
                transport = client.get_transport()
                transport.set_keepalive(15)
                # Redis over the port forward is request/reply: without NODELAY every
                # reply waits for Nagle and a delayed ACK (~40 ms per round trip).
                transport.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                # A session that authenticated can still die at once (sshd restarting
                # in a container that just booted): prove it opens a channel first.
                _, out, _ = client.exec_command("true", timeout=5)
                if out.channel.recv_exit_status() != 0:
                    raise paramiko.SSHException("the session cannot run commands")
                return Session(client, access)
            except (paramiko.SSHException, OSError, EOFError) as exc:
                client.close()
                if time.monotonic() > deadline:
                    raise DeployError(f"no SSH at {access.host}:{access.port}: {exc}") from exc
                time.sleep(0.05)


def wait_http(url: str, timeout: float = 20.0, interval: float = 0.02,
              exited: Callable[[], bool] | None = None, every: float = 0.5) -> float:
    """Poll `url` until it answers 2xx; seconds waited. Raises DeployError on timeout, or
    at once when `exited()` (asked every `every` seconds) says the server's process is
    gone."""
    started = time.monotonic()
    asked = started
    last: object = None
    with requests.Session() as s:
        while True:
            try:
                r = s.get(url, timeout=1)
                if r.ok:
                    return time.monotonic() - started
                last = f"{r.status_code} {r.text[:200]}"
            except (OSError, requests.RequestException) as exc:
                last = exc
            now = time.monotonic()
            if exited is not None and now - asked >= every:
                asked = now
                if exited():
                    raise DeployError(f"the app exited before {url} answered "
                                      f"(after {now - started:.1f} s): {last}")
            if now - started > timeout:
                raise DeployError(f"{url} did not answer within {timeout}s: {last}")
            time.sleep(interval)
