"""A local port forward over an SSH connection (what `ssh -L` does), on paramiko.

The cloud cannot reach a container's address, only the edge node's access port; the
container's Redis (6379 inside) is reached through the SSH session the deployer has
open anyway: a listening socket on 127.0.0.1 whose connections become `direct-tcpip`
channels to the container. One thread accepts, one thread per connection pumps both
directions with select.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import threading
import time

import paramiko

log = logging.getLogger(__name__)

BUFFER = 1 << 17

# What a channel raises once its SSH connection is gone (the container ended, the node
# restarted): a pump ends quietly then, and so does closing the channel.
GONE = (OSError, EOFError, paramiko.SSHException)


class Forward:
    """127.0.0.1:<local_port> -> (remote_host, remote_port) as seen from the SSH server."""

    def __init__(self, transport: paramiko.Transport, remote_host: str, remote_port: int,
                 local_port: int = 0):  # fmt: skip
        self.transport = transport
        self.remote = (remote_host, remote_port)
        self._listener = socket.create_server(("127.0.0.1", local_port), backlog=64)
        self.local_port = self._listener.getsockname()[1]
        self._closed = threading.Event()
        self._conns: set[tuple[socket.socket, paramiko.Channel]] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, daemon=True,
                                        name=f"forward-{self.local_port}")
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        return "127.0.0.1", self.local_port

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                sock, peer = self._listener.accept()
            except OSError:
                return
            chan = self._open(peer)
            if chan is None:
                sock.close()
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._conns.add((sock, chan))
            threading.Thread(target=self._pump, args=(sock, chan), daemon=True,
                             name=f"forward-{self.local_port}-pump").start()

    def _open(self, peer: tuple) -> paramiko.Channel | None:
        for i in range(5):
            try:
                return self.transport.open_channel("direct-tcpip", self.remote, peer, timeout=10)
            except (paramiko.SSHException, OSError) as exc:
                if i == 4 or not self.transport.is_active():
                    log.warning("forward to %s:%s refused: %s", *self.remote, exc)
                    return None
                time.sleep(0.05 * (i + 1))
        return None

    def _pump(self, sock: socket.socket, chan: paramiko.Channel) -> None:
        try:
            while not self._closed.is_set():
                ready, _, _ = select.select([sock, chan], [], [], 0.5)
                if sock in ready:
                    data = sock.recv(BUFFER)
                    if not data:
                        break
                    chan.sendall(data)
                if chan in ready:
                    data = chan.recv(BUFFER)
                    if not data:
                        break
                    sock.sendall(data)
        except GONE:
            pass
        finally:
            with self._lock:
                self._conns.discard((sock, chan))
            with contextlib.suppress(*GONE):
                chan.close()
            sock.close()

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for sock, chan in conns:
            with contextlib.suppress(*GONE):
                chan.close()
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self._thread.join(2)

    def __enter__(self) -> Forward:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
