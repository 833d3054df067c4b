"""Users moving between edge nodes on real parts: the fence that keeps a terminating
server's late writes from being lost, the start-first handover between two nodes with a
user playing through it (node to node, and through the cloud where the old node may not
reach the new one), a handover the old node does not answer, and users re-homed on
another node after an eviction."""

from __future__ import annotations

import subprocess
import threading
import time

import pytest
import requests
from nodes import eventually
from world import LONDON, PARIS, as_users, cloud_world, make_users, play

from cloud_manager import EdgeError, HandoverFailed
from enorm import datasync
from games.pokemon import keys

pytestmark = [pytest.mark.system, pytest.mark.timeout(240)]


class Writer(threading.Thread):
    """A user's client moving north step by step as fast as it can: `acked` is the last
    latitude a server confirmed. With `pinned` it talks to that server only (no
    redirection followed), so that a write the server takes after its data was read
    would be seen. `unsure` is the write whose request failed after the last confirmed
    one: its server may have taken it before the failure (the client would retry it)."""

    def __init__(self, client, pinned: str | None = None):
        super().__init__(daemon=True)
        self.c, self.pinned = client, pinned
        self.acked: float | None = None
        self.unsure: float | None = None
        self.errors: list[str] = []
        self.by_server: dict[str, int] = {}
        self.halt = threading.Event()

    def run(self) -> None:
        step, s = 0, requests.Session()
        headers = {"X-User": self.c.user, "X-Token": self.c.token}
        while not self.halt.is_set():
            step += 1
            lat = round(LONDON[0] + step * 1e-5, 6)
            try:
                if self.pinned:
                    r = s.post(self.pinned + "/update", json={"lat": lat, "lng": LONDON[1]},
                               headers=headers, timeout=10)
                    r.raise_for_status()
                    server = self.pinned
                else:
                    self.c.update(lat, LONDON[1])
                    server = self.c.server
            except Exception as exc:  # noqa: BLE001 (counted)
                self.errors.append(type(exc).__name__)
                self.unsure = lat if self.unsure is None else self.unsure
                if self.pinned:
                    time.sleep(0.01)
                continue
            self.acked, self.unsure = lat, None
            self.by_server[server] = self.by_server.get(server, 0) + 1

    def stop(self) -> None:
        self.halt.set()
        self.join(15)


def cloud_lat(cloud, user: str) -> float:
    return float(cloud.redis.hget(keys.location(user), "lat"))


def fences(node) -> list[str]:
    out = subprocess.run(["iptables", "-S"], capture_output=True, text=True).stdout
    return [ln for ln in out.splitlines() if f"ENORM-{node.name.upper()}-Z" in ln
            and "REJECT" in ln]


def gone(node, sid: str, timeout: float = 30) -> None:
    """Wait until `node` has ended server `sid` (a direct handover ends the old server
    after the switch, in the background)."""
    deadline = time.monotonic() + timeout
    while sid in {s["id"] for s in node.client().get(node.url + "/v1/servers", timeout=5).json()}:
        assert time.monotonic() < deadline, f"{sid} still on {node.name}"
        time.sleep(0.05)


def test_a_terminating_server_takes_no_write_after_its_data_is_read(edge_node, redis_server):
    """A client keeps writing to its edge server while the cloud withdraws it: every write
    the edge confirmed is on the cloud afterwards (the node fences the server's port
    before its merge: the client's connection is reset, not served by a server whose data
    is gone)."""
    node = edge_node()
    with cloud_world(redis_server().url, [node]) as cloud:
        (user,) = make_users(cloud, 1)
        user.update(*LONDON)
        dep = cloud.manager.offload(as_users([user]))
        w = Writer(user, pinned=dep.url)
        w.start()
        while w.by_server.get(dep.url, 0) < 20:
            time.sleep(0.01)
        cloud.manager.withdraw(dep)
        time.sleep(0.3)  # the writer meets the fence (or the gone server) meanwhile
        w.stop()
        assert dep.state == "withdrawn" and dep.confirmed
        assert w.errors, "the writer was never refused"
        # the last confirmed write, or the one in flight when the fence came
        assert cloud_lat(cloud, user.user) in (w.acked, w.unsure)
        assert eventually(lambda: fences(node) == [])  # lifted in the release


@pytest.mark.parametrize("path", ["direct", "cloud"])
def test_handover_moves_playing_users_to_another_node_start_first(edge_node, redis_server,
                                                                   path):  # fmt: skip
    """direct: the data goes node to node and the users wait for it, never served by
    the cloud (whose copy is stale then); cloud: the cloud serves them while the data
    goes edge -> cloud -> edge."""
    a, b = edge_node(), edge_node()
    with cloud_world(redis_server().url, [a, b]) as cloud:
        cloud.manager.handover_path = path
        users = make_users(cloud, 3)
        for u in users:
            play(u, LONDON)
        old = cloud.manager.offload(as_users(users))
        assert old.edge.name == a.name
        for u in users[1:]:
            u.refresh()
            play(u, PARIS)
        caught = {u.user: len(u.party()) for u in users[1:]}
        w = Writer(users[0])  # follows the redirection, as a game client does
        w.start()
        while w.by_server.get(old.url, 0) < 20:
            time.sleep(0.01)
        new = cloud.manager.handover(old)
        while w.by_server.get(new.url, 0) < 20:
            time.sleep(0.01)
        w.stop()
        # the new server on the other node; the old one ended with its data merged
        assert new.edge.name == b.name and new.handed_over_from == old.server_id
        assert old.state == "handed_over" and old.confirmed and old.ended.is_set()
        gone(a, old.server_id)
        assert 0 < new.timings["interruption"] < new.timings["total"]
        assert new.handover_path == path
        # the playing user saw no error: served by the old edge, (the cloud,) the new edge
        via = {old.url, new.url} if path == "direct" else {old.url, cloud.url, new.url}
        assert w.errors == [] and set(w.by_server) == via
        for u in users[1:]:
            assert u.refresh() == new.url
            assert len(u.party()) == caught[u.user]  # what they caught on A, on B now
        cloud.manager.withdraw(new)
        assert new.confirmed and cloud_lat(cloud, users[0].user) == w.acked  # no error
        assert eventually(lambda: fences(a) == [] and fences(b) == [])  # lifted in the release
        with pytest.raises(ValueError, match="nothing to hand over"):
            cloud.manager.handover(new)  # ended


def test_users_of_an_evicted_server_are_rehomed_on_another_node(edge_node, redis_server):
    """A node that ends a server to admit a higher priority one (preemption) sends its
    users home; with `rehome` the cloud manager offloads them to another node."""
    a = edge_node(cores=0.25, memory_mb=256, admission="preempt")
    b = edge_node()
    with cloud_world(redis_server().url, [a, b]) as cloud:
        cloud.manager.rehome = True
        users = make_users(cloud, 4)
        for u in users:
            play(u, LONDON)
        low = cloud.manager.offload(as_users(users[:2]), priority=2)
        high = cloud.manager.offload(as_users(users[2:]), priority=8)
        assert low.edge.name == high.edge.name == a.name
        assert low.ended.wait(30) and low.end_reason == "preempted" and low.confirmed
        deadline = time.monotonic() + 60
        while low.server_id not in cloud.manager.rehomed:
            assert time.monotonic() < deadline, "the users were not re-homed"
            time.sleep(0.1)
        again = cloud.manager.rehomed[low.server_id]
        assert again.edge.name == b.name, again
        caught = {u.user: len(u.party()) for u in users[:2]}
        for u in users[:2]:
            assert u.refresh() == again.url
            assert len(u.party()) == caught[u.user]  # their data came along
            play(u, PARIS)
        for dep in (again, high):
            cloud.manager.withdraw(dep)
            assert dep.confirmed


def test_direct_handover_data_goes_node_to_node_and_the_cloud_learns_it_once(edge_node,
                                                                           redis_server):
    """What the old server's tenant wrote: its users' keys (one made, one deleted) go to
    the new server and reach the cloud only with the new server's merge (its inherited
    manifest deletes on the cloud what the old one deleted); a key of a user it did not
    serve goes nowhere; its shared keys reach the cloud with the old server's end."""
    a, b = edge_node(), edge_node()
    with cloud_world(redis_server().url, [a, b]) as cloud:
        users = make_users(cloud, 3)
        for u in users:
            play(u, LONDON)
        served, stranger = users[:2], users[2]
        old = cloud.manager.offload(as_users(served))
        u0, u1 = served[0].user, served[1].user
        made = keys.pokemon(u0, "made-on-a")
        dropped = sorted(cloud.redis.scan_iter(keys.pokemon(u1, "*")))[0]  # one it caught
        foreign, shared = keys.pokedex(stranger.user), keys.region("zz-on-a")
        assert cloud.redis.exists(dropped) and not cloud.redis.exists(made)
        tenant = datasync.connect(old.redis_forward(), timeout=10)  # the tenant's own Redis
        tenant.hset(made, mapping={"species": "25"})
        tenant.delete(dropped)
        tenant.sadd(foreign, "150")  # another user's data: never to be carried on
        tenant.sadd(shared, "user:" + u0)
        tenant.close()
        before_foreign = cloud.redis.smembers(foreign)

        new = cloud.manager.handover(old)
        assert new.handover_path == "direct" and new.edge.name == b.name
        assert old.state == "handed_over" and old.confirmed
        assert new.keys_received and new.copy is None  # nothing read from the cloud
        gone(a, old.server_id)
        ended = [e for e in a.client().get(a.url + "/v1/events", timeout=5).json()
                 if e["server_id"] == old.server_id and e["type"] == "server.terminated"]
        assert ended and ended[0]["reason"] == "handover"
        assert ended[0]["data"]["handed_to"] == new.server_id
        assert ended[0]["data"]["keys_handed"] == new.keys_received
        # the old node merged its shared keys, not the handed users' keys
        assert cloud.redis.sismember(shared, "user:" + u0)
        assert cloud.redis.exists(dropped) and not cloud.redis.exists(made)
        assert cloud.redis.smembers(foreign) == before_foreign
        mine = datasync.connect(new.redis_forward(), timeout=10)
        assert mine.hget(made, "species") == b"25"
        assert not mine.exists(dropped) and not mine.exists(foreign)
        mine.close()

        for u in served:  # the users play on the new node with their data
            assert u.refresh() == new.url
            play(u, PARIS, catches=1)
        cloud.manager.withdraw(new)
        assert new.confirmed
        assert cloud.redis.hget(made, "species") == b"25"
        assert not cloud.redis.exists(dropped)  # the old server's delete, via the manifest
        assert cloud.redis.smembers(foreign) == before_foreign
        assert eventually(lambda: fences(a) == [] and fences(b) == [])  # lifted in the release


def test_handover_goes_through_the_cloud_where_the_old_node_may_not_reach_the_new_one(
        edge_node, redis_server):  # fmt: skip
    """The old node's operator allows it only the cloud's Redis and callback: the direct
    request is refused (400, to_url) with nothing moved, and the cloud manager hands the
    users over through the cloud instead. Then, on the API: a peer that does not answer
    (502), a wrong import key (401); the server serves on after each."""
    redis = redis_server()
    a = edge_node(start=False)
    a.settings["destinations"] = {"*": [f"127.0.0.1:{redis.port}", f"127.0.0.1:{a.cloud_port}"]}
    a.write_config()
    a.start()
    b = edge_node()
    with cloud_world(redis.url, [a, b]) as cloud:
        users = make_users(cloud, 2)
        for u in users:
            play(u, LONDON)
        old = cloud.manager.offload(as_users(users))
        assert old.edge.name == a.name
        caught = {u.user: len(u.party()) for u in users}
        tok = next(t for t, o in a.tokens.items() if o == "cloud-a")
        api = requests.Session()
        api.headers["Authorization"] = f"Bearer {tok}"
        key = "k" * 40
        r = api.post(f"{a.url}/v1/servers/{old.server_id}/handover", timeout=10,
                     json={"to_url": b.url, "to_server": "nope", "key": key})
        assert r.status_code == 403 and r.json()["field"] == "to_url", r.text
        # allowed (its own cloud's port) but no node there: 502, and nothing fenced
        r = api.post(f"{a.url}/v1/servers/{old.server_id}/handover", timeout=30,
                     json={"to_url": f"http://127.0.0.1:{redis.port}", "to_server": "x",
                           "key": key})
        assert r.status_code == 502 and r.json()["field"] == "to_url", r.text
        assert fences(a) == []
        assert users[0].update(*PARIS)  # still served by the old server
        assert users[0].server == old.url
        r = requests.post(f"{a.url}/v1/servers/{old.server_id}/import", timeout=10,
                          json={"keys": [], "final": True},
                          headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 401 and r.json()["field"] == "Authorization"

        new = cloud.manager.handover(old)
        assert new.handover_path == "cloud" and new.edge.name == b.name
        assert old.state == "handed_over" and old.confirmed
        for u in users:
            assert u.refresh() == new.url
            assert len(u.party()) == caught[u.user]
        cloud.manager.withdraw(new)
        assert new.confirmed


def test_a_handover_the_old_node_does_not_answer_ends_both_servers_and_loses_nothing(
        edge_node, redis_server):  # fmt: skip
    """The old node's answer is lost, so the cloud manager does not know whether the keys
    moved: both servers end, each merging what it holds (a termination waits for a
    handover or an import under way), the users go home, and what they did on the old
    server is on the cloud."""
    a, b = edge_node(), edge_node()
    with cloud_world(redis_server().url, [a, b]) as cloud:
        users = make_users(cloud, 2)
        for u in users:
            play(u, LONDON)
        old = cloud.manager.offload(as_users(users))
        for u in users:
            u.refresh()
            play(u, PARIS)  # on the old edge server
        caught = {u.user: len(u.party()) for u in users}
        real = old.edge.hand_over

        def answer_lost(*args, **kw):  # the request reaches the node; its answer does not
            threading.Thread(target=real, args=args, kwargs=kw, daemon=True).start()
            time.sleep(0.05)
            raise EdgeError("read timed out")

        old.edge.hand_over = answer_lost
        with pytest.raises(HandoverFailed, match="did not answer"):
            cloud.manager.handover(old)
        assert old.ended.is_set()
        new = next(d for d in cloud.manager.deployments.values()
                   if d.handed_over_from == old.server_id)
        assert new.state == "withdrawn" and new.ended.is_set()
        gone(a, old.server_id)
        gone(b, new.server_id)
        for u in users:
            assert u.refresh() == cloud.url
            assert len(u.party()) == caught[u.user]  # served by the cloud, nothing lost
        assert eventually(lambda: fences(a) == [] and fences(b) == [])  # lifted in the release
