"""The cloud manager's client against a real socket that resets a kept-alive connection
when it is used again (a node restarted behind a proxy that held the connection open)."""

from __future__ import annotations

import socket
import struct
import threading

import pytest

from cloud_manager.edge_client import EdgeClient, EdgeError

ANSWER = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
          b"Connection: keep-alive\r\n\r\n[]")


class ResettingServer:
    """Answers every request, except that a connection's second request is answered by a
    reset (RST, SO_LINGER 0); counts the requests it received."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.requests: list[bytes] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            for n in range(2):
                data = conn.recv(65536)
                if not data:
                    return
                self.requests.append(data.split(b" ", 1)[0])
                if n == 1:
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    struct.pack("ii", 1, 0))
                    return
                conn.sendall(ANSWER)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def server():
    s = ResettingServer()
    yield s
    s.close()


def test_a_get_on_a_reset_kept_alive_connection_is_sent_again(server):
    client = EdgeClient(server.url, "t", timeout=5)
    assert client.events() == []
    assert client.events() == []  # the pooled connection is reset: sent again, answered
    assert server.requests == [b"GET"] * 3


def test_a_delete_is_sent_again_and_a_post_is_not(server):
    client = EdgeClient(server.url, "t", timeout=5)
    assert client.events() == []
    # reset on the first connection, answered on a new one
    assert client._call("DELETE", "/v1/servers/x", 5).status_code == 200
    assert client.events() == []  # reset on the second, answered on a third
    with pytest.raises(EdgeError, match="POST"):  # reset on the third: not sent again
        client._call("POST", "/v1/servers", 5, json={})
    assert server.requests == [b"GET", b"DELETE", b"DELETE", b"GET", b"GET", b"POST"]
