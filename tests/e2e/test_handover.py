"""Users moving between edge nodes on real parts: the fence that keeps a terminating
server's late writes from being lost, the start-first handover between two nodes with a
user playing through it, and users re-homed on another node after an eviction."""

from __future__ import annotations

import subprocess
import threading
import time

import pytest
import requests
from world import LONDON, PARIS, cloud_world, make_users, play

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


def test_a_terminating_server_takes_no_write_after_its_data_is_read(edge_node, redis_server):
    """A client keeps writing to its edge server while the cloud withdraws it: every write
    the edge confirmed is on the cloud afterwards (the node fences the server's port
    before its merge: the client's connection is reset, not served by a server whose data
    is gone)."""
    node = edge_node()
    with cloud_world(redis_server().url, [node]) as cloud:
        (user,) = make_users(cloud, 1)
        user.update(*LONDON)
        dep = cloud.manager.offload([(user.user, "127.0.0.1")])
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
        assert fences(node) == []


def test_handover_moves_playing_users_to_another_node_start_first(edge_node, redis_server):
    a, b = edge_node(), edge_node()
    with cloud_world(redis_server().url, [a, b]) as cloud:
        users = make_users(cloud, 3)
        for u in users:
            play(u, LONDON)
        old = cloud.manager.offload([(u.user, "127.0.0.1") for u in users])
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
        on_a = a.client().get(a.url + "/v1/servers", timeout=5).json()
        assert old.server_id not in {s["id"] for s in on_a}
        assert 0 < new.timings["interruption"] < new.timings["total"]
        # the playing user saw no error: served by the old edge, the cloud, the new edge
        assert w.errors == [] and set(w.by_server) == {old.url, cloud.url, new.url}
        for u in users[1:]:
            assert u.refresh() == new.url
            assert len(u.party()) == caught[u.user]  # what they caught on A, on B now
        cloud.manager.withdraw(new)
        assert new.confirmed and cloud_lat(cloud, users[0].user) == w.acked  # no error
        assert fences(a) == [] and fences(b) == []
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
        low = cloud.manager.offload([(u.user, "127.0.0.1") for u in users[:2]], priority=2)
        high = cloud.manager.offload([(u.user, "127.0.0.1") for u in users[2:]], priority=8)
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
