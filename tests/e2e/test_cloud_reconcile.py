"""The cloud manager's own reconciliation: a server that vanished from its edge node
without an event reaching the cloud still brings its users home, data confirmed."""

from __future__ import annotations

import pytest
import requests
from world import LONDON, as_users, cloud_world, make_users, play

from games.pokemon import keys

pytestmark = pytest.mark.system


def test_server_gone_without_an_event_brings_users_home(edge_node, redis_server):
    node = edge_node()
    redis = redis_server()
    with cloud_world(redis.url, [node], callback=False) as cloud:  # no event will come
        users = make_users(cloud, 3)
        for u in users:
            u.update(*LONDON)
        dep = cloud.manager.offload(as_users(users[:2]))
        users[0].refresh()
        assert users[0].server == dep.url
        play(users[0], LONDON)
        assert cloud.manager.reconcile() == {}  # alive: nothing to do

        # The operator terminates it at the edge; the data is merged, the cloud not told.
        op = {"Authorization": f"Bearer {node.settings['operator_token']}"}
        r = requests.delete(f"{node.url}/v1/servers/{dep.server_id}", headers=op, timeout=60)
        assert r.status_code == 200 and r.json()["keys_migrated"] > 0
        assert not dep.ended.is_set() and users[0].refresh() == dep.url  # still sent there

        # The user's client finds its server dead and says so to the cloud.
        said = requests.post(f"{cloud.url}/edge-events/dead", json={"user": users[0].user},
                             timeout=30).json()
        assert said["done"] == "users restored, data confirmed"
        assert dep.ended.is_set() and dep.end_reason == "gone_without_event" and dep.confirmed
        assert [u.refresh() for u in users[:2]] == [cloud.url, cloud.url]
        assert cloud.redis.exists(keys.user(users[0].user))
        bad = requests.post(f"{cloud.url}/edge-events/dead", json={}, timeout=10)
        assert bad.status_code == 400 and bad.json()["field"] == "user"
        assert cloud.manager.user_reports_dead(users[2].user) == "not offloaded"
