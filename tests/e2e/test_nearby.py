"""The second app, Nearby (games/nearby), through the whole cycle on real parts: its cloud
server embeds the cloud manager with a Redis client that decodes replies, a real edge node
runs its waitress edge server (which writes no request log), users play with adds,
changes and deletes of every Redis type, per user and shared, while the cloud writes to
the same shared board; at withdrawal the cloud holds each served user's final state key
by key, TTLs included, and the shared keys by their merge rules. Also: the node's own
activity measure keeps a used server that writes no log, `enorm-cloud` drives Nearby from
a config file, and the errors a developer meets name their cause."""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import redis
import requests
from nodes import VENV_BIN, EdgeNode
from werkzeug.serving import make_server

from cloud_manager import (
    CloudManager,
    DeployError,
    Deployment,
    DestinationNotAllowed,
    EdgeClient,
    Unauthorized,
    User,
)
from enorm import datasync
from enorm.datasync.redis_types import STREAM_MARK
from enorm.protocol import DataSink
from games.nearby import cloud as nearby_cloud
from games.nearby import keys
from games.nearby.app import app as nearby_app
from games.nearby.client import NearbyClient

pytestmark = [pytest.mark.system, pytest.mark.timeout(300)]

LONDON = (51.5072, -0.1276)
UNIONS = (b"set", b"zset", b"list", b"stream")
PARIS = (48.8566, 2.3522)


@dataclass
class World:
    url: str
    redis: redis.Redis  # the app's client: decode_responses=True
    manager: CloudManager
    http: object

    def client(self, user: str) -> NearbyClient:
        return NearbyClient(self.url, user).login()


@contextlib.contextmanager
def nearby_world(redis_url: str, node: EdgeNode, token: str | None = None,
                 callback: bool = True) -> Iterator[World]:  # fmt: skip
    """Nearby's cloud server on a real port, its cloud manager over `node`."""
    app_client = redis.Redis.from_url(redis_url, decode_responses=True)  # as Flask apps do
    port = node.cloud_port
    url = f"http://127.0.0.1:{port}"
    token = token or next(t for t, o in node.tokens.items() if o == "cloud-a")
    manager = CloudManager([EdgeClient(node.url, token, name=node.name)], nearby_app(app_client),
                           cloud_redis=app_client, sink=DataSink(url=redis_url),
                           callback_url=f"{url}/edge-events" if callback else None)
    http = make_server("0.0.0.0", port, nearby_cloud.create_app(app_client, public_url=url,
                                                                manager=manager),
                       threaded=True)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    try:
        yield World(url, app_client, manager, http)
    finally:
        http.shutdown()
        thread.join(5)
        manager.close()


def state(client, ks) -> dict[bytes, tuple]:
    """key -> (type, value, PTTL in ms) of the keys that exist."""
    values = datasync.read_typed(client, list(ks), "source")
    pipe = client.pipeline(transaction=False)
    for k in values:
        pipe.pttl(k)
    return {k: (*v, ttl) for (k, v), ttl in zip(values.items(), pipe.execute(), strict=True)}


def user_keys_of(client, users) -> list[bytes]:
    return datasync.user_keys(client, users)


def shared_keys_of(client) -> list[bytes]:
    return [k for p in keys.SHARED_PATTERNS for k in datasync.scan(client, p)]


def assert_same_ttl(cloud_ttl: int, edge_ttl: int, elapsed_ms: float, key) -> None:
    if edge_ttl < 0:
        assert cloud_ttl == edge_ttl, key
    else:
        assert edge_ttl - elapsed_ms - 2000 <= cloud_ttl <= edge_ttl, (key, cloud_ttl, edge_ttl)


def test_nearby_offload_play_every_type_and_withdraw(edge_node, redis_server):
    nearby_cycle(edge_node(), redis_server().url)


def nearby_cycle(node: EdgeNode, redis_url: str, ready_timeout: float | None = None,
                 on_edge: Callable[[Deployment], None] | None = None) -> None:
    """Offload three users, play every type on the edge while the cloud writes a shared
    board, withdraw, and check the cloud key by key (`on_edge(dep)`: a look at the edge
    server after the offload)."""
    with nearby_world(redis_url, node) as world:
        if ready_timeout is not None:
            world.manager.ready_timeout = ready_timeout
        ann, bob, cat, dan = (world.client(u) for u in ("ann", "bob", "cat", "dan"))
        for c, (lat, lng) in zip((ann, bob, cat), ((51.5072, -0.1276), (51.5080, -0.1280),
                                                   (51.5101, -0.1300)), strict=True):
            c.move(lat, lng)
            c.post(f"{c.user} was here")
        dan.move(*PARIS)
        ann.call("POST", "/follow/bob")
        bob.call("POST", "/follow/ann")
        bob.call("POST", "/follow/cat")
        cat.call("POST", "/dm/ann", {"text": "hi ann"})
        ann.call("POST", "/dm/bob", {"text": "hi bob"})
        d1 = ann.call("POST", "/drafts", {"text": "to edit"})["id"]
        d2 = ann.call("POST", "/drafts", {"text": "to drop"})["id"]
        first = [m["id"] for m in ann.nearby()]
        ann.call("POST", "/read", {"ids": first})
        bob.call("POST", "/read", {"ids": first[:1]})
        ann.call("POST", "/typing")
        served = ["ann", "bob", "cat"]
        cloud_before = state(world.manager.cloud, user_keys_of(world.manager.cloud, None))
        dan_before = {k: v for k, v in cloud_before.items() if b"{dan}" in k}

        t0 = time.perf_counter()
        dep = world.manager.offload([User(id=u, address="127.0.0.1") for u in served])
        offload_s = time.perf_counter() - t0
        assert dep.copy.verified and dep.copy.shared > 0
        assert dep.copy.keys == len([k for k in cloud_before if b"{dan}" not in k])
        assert world.redis.hgetall(keys.ROUTE) == dict.fromkeys(served, dep.url)
        if on_edge is not None:
            on_edge(dep)

        # -- on the edge: adds, changes and deletes of every type, per user and shared
        for c in (ann, bob, cat):
            assert c.where() == dep.url
        e1 = ann.post("from the edge, first")  # board (stream), cells (zset), card
        # (hash), latest (string, TTL), recent (list); ann's typing (string) deleted
        bob.move(51.5085, -0.1285)  # profile (hash); here (set) and trail (list)
        cat.move(51.5300, -0.1500)  # another cell: here sets change, trail grows
        cat.post("cat, in another cell")
        ann.call("POST", "/drafts", {"text": "edited on the edge", "id": d1})
        ann.call("DELETE", f"/drafts/{d2}")  # a hash of the family deleted
        d3 = bob.call("POST", "/drafts", {"text": "new on the edge"})["id"]
        ann.call("DELETE", "/follow/bob")  # ann's follows (set) emptied: deleted
        bob.call("DELETE", "/follow/cat")
        ann.call("POST", "/unread", {"ids": first})  # ann's seen (zset) emptied: deleted
        bob.call("POST", "/read", {"ids": [e1]})
        inbox = ann.call("GET", "/inbox")["messages"]
        ann.call("POST", "/inbox/ack", {"ids": [m["id"] for m in inbox]})  # XDEL: empty
        bob.call("DELETE", "/inbox")  # bob's inbox (stream) deleted
        ann.call("POST", "/dm/cat", {"text": "hello cat, from the edge"})  # a new stream
        cat.call("DELETE", "/trail")  # cat's trail (list) deleted
        bob.call("POST", "/typing")  # a new string with a 30 s TTL
        # The cloud writes the same board meanwhile (a Paris user who came to London).
        time.sleep(0.02)
        dan.move(*LONDON)
        c1 = dan.post("from the cloud, during the offload")
        time.sleep(0.02)
        e2 = ann.post("from the edge, after the cloud's")
        cat.call("POST", "/logout")  # cat's session (string) deleted, here set too

        edge = datasync.connect(dep.redis_forward())
        try:
            final_users = state(edge, user_keys_of(edge, served))
            final_shared = state(edge, shared_keys_of(edge))
        finally:
            edge.close()
        cloud_shared_before = state(world.manager.cloud, shared_keys_of(world.manager.cloud))
        # ann's typing marker, deleted on the edge, lives 30 s on the cloud: where the
        # offload took longer (an emulated 32-bit ARM container), it expired there by
        # itself and the merge has nothing to delete.
        typing_ms = world.manager.cloud.pttl(keys.typing("ann"))
        edge_read_at = time.perf_counter()
        assert final_users[keys.session("ann").encode()][2] > 0  # sessions kept their TTLs

        t0 = time.perf_counter()
        world.manager.withdraw(dep)
        withdraw_s = time.perf_counter() - t0
        elapsed_ms = (time.perf_counter() - edge_read_at) * 1000
        assert dep.state == "withdrawn" and dep.confirmed
        m = dep.merge
        assert m is not None and m.conflicts == 0 and m.not_owned == 0 and m.not_merged == 0
        gone = {keys.typing("ann"), keys.draft("ann", d2), keys.follows("ann"),
                keys.seen("ann"), keys.inbox("bob"), keys.trail("cat"), keys.session("cat")}
        lapsed = {len(gone) - 1} if typing_ms == -2 else {len(gone)}
        if 0 <= typing_ms < 10_000:  # it may lapse during the withdrawal
            lapsed |= {len(gone) - 1}
        assert m.keys_deleted in lapsed, (m.keys_deleted, typing_ms)
        assert m.stream_renumbered == 1 and m.shared_merged > 0 and m.shared_ttls > 0
        assert world.redis.hgetall(keys.ROUTE) == {}

        # -- the cloud holds each served user's final state, key by key, TTLs included
        after = state(world.manager.cloud, user_keys_of(world.manager.cloud, served))
        assert set(after) == set(final_users)
        assert not {k.encode() for k in gone} & set(after)
        for k, (typ, value, ttl) in final_users.items():
            assert after[k][:2] == (typ, value), k
            assert_same_ttl(after[k][2], ttl, elapsed_ms, k)
        assert after[keys.draft("bob", d3).encode()][0] == b"hash"
        # ... and the user who stayed on the cloud is as he made himself there
        dan_now = state(world.manager.cloud, user_keys_of(world.manager.cloud, ["dan"]))
        assert set(dan_now) == set(dan_before)

        # -- the shared keys by their rules
        now = state(world.manager.cloud, shared_keys_of(world.manager.cloud))
        for k, (typ, edge_value, edge_ttl) in final_shared.items():
            cloud_value = cloud_shared_before.get(k, (typ, None, -2))[1]
            assert datasync.rules.contains(typ, now[k][1], edge_value), k
            if k not in cloud_shared_before and edge_ttl > 0:
                assert_same_ttl(now[k][2], edge_ttl, elapsed_ms, k)
            if cloud_value is not None and typ in UNIONS:  # the cloud's elements stay
                assert datasync.rules.contains(typ, now[k][1], cloud_value), k
            if cloud_value is not None and typ == b"hash":  # the edge wins a field both have
                assert now[k][1] == {**cloud_value, **edge_value}, k
        board = [(i, dict(zip(f[::2], f[1::2], strict=True)))
                 for i, f in now[keys.board(keys.cell_of(*LONDON)).encode()][1]]
        mine = [(i, f) for i, f in board if f.get(b"by") == b"ann"]
        # e1 came before the cloud's post: renumbered, its edge ID kept; e2 kept its ID
        assert [f[b"text"] for _, f in mine][-2:] == [b"from the edge, first",
                                                       b"from the edge, after the cloud's"]
        assert mine[-2][1][STREAM_MARK] == e1.encode() and mine[-1][0] == e2.encode()
        assert [i for i, _ in board].index(c1.encode()) < [i for i, _ in board].index(
            mine[-2][0])

        # -- home again: the users play on the cloud with what they did on the edge
        assert ann.where() == world.url
        assert ann.call("GET", "/drafts")["drafts"][d1]["text"] == "edited on the edge"
        assert [m["text"] for m in cat.login().call("GET", "/inbox")["messages"]] == [
            "hello cat, from the edge"]
        print(f"\nnearby cycle: offload {offload_s:.2f} s ({dep.copy.keys} user keys + "
              f"{dep.copy.shared} shared copied), withdraw {withdraw_s:.2f} s: "
              f"{m.model_dump(exclude={'conflict_sample', 'not_owned_sample'})}")


def test_a_server_that_writes_no_log_is_kept_while_used_and_ended_when_idle(edge_node,
                                                                            redis_server):
    """Nearby's edge server writes no request log: the node counts its users' packets
    (kept-alive connections included) and does not end it as idle while they play; once
    they stop, a round idle_after_s after the last one that saw packets ends it (reason
    idle) and the cloud gets the data back."""
    idle_after_s = 6.0
    node = edge_node(idle_after_s=idle_after_s, autoscale_interval_s=3600)
    op = requests.Session()
    op.headers["Authorization"] = f"Bearer {node.settings['operator_token']}"

    def round_() -> dict:
        r = op.post(f"{node.url}/v1/autoscale", timeout=60)
        assert r.status_code == 200, r.text
        return r.json()

    store = redis_server()
    with nearby_world(store.url, node) as world:
        ann = world.client("ann")
        ann.move(*LONDON)
        dep = world.manager.offload([User(id="ann", address="127.0.0.1")])
        assert ann.where() == dep.url
        started, posted, rounds = time.monotonic(), 0, []
        while time.monotonic() - started < 2 * idle_after_s:  # one kept-alive connection
            ann.post(f"message {posted}")
            posted += 1
            time.sleep(0.3)
            if time.monotonic() - started > idle_after_s * (len(rounds) + 1) - 1:
                rounds.append(round_())
        for r in rounds:
            (seen,) = [s for s in r["servers"] if s["id"] == dep.server_id]
            assert seen["idle_for_s"] < 2.0 and seen["computing_ms"] is None, seen
            assert not [a for a in r["plan"] if a["action"] == "Terminate"], r["plan"]
        _, out, _ = dep.session.run("ls /var/log/enorm-app")
        assert "requests.log" not in out.split()  # no log: the packets alone told

        # A round sees packets as they were counted since the round before, so activity
        # is as recent as the round that saw it: the next round finds the last posts,
        # the one after idle_after_s more ends the server.
        (seen,) = [s for s in round_()["servers"] if s["id"] == dep.server_id]
        assert seen["idle_for_s"] < 1.0, seen
        time.sleep(idle_after_s + 0.5)
        r = round_()
        assert [(a["action"], a["server_id"], a["reason"]) for a in r["plan"]] == [
            ("Terminate", dep.server_id, "idle")]
        assert dep.ended.wait(30), "no server.terminated reached the cloud"
        assert dep.state == "terminated" and dep.end_reason == "idle" and dep.confirmed
        assert dep.merge.stream_renumbered == 0 and dep.merge.shared_merged > 0
        board = world.redis.xrange(keys.board(keys.cell_of(*LONDON)))
        assert len(board) == posted
        assert ann.where() == world.url


def test_errors_name_their_cause(edge_node, redis_server):
    """A wrong token, a callback the node's operator does not allow, and an edge server
    that crashes at start: each raises its own error, the crash at once and with the
    tail of the app's log."""
    node = edge_node()
    store = redis_server()
    with nearby_world(store.url, node, token="not-a-token") as world:
        world.client("ann").move(*LONDON)
        with pytest.raises(Unauthorized, match="401") as e:
            world.manager.offload([User(id="ann", address="127.0.0.1")])
        assert e.value.node == node.name
    with nearby_world(store.url, node) as world:
        world.manager.callback_url = "http://10.1.2.3:8000/edge-events"
        with pytest.raises(DestinationNotAllowed, match="callback_url"):
            world.manager.offload([User(id="ann", address="127.0.0.1")])
        world.manager.callback_url = None
        world.manager.app.command = ["python3", "-c", "import games.nearby.nosuch"]
        t0 = time.monotonic()
        with pytest.raises(DeployError) as crash:
            world.manager.offload([User(id="ann", address="127.0.0.1")])
        assert time.monotonic() - t0 < world.manager.ready_timeout / 2
        assert "ModuleNotFoundError" in crash.value.app_log
        assert "exited" in str(crash.value) and "games.nearby.nosuch" in str(crash.value)
        assert world.redis.hgetall(keys.ROUTE) == {}
        assert node.client().get(f"{node.url}/v1/servers", timeout=5).json() == []


def cloud_cli(cfg, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(VENV_BIN / "enorm-cloud"), *args, "-c", str(cfg)],
                          capture_output=True, text=True, timeout=300)


def test_enorm_cloud_drives_nearby_from_a_config_file(edge_node, redis_server, tmp_path):
    node = edge_node()
    store = redis_server()
    token = next(t for t, o in node.tokens.items() if o == "cloud-a")

    def config(name: str, token: str, callback: str) -> str:
        path = tmp_path / name
        path.write_text(f"""
cloud_redis = "{store.url}"
app = "games.nearby.app:app"
callback_url = "{callback}"
[[nodes]]
name = "{node.name}"
url = "{node.url}"
token = "{token}"
""")
        return path

    with nearby_world(store.url, node) as world:
        users = [world.client(u) for u in ("ann", "bob")]
        for u in users:
            u.move(*LONDON)
            u.post(f"{u.user} says hi")
        cfg = config("cloud.toml", token, f"{world.url}/edge-events")
        off = cloud_cli(cfg, "offload", "--json", "ann", "bob")
        assert off.returncode == 0, off.stderr
        dep = json.loads(off.stdout)
        assert dep["keys_copied"] > 0 and users[0].where() == dep["url"]
        users[0].post("on the edge")
        users[1].call("DELETE", "/trail")
        where = json.loads(cloud_cli(cfg, "where", "--json", "bob").stdout)
        assert where["served_by"] == "edge" and where["server_id"] == dep["server_id"]
        out = cloud_cli(cfg, "withdraw", "--json", dep["server_id"])
        assert out.returncode == 0, out.stderr
        done = json.loads(out.stdout)
        assert done["state"] == "withdrawn" and done["confirmed"]
        assert done["merge"]["keys_deleted"] == 1 and done["merge"]["shared_merged"] > 0
        assert users[0].where() == world.url and not world.redis.exists(keys.trail("bob"))
        assert [m["text"] for m in users[1].nearby()][0] == "on the edge"

        # A wrong token is the config's fault, and said so: exit 2 naming the field.
        for args in (["nodes"], ["offload", "ann"]):
            bad = cloud_cli(config("bad.toml", "wrong", f"{world.url}/edge-events"), *args)
            assert bad.returncode == 2, (args, bad.stdout, bad.stderr)
            assert f"nodes.{node.name}.token" in bad.stderr and "401" in bad.stderr
            assert "Traceback" not in bad.stderr and "unreachable" not in bad.stderr
        # A callback the node's operator does not allow: exit 2 naming it.
        bad = cloud_cli(config("far.toml", token, "http://10.1.2.3:8000/x"), "offload", "ann")
        assert bad.returncode == 2 and "destination_not_allowed" in bad.stderr
        assert "callback_url" in bad.stderr
        assert world.redis.hgetall(keys.ROUTE) == {}
