"""The whole provisioning cycle on real parts: a cloud game server and cloud Redis on
loopback, real edge nodes (LXC containers, iptables, SSH), game clients following the
redirection config. Handshake -> deployment -> play on the edge -> termination with the
data merged back, by the cloud and by the edge; failover; Redis Cluster; a lost sink."""

from __future__ import annotations

import time

import pytest
import requests
from nodes import destroyed
from world import (
    BERLIN,
    LONDON,
    PARIS,
    TcpProxy,
    as_users,
    cloud_world,
    make_users,
    play,
    shared,
    snapshot,
)

from cloud_manager import NoEdgeAvailable
from cloud_manager.orchestrator import CloudManager
from enorm import datasync
from games.pokemon import keys

pytestmark = [pytest.mark.system, pytest.mark.timeout(240)]


def edge_values_before_end(dep) -> tuple[dict, dict]:
    """The edge's final data (through the deployment's SSH port forward)."""
    edge = datasync.connect(dep.redis_forward())
    try:
        return snapshot(edge, None), shared(edge)
    finally:
        edge.close()


def assert_merged(cloud, edge_users: dict, edge_shared: dict, cloud_before_shared: dict,
                  cloud_before: dict) -> None:  # fmt: skip
    """Every user key on the cloud equals the edge's final value, the region annotations
    are the union, and no key the cloud had before is lost."""
    after = snapshot(cloud.redis, None)
    assert edge_users, "the edge held no user keys"
    for k, v in edge_users.items():
        assert after.get(k) == v, k
    lost = set(cloud_before) - set(after)
    assert not lost, f"{len(lost)} keys lost: {sorted(lost)[:5]}"
    cloud_shared = shared(cloud.redis)
    for k in set(edge_shared) | set(cloud_before_shared):
        want = edge_shared.get(k, set()) | cloud_before_shared.get(k, set())
        assert cloud_shared.get(k, set()) >= want, k


def offloaded_play(cloud, dep, clients) -> None:
    """The offloaded users play; every game request reaches the edge, none the cloud."""
    before = cloud.game_requests()
    for c in clients:
        assert c.refresh() == dep.url  # the config names the edge server now
        play(c, PARIS)
    assert cloud.game_requests() == before, "the cloud saw game requests of offloaded users"
    edge_stats = requests.get(dep.url + "/stats", timeout=5).json()
    for c in clients:
        assert edge_stats["by_user"].get(c.user, 0) >= 5, c.user
        assert c.servers_used[-1] == dep.url
    # the edge pushes the regions it saw first to the cloud's global map (at its gateway)
    deadline = time.monotonic() + 5
    while requests.get(dep.url + "/stats", timeout=5).json()["cloud"]["regions_pushed"] == 0:
        assert time.monotonic() < deadline, "the edge never reached the cloud's /regions"
        time.sleep(0.1)


def run_cycle(cloud, node, *, edge_initiated: bool) -> None:
    clients = make_users(cloud, 100)
    for c in clients[:60]:
        play(c, LONDON, catches=1)
    offload = clients[:50]
    cloud_before = snapshot(cloud.redis, None)
    cloud_before_shared = shared(cloud.redis)

    dep = cloud.manager.offload(as_users(offload))
    assert dep.edge.name == node.name
    assert dep.copy.verified and dep.copy.keys >= 50
    redirect = game_cloud_config(cloud)
    assert set(redirect) == {c.user for c in offload}
    # the app went over in one tar stream: every file, root's, the env (the Redis
    # password) readable by root only, the start script executable
    app = cloud.manager.app
    _, out, _ = dep.session.run("cd /opt/enorm-app && stat -c '%a %U %n' app.env run.sh "
                                + " ".join(app.files))
    lines = [ln.split(" ", 2) for ln in out.splitlines()]
    assert {owner for _, owner, _ in lines} == {"root"}
    modes = {name: mode for mode, _, name in lines}
    assert modes.pop("app.env") == "600" and modes.pop("run.sh") == "755"
    assert set(modes) == set(app.files) and set(modes.values()) == {"644"}
    offloaded_play(cloud, dep, offload)
    # users that stayed on the cloud still play there
    for c in clients[50:55]:
        play(c, BERLIN, catches=1)
        assert c.server == cloud.url

    edge_users, edge_shared = edge_values_before_end(dep)
    if edge_initiated:
        op = requests.Session()
        op.headers["Authorization"] = f"Bearer {node.settings['operator_token']}"
        r = op.delete(f"{node.url}/v1/servers/{dep.server_id}", timeout=120)
        assert r.status_code == 200, r.text
        assert dep.ended.wait(30), "no server.terminated event reached the cloud"
        assert dep.state == "terminated"
    else:
        cloud.manager.withdraw(dep)
        assert dep.state == "withdrawn"
    assert dep.confirmed and dep.keys_migrated >= len(edge_users)
    assert game_cloud_config(cloud) == {}
    assert_merged(cloud, edge_users, edge_shared, cloud_before_shared, cloud_before)
    assert requests.get(node.url + "/v1/servers",
                        headers={"Authorization": f"Bearer {node.settings['operator_token']}"},
                        timeout=5).json() == []  # fmt: skip
    # back home: the same users play on the cloud again, with their edge progress
    for c in offload[:5]:
        xp = int(c.me()["xp"])
        assert c.server == cloud.url
        assert xp == int(edge_users[keys.user(c.user).encode()][1][b"xp"])


def game_cloud_config(cloud) -> dict:
    from games.pokemon.cloud import Redirections

    return Redirections(cloud.redis).all()


@pytest.mark.parametrize("edge_initiated", [False, True], ids=["cloud-withdrawal", "edge"])
def test_cycle_one_edge_node(edge_node, redis_server, edge_initiated):
    node = edge_node()
    store = redis_server()
    with cloud_world(store.url, [node]) as cloud:
        run_cycle(cloud, node, edge_initiated=edge_initiated)


def test_cycle_on_a_redis_cluster(edge_node, redis_cluster):
    node = edge_node()
    with cloud_world(redis_cluster.url, [node], cluster=True) as cloud:
        run_cycle(cloud, node, edge_initiated=False)


def test_second_edge_node_takes_over_after_409(edge_node, redis_server):
    """Node A has room for one unit; the second server goes to node B (its own slice of
    cores, memory, ports, bridge)."""
    a = edge_node(cores=0.25, memory_mb=256)
    b = edge_node(cores=1.0, memory_mb=512)
    store = redis_server()
    with cloud_world(store.url, [a, b]) as cloud:
        clients = make_users(cloud, 40)
        for c in clients:
            play(c, LONDON, catches=1)
        cloud_before = snapshot(cloud.redis, None)
        first = cloud.manager.offload(as_users(clients[:20]))
        second = cloud.manager.offload(as_users(clients[20:]))
        assert first.edge.name == a.name and first.refused == {}
        assert second.edge.name == b.name
        assert second.refused == {a.name: "insufficient_resources"}
        assert str(b.settings["port_range"][0]) <= second.url.rsplit(":", 1)[1]
        for dep, group in ((first, clients[:20]), (second, clients[20:])):
            offloaded_play(cloud, dep, group)
        finals = {d.server_id: edge_values_before_end(d) for d in (first, second)}
        for dep in (first, second):
            cloud.manager.withdraw(dep)
            assert dep.state == "withdrawn" and dep.confirmed
        after = snapshot(cloud.redis, None)
        for users, _ in finals.values():
            for k, v in users.items():
                assert after[k] == v, k
        assert not set(cloud_before) - set(after)
        # with A free again, the next server lands on A
        third = cloud.manager.offload(as_users([clients[0]]))
        assert third.edge.name == a.name
        # A full and B not configured: nobody admits, nothing is redirected
        edges, cloud.manager.edges = cloud.manager.edges, cloud.manager.edges[:1]
        try:
            with pytest.raises(NoEdgeAvailable) as refused:
                cloud.manager.offload(as_users([clients[1]]))
        finally:
            cloud.manager.edges = edges
        assert refused.value.refusals == {a.name: "insufficient_resources"}
        assert set(game_cloud_config(cloud)) == {clients[0].user}
        cloud.manager.withdraw(third)


@pytest.mark.parametrize("retry", ["cloud", "node"])
def test_unreachable_sink_keeps_the_container_and_the_retry_merges(edge_node, redis_server,
                                                                   retry):
    """The retry comes from the cloud (DELETE again) or from the node's own schedule."""
    import lxc

    node = edge_node(migration_retry_s=1.0 if retry == "node" else 3600)
    store = redis_server()
    proxy = TcpProxy(store.port)
    try:
        with cloud_world(store.url, [node],
                         sink_url=f"redis://127.0.0.1:{proxy.port}/0") as cloud:  # fmt: skip
            clients = make_users(cloud, 20)
            dep = cloud.manager.offload(as_users(clients[:10]))
            offloaded_play(cloud, dep, clients[:10])
            edge_users, edge_shared = edge_values_before_end(dep)
            cloud_shared = shared(cloud.redis)

            proxy.down()
            cloud.manager.withdraw(dep)
            assert dep.state == "migration_pending"
            assert game_cloud_config(cloud) == {}  # users went home anyway
            op = requests.Session()
            op.headers["Authorization"] = f"Bearer {node.settings['operator_token']}"
            # Between two of the node's own retries (each starts the container, fails,
            # stops it again) the server rests pending, its container stopped but kept.
            deadline = time.monotonic() + 10
            while True:
                info = op.get(f"{node.url}/v1/servers/{dep.server_id}", timeout=5).json()
                box = lxc.Container(dep.setup.container)
                if info["state"] == "migration_pending" and box.state == "STOPPED":
                    break
                assert retry == "node" and info["state"] in ("migration_pending",
                                                              "terminating"), info
                assert time.monotonic() < deadline, "never seen resting as pending"
                time.sleep(0.1)
            assert box.defined  # kept, with its data

            proxy.up()
            if retry == "cloud":
                cloud.manager.withdraw(dep)  # DELETE again
                assert dep.state == "withdrawn" and dep.confirmed
            else:  # the node retries by itself
                deadline = time.monotonic() + 20
                while op.get(f"{node.url}/v1/servers", timeout=5).json():
                    assert time.monotonic() < deadline, "the node never retried"
                    time.sleep(0.2)
                events = op.get(f"{node.url}/v1/events", timeout=5).json()
                # The event gives the reason the termination began with.
                assert any(e["type"] == "server.terminated" and e["reason"] == "cloud_withdrawal"
                           and e["data"]["keys_migrated"] > 0 for e in events)
            assert destroyed(dep.setup.container)
            assert op.get(f"{node.url}/v1/servers", timeout=5).json() == []
            after = snapshot(cloud.redis, None)
            for k, v in edge_users.items():
                assert after[k] == v, k
            now_shared = shared(cloud.redis)
            for k in set(edge_shared) | set(cloud_shared):
                assert now_shared[k] >= edge_shared.get(k, set()) | cloud_shared.get(k, set())
    finally:
        proxy.down()


def test_a_deploy_whose_ssh_session_drops_connects_again(edge_node, redis_server,
                                                         monkeypatch):  # fmt: skip
    """The SSH session to a fresh container dies during the upload (as when its sshd
    restarts just after boot): the cloud manager connects again and redoes the upload
    and the copy, and the users play on the edge server with their data."""
    node = edge_node()
    with cloud_world(redis_server().url, [node]) as cloud:
        users = make_users(cloud, 2)
        for u in users:
            play(u, LONDON)
        caught = {u.user: len(u.party()) for u in users}
        real, dropped = CloudManager.start_server, []

        def drop_first(self, dep):
            if not dropped:
                dropped.append(dep.session)
                dep.session.transport.close()
            return real(self, dep)

        monkeypatch.setattr(CloudManager, "start_server", drop_first)
        dep = cloud.manager.offload(as_users(users))
        assert dropped and dep.session is not dropped[0]
        assert dep.copy.verified
        for u in users:
            assert u.refresh() == dep.url
            assert len(u.party()) == caught[u.user]
            play(u, PARIS, catches=1)
        cloud.manager.withdraw(dep)
        assert dep.confirmed
