"""The cloud side of the e2e tests: a cloud Redis (single or cluster), the cloud game
server with the cloud manager's callback endpoint on a real HTTP port, game clients."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from nodes import EdgeNode
from werkzeug.serving import make_server

from cloud_manager import CloudManager, EdgeClient
from enorm import datasync
from enorm.protocol import DataSink, User
from games.pokemon import cloud as game_cloud
from games.pokemon import keys
from games.pokemon.app import app as pokemon_app
from games.pokemon.client import GameClient

LONDON = (51.5072, -0.1276)
PARIS = (48.8566, 2.3522)
BERLIN = (52.52, 13.405)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


@dataclass
class Cloud:
    url: str
    port: int
    redis: datasync.Client
    app: object
    manager: CloudManager
    sink_url: str
    cluster: bool
    _http: object = None
    _thread: threading.Thread | None = None
    clients: list[GameClient] = field(default_factory=list)

    def stats(self) -> dict:
        return self.app.extensions["pokemon"]["stats"].snapshot()

    def game_requests(self) -> int:
        by_path = self.stats()["by_path"]
        return sum(n for p, n in by_path.items() if p.split("/<")[0] in
                   ("/u", "/update", "/wpm", "/pm", "/6pm", "/pd"))

    def close(self) -> None:
        self._http.shutdown()
        self._thread.join(5)
        self.manager.close()


@contextlib.contextmanager
def cloud_world(redis_url: str, edges: list[EdgeNode], *, cluster: bool = False,
                sink_url: str | None = None, owner: str = "cloud-a",
                callback: bool = True) -> Iterator[Cloud]:  # fmt: skip
    """The cloud game server on 0.0.0.0:<port> (the containers reach it at their gateway)
    with a CloudManager over `edges` in that order."""
    client = datasync.connect(redis_url, cluster=cluster)
    port = edges[0].cloud_port or free_port()  # the port the nodes' containers may reach
    url = f"http://127.0.0.1:{port}"
    app = game_cloud.create_app(client, public_url=url)
    sink = DataSink(url=sink_url or redis_url, cluster=cluster,
                    shared_patterns=keys.SHARED_PATTERNS)
    edge_clients = [
        EdgeClient(n.url, next(t for t, o in n.tokens.items() if o == owner), name=n.name)
        for n in edges
    ]
    manager = CloudManager(edge_clients, pokemon_app(client, cloud_port=port, push_interval=0.2),
                           cloud_redis=client, sink=sink,
                           callback_url=f"{url}/edge-events" if callback else None)  # fmt: skip
    app.register_blueprint(manager.blueprint())
    http = make_server("0.0.0.0", port, app, threaded=True)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    cloud = Cloud(url, port, client, app, manager, sink.url, cluster, http, thread)
    try:
        yield cloud
    finally:
        cloud.close()


def make_users(cloud: Cloud, n: int) -> list[GameClient]:
    out = []
    for i in range(n):
        c = GameClient(cloud.url, "e2e", f"player{i}", name=f"p{i}")
        c.login()
        out.append(c)
    return out


def as_users(clients: list[GameClient]) -> list[User]:
    """The game's players as the cloud manager's users (on this machine: loopback)."""
    return [User(id=c.user, address="127.0.0.1") for c in clients]


def play(c: GameClient, where: tuple[float, float], catches: int = 2) -> None:
    """Move, look at the wild Pokemon, try to catch some, read the profile."""
    c.update(*where)
    for w in c.wild()["wild"][:catches]:
        for _ in range(4):
            r = c.request("POST", "/pm", json={"spawn": w["spawn"]})
            if r.status_code != 200 or r.json().get("caught"):
                break
    c.me()
    c.party()
    c.pokedex()


def snapshot(client: datasync.Client, users: list[str] | None) -> dict[bytes, tuple]:
    """key -> (type, value) of the users' keys (None: every hash-tagged key)."""
    ks = datasync.user_keys(client, users)
    return datasync.read_typed(client, ks, "source")


def shared(client: datasync.Client) -> dict[bytes, set]:
    out: dict[bytes, set] = {}
    for p in keys.SHARED_PATTERNS:
        for k in datasync.scan(client, p):
            out[k] = set(client.smembers(k))
    return out


class TcpProxy:
    """127.0.0.1:<port> -> 127.0.0.1:<target>, which a test can cut and restore (a sink
    that becomes unreachable and comes back, its data intact behind it)."""

    def __init__(self, target: int):
        self.target = target
        self.port = free_port()
        self._conns: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self.up()

    def up(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port), reuse_port=True)
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def down(self) -> None:
        """Refuse new connections and cut the open ones."""
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        for s in self._conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        self._conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                a, _ = listener.accept()
            except OSError:
                return
            b = socket.create_connection(("127.0.0.1", self.target))
            self._conns += [a, b]
            for x, y in ((a, b), (b, a)):
                threading.Thread(target=self._pipe, args=(x, y), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
