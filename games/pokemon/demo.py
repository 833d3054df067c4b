"""The game's demo (`make demo`, `enorm-demo`): the whole cycle on this machine, each stage
printed with its time.

An edge node (`enorm serve` on the embedded defaults: node `edge0`, bridge `enorm0`,
10.88.0.0/24, API on 127.0.0.1:8470), a cloud Redis and the cloud game server with the
cloud manager's callback, users created and placed -> handshake + deploy (SSH, data
copied, users redirected) -> the offloaded users play on the edge -> one auto-scaling
round (plan printed) -> termination with the edge data merged back and checked on the
cloud -> clean-up (`enorm down`). It drives the library as any cloud application
server would: the library knows nothing of it.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

import click
import requests

from cloud_manager import CloudManager, EdgeClient
from enorm import config as node_config
from enorm import datasync, output
from enorm.protocol import DataSink, User
from games.local import CloudServer, LocalEdgeNode, LocalRedis, free_port
from games.pokemon import cloud as game_cloud
from games.pokemon import keys
from games.pokemon.app import app as pokemon_app
from games.pokemon.client import GameClient
from games.pokemon.routes import GAME_PATHS

DEMO_TOKEN = "demo-token"
DEMO_OWNER = "demo-cloud"
LONDON = (51.5072, -0.1276)
PARIS = (48.8566, 2.3522)


class Stages:
    """The demo's stages: one whole progress line each, then a table of them all."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float, str]] = []

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[dict]:
        note: dict[str, str] = {}
        output.progress(f"{name} ...")
        t = time.perf_counter()
        try:
            yield note
        except BaseException:
            self.rows.append((name, time.perf_counter() - t, "failed"))
            raise
        dt = time.perf_counter() - t
        self.rows.append((name, dt, note.get("detail", "")))
        output.progress(f"  done in {dt:.2f} s  {note.get('detail', '')}")

    def table(self) -> None:
        output.table("enorm demo: stages", ("stage", "seconds", "detail"),
                     [(n, f"{dt:.2f}", d) for n, dt, d in self.rows])


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@click.command()
@click.option("--users", default=20, show_default=True, help="users created on the cloud")
@click.option("--offload", "n_offload", default=10, show_default=True,
              help="users offloaded to the edge")
@click.option("--objective-ms", default=50.0, show_default=True,
              help="the game server's latency objective")
def main(users: int, n_offload: int, objective_ms: float) -> None:
    """Run the whole provisioning cycle locally, printing each stage with its time."""
    if n_offload > users:
        raise click.BadParameter("cannot offload more users than there are", param_hint="--offload")
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, _sigterm)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    stages = Stages()
    ok = False
    with contextlib.ExitStack() as stack:
        try:
            _demo(stack, stages, users, n_offload, objective_ms)
            ok = True
        except KeyboardInterrupt:
            output.progress("interrupted: cleaning up")
        except Exception as exc:  # noqa: BLE001 (reported, then cleaned up)
            output.progress(f"failed: {type(exc).__name__}: {exc}")
        finally:
            with stages("clean up"):
                stack.close()
    stages.table()
    sys.exit(0 if ok else 1)


def _demo(stack: contextlib.ExitStack, stages: Stages, n_users: int, n_offload: int,
          objective_ms: float) -> None:  # fmt: skip
    with stages("edge node up") as note:
        # The containers reach the cloud game server (on this machine) at their gateway,
        # and nothing else on the host: the node allows that one port.
        port = free_port("0.0.0.0")
        gateway = node_config.load(None).gateway
        node = LocalEdgeNode(tokens={DEMO_TOKEN: DEMO_OWNER}, basic_service="reserve",
                             container_egress=[f"{gateway}/32:{port}"])
        stack.callback(node.close)
        node.start()
        offer = EdgeClient(node.url, DEMO_TOKEN, name=node.config.name).offer()
        note["detail"] = (f"{offer.name} at {node.url}: free {offer.free.cores:g} cores / "
                          f"{offer.free.memory_mb} MB, unit {offer.unit.cores:g} core / "
                          f"{offer.unit.memory_mb} MB")

    with stages("cloud up") as note:
        store = LocalRedis()
        stack.callback(store.close)
        cloud_redis = datasync.connect(store.url)
        url = f"http://127.0.0.1:{port}"
        app = game_cloud.create_app(cloud_redis, public_url=url)
        manager = CloudManager(
            [EdgeClient(node.url, DEMO_TOKEN, name=node.config.name)],
            pokemon_app(cloud_redis, cloud_port=port, push_interval=0.5),
            cloud_redis=cloud_redis,
            sink=DataSink(url=store.url, shared_patterns=keys.SHARED_PATTERNS),
            callback_url=f"{url}/edge-events",
            latency_objective_ms=objective_ms,
        )
        stack.callback(manager.close)
        app.register_blueprint(manager.blueprint())
        server = CloudServer(app, port=port)
        stack.callback(server.close)
        note["detail"] = f"game server {url}, Redis {store.url}"

    with stages("create users") as note:
        clients = []
        for i in range(n_users):
            c = GameClient(url, "demo", f"player{i}", name=f"player{i}")
            c.login()
            c.update(*LONDON)
            clients.append(c)
        note["detail"] = f"{n_users} users on the cloud, each at a location"

    offloaded = clients[:n_offload]
    with stages("handshake + deploy") as note:
        dep = manager.offload([User(id=c.user, address="127.0.0.1") for c in offloaded])
        t = dep.timings
        note["detail"] = (
            f"server {dep.server_id} on {dep.edge.name}, users at {dep.url}; "
            f"handshake {t['handshake']:.2f}, ssh {t['ssh']:.2f}, data {t['data']:.2f} "
            f"({dep.copy.keys} keys), upload+start {t['upload_start']:.2f}, "
            f"ready {t['ready']:.2f}, redirect {t['redirect']:.3f} s")

    with stages("play") as note:
        before = _cloud_game_requests(app)
        for c in offloaded:
            c.refresh()
            c.update(*PARIS)
            for w in c.wild()["wild"][:2]:
                c.request("POST", "/pm", json={"spawn": w["spawn"]})
            c.me()
            c.party()
        seen = requests.get(dep.url + "/stats", timeout=5).json()
        on_edge = sum(1 for c in offloaded if c.server == dep.url)
        note["detail"] = (f"{on_edge}/{len(offloaded)} offloaded users played on the edge: "
                          f"{seen['requests']} requests there, "
                          f"{_cloud_game_requests(app) - before} game requests at the cloud")
        if on_edge != len(offloaded) or _cloud_game_requests(app) != before:
            raise RuntimeError("offloaded users did not play on the edge")

    with stages("auto-scale (one round)") as note:
        op = requests.Session()
        op.headers["Authorization"] = f"Bearer {node.operator_token()}"
        r = op.post(node.url + "/v1/autoscale", timeout=600)
        r.raise_for_status()
        round_ = r.json()
        for s in round_.get("servers", []):
            lat = s.get("latency_ms")
            output.progress(f"  server {s['id']}: latency "
                            f"{'n/a' if lat is None else f'{lat:.1f}'} ms, objective "
                            f"{s['objective_ms']:g} ms, users {s['users']}, limits "
                            f"{s['limits']['cores']:g} cores / {s['limits']['memory_mb']} MB")
        plan = round_.get("plan", [])
        for a in plan:
            output.progress(f"  plan: {a}")
        note["detail"] = ("plan: " + ", ".join(a["action"] for a in plan)) if plan \
            else "plan: nothing to do (latency within objective)"
        if round_.get("error"):
            note["detail"] += f" (error: {round_['error']})"

    with stages("terminate + merge back") as note:
        edge_keys: dict = {}
        if not dep.ended.is_set():
            edge = datasync.connect(dep.redis_forward())
            try:
                edge_keys = datasync.read_typed(edge, datasync.user_keys(edge), "source")
            finally:
                edge.close()
            manager.withdraw(dep)
        else:  # the auto-scaler terminated it; the event brought the users home
            output.progress(f"  the edge terminated {dep.server_id} itself ({dep.end_reason})")
        if dep.state == "migration_pending":
            raise RuntimeError("the data could not be merged back (kept on the edge)")
        cloud_now = datasync.read_typed(cloud_redis, list(edge_keys), "destination")
        same = sum(1 for k, v in edge_keys.items() if cloud_now.get(k) == v)
        back = sum(1 for c in offloaded if c.refresh() == url)
        note["detail"] = (f"{dep.keys_migrated} keys merged back, {same}/{len(edge_keys)} "
                          f"edge keys equal on the cloud, data confirmed: {dep.confirmed}, "
                          f"{back}/{len(offloaded)} users back on the cloud")
        if same != len(edge_keys) or not dep.confirmed or back != len(offloaded):
            raise RuntimeError("data or users did not come back")


def _cloud_game_requests(app) -> int:
    by_path = app.extensions["pokemon"]["stats"].snapshot()["by_path"]
    return sum(n for p, n in by_path.items() if p.split("/<")[0] in GAME_PATHS)




if __name__ == "__main__":
    main()
