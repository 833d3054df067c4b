"""Bounded tenancy on a real node: a tenant whose sink is down cannot hold host ports or
pile up pending servers, and the operator can still take the node down (--force)."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
import redis
from test_edge_node import handshake

pytestmark = pytest.mark.system


def test_pending_servers_hold_no_ports_are_bounded_and_force_down_saves_them(
        edge_node, redis_server) -> None:
    node = edge_node(max_pending_per_owner=1, migration_retry_s=3600)
    sink = redis_server()
    offer = lambda: node.client().get(node.url + "/v1/node", timeout=5).json()  # noqa: E731
    ports_before = offer()["ports_free"]
    r = handshake(node, ports=[80, 443], data_sink={"url": sink.url})
    assert r.status_code == 201, r.text
    created = r.json()
    edge = redis.Redis(host=created["address"], port=6379,
                       password=created["redis_password"], socket_timeout=5)
    edge.set("u:{7}:score", "42")
    edge.close()
    sink.stop()  # the cloud's Redis is gone: the merge cannot happen

    d = node.client().delete(f"{node.url}/v1/servers/{created['server_id']}", timeout=60)
    assert d.status_code == 202 and d.json()["pending"] == [created["server_id"]], d.text
    assert offer()["ports_free"] == ports_before  # its three host ports are free again

    r = handshake(node, data_sink={"url": sink.url})
    assert r.status_code == 409 and r.json()["error"] == "migrations_pending", r.text
    other = handshake(node, owner="cloud-b")
    assert other.status_code == 201, other.text  # another tenant is not held up
    assert node.client("cloud-b").delete(
        f"{node.url}/v1/servers/{other.json()['server_id']}", timeout=60).status_code == 200

    node.stop()
    plain = node.cli("down")
    assert plain.returncode != 0 and "--force" in plain.stdout + plain.stderr
    forced = node.cli("down", "--force")
    assert forced.returncode == 0, forced.stdout + forced.stderr
    m = re.search(r"WARNING: server (\w+) was NOT merged back.*saved in (\S+)", forced.stdout)
    assert m and m.group(1) == created["server_id"], forced.stdout
    saved = json.loads(Path(m.group(2)).read_text())
    assert Path(m.group(2)).stat().st_mode & 0o077 == 0
    keys = set(saved["keys"])
    assert base64.b64encode(b"u:{7}:score").decode() in keys
    # restorable: RESTORE the payload into a fresh Redis and read the value back
    fresh = redis_server()
    c = redis.Redis.from_url(fresh.url)
    entry = saved["keys"][base64.b64encode(b"u:{7}:score").decode()]
    c.restore("u:{7}:score", 0, base64.b64decode(entry["dump"]))
    assert c.get("u:{7}:score") == b"42"
