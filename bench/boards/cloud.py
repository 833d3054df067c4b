"""The cloud tier of a board run, on the host: Redis, the game server with the cloud
manager's callback, the cloud manager over the board's node, and the game's users.

The host's services listen on 127.0.0.1 only. The board reaches them at `HOST_ALIAS`
through its VM's `guestfwd` entries (the node's merge into the cloud Redis, its events to
the callback, the edge server's pushes to the game server); so the setup requests name
them there, while the cloud manager itself uses 127.0.0.1.
"""

from __future__ import annotations

import logging
import time

from bench.boards.vm import HOST_ALIAS
from cloud_manager import CloudManager, Deployer, EdgeClient
from enorm import datasync
from enorm.protocol import DataSink, User
from games.local import CloudServer, LocalRedis
from games.pokemon import cloud as game_cloud
from games.pokemon import keys
from games.pokemon.app import app as pokemon_app
from games.pokemon.client import GameClient

OWNER = "board-cloud"
LONDON, PARIS = (51.5072, -0.1276), (48.8566, 2.3522)


class Cloud:
    """Everything of the cloud side of one board run; `close` stops it all."""

    def __init__(self, node_url: str, node_name: str, token: str, *, redis_port: int,
                 http_port: int, objective_ms: float = 50.0) -> None:
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self.redis = LocalRedis(redis_port)
        self.server: CloudServer | None = None
        self.manager: CloudManager | None = None
        try:
            self.client = datasync.connect(self.redis.url)
            self.url = f"http://127.0.0.1:{http_port}"
            app = game_cloud.create_app(self.client, public_url=self.url)
            guest_url = f"http://{HOST_ALIAS}:{http_port}"
            self.manager = CloudManager(
                [EdgeClient(node_url, token, name=node_name, setup_timeout=300,
                            terminate_timeout=300)],
                pokemon_app(self.client, cloud_url=guest_url, push_interval=0.5),
                cloud_redis=self.client,
                sink=DataSink(url=f"redis://{HOST_ALIAS}:{redis_port}/0",
                              shared_patterns=keys.SHARED_PATTERNS),
                callback_url=f"{guest_url}/edge-events",
                latency_objective_ms=objective_ms, ready_timeout=180,
                # a new container's sshd on a TCG board beside another board's reboot
                # did not answer in the default 20 s (session 8's side-by-side run)
                deployer=Deployer(connect_timeout=120))
            app.register_blueprint(self.manager.blueprint())
            self.server = CloudServer(app, host="127.0.0.1", port=http_port)
        except BaseException:
            self.close()
            raise

    def users(self, n: int) -> list[GameClient]:
        out = []
        for i in range(n):
            c = GameClient(self.url, "board", f"player{i}", name=f"p{i}", timeout=30)
            c.login()
            out.append(c)
        return out

    def redirections(self) -> dict:
        return game_cloud.Redirections(self.client).all()

    def close(self) -> None:
        if self.manager is not None:
            self.manager.close()
        if self.server is not None:
            self.server.close()
        self.redis.close()


def as_users(clients: list[GameClient]) -> list[User]:
    """The players as the cloud manager's users: on the host, so loopback."""
    return [User(id=c.user, address="127.0.0.1") for c in clients]


def play(c: GameClient, where: tuple[float, float], catches: int = 1) -> int:
    """A user's round of the game (move, look, catch, profile); requests made."""
    n = 0
    c.update(*where)
    wild = c.wild()["wild"]
    n += 2
    for w in wild[:catches]:
        for _ in range(3):
            r = c.request("POST", "/pm", json={"spawn": w["spawn"]})
            n += 1
            if r.status_code != 200 or r.json().get("caught"):
                break
    c.me()
    c.party()
    return n + 2


def user_keys(client: datasync.Client, users: list[str]) -> dict:
    """key -> (type, value) of the users' keys (what the merge must bring home)."""
    return datasync.read_typed(client, datasync.user_keys(client, users), "source")


def wait_until(check, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(interval)
