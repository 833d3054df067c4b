"""The deployer's port forward (cloud_manager/tunnel.py) over a real SSH connection: a
paramiko server on loopback whose direct-tcpip channels echo what they get, reached
through a relay that the test can freeze (the link gone quiet, as when a container
ends under an open forward)."""

from __future__ import annotations

import select
import socket
import threading

import paramiko
import pytest

from cloud_manager.tunnel import Forward


class _Server(paramiko.ServerInterface):
    def get_allowed_auths(self, username: str) -> str:
        return "none"

    def check_auth_none(self, username: str) -> int:
        return paramiko.AUTH_SUCCESSFUL

    def check_channel_request(self, kind: str, chanid: int) -> int:
        return paramiko.OPEN_SUCCEEDED

    def check_channel_direct_tcpip_request(self, chanid: int, origin: tuple,
                                           destination: tuple) -> int:  # fmt: skip
        return paramiko.OPEN_SUCCEEDED


def _echo(chan: paramiko.Channel) -> None:
    while data := chan.recv(4096):
        chan.sendall(data)
    chan.close()


class _Relay:
    """TCP between the client and the SSH server, until `freeze`: then it passes nothing
    more either way and closes nothing, so the client's transport stays up, reading."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.upstream = upstream
        self.frozen = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        a, _ = self.listener.accept()
        b = socket.create_connection(self.upstream)
        self.held = peer = {a: b, b: a}  # kept open once frozen
        try:
            while not self.frozen.is_set():
                ready, _, _ = select.select([a, b], [], [], 0.05)
                for s in ready:
                    if self.frozen.is_set() or not (data := s.recv(65536)):
                        return
                    peer[s].sendall(data)
        except (OSError, ValueError):  # closed under it at the end of the test
            return


@pytest.fixture
def link():
    """(client transport, relay): authenticated to an echoing SSH server on 127.0.0.1."""
    listener = socket.create_server(("127.0.0.1", 0))
    key = paramiko.RSAKey.generate(1024)
    servers: list[paramiko.Transport] = []

    def serve() -> None:
        conn, _ = listener.accept()
        server = paramiko.Transport(conn)
        servers.append(server)
        server.add_server_key(key)
        server.start_server(server=_Server())
        while (chan := server.accept(30)) is not None:
            threading.Thread(target=_echo, args=(chan,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    relay = _Relay(listener.getsockname())
    client = paramiko.Transport(socket.create_connection(relay.listener.getsockname()))
    client.connect()
    client.auth_none("enorm")
    yield client, relay
    client.close()
    for server in servers:
        server.close()
    for s in getattr(relay, "held", {}):
        s.close()
    relay.listener.close()
    listener.close()


def test_a_forward_carries_bytes_both_ways(link):
    transport, _ = link
    with Forward(transport, "127.0.0.1", 6379) as fwd:
        with socket.create_connection(fwd.address, timeout=5) as s:
            s.sendall(b"PING\r\n")
            assert s.recv(64) == b"PING\r\n"


def test_a_connection_whose_ssh_link_died_ends_quietly(link, monkeypatch):
    """The SSH link can no longer be written when the app's connection closes (bench.mobility
    met it as a container ended): closing the channel raised EOFError out of the pump's
    thread, a traceback on the app's stderr."""
    transport, relay = link
    escaped: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda a: escaped.append(a.exc_value))
    fwd = Forward(transport, "127.0.0.1", 6379)
    with socket.create_connection(fwd.address, timeout=5) as s:
        s.sendall(b"x")
        assert s.recv(8) == b"x"
        relay.frozen.set()
        transport.sock.shutdown(socket.SHUT_WR)  # writes on the link now fail
    assert transport.is_active()
    for t in threading.enumerate():
        if t.name == f"forward-{fwd.local_port}-pump":
            t.join(5)
    fwd.close()
    assert escaped == []
    assert fwd._conns == set()
