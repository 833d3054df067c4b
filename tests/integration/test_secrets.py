"""No secret leaves the node through its outputs: after a full cycle (handshake, data,
withdrawal, a failed merge, refusals, force-down), no token, Redis password or private
key appears in a log line, an event, /metrics, the dashboard view or an error body."""

from __future__ import annotations

import pytest
import redis
import requests
from test_edge_node import handshake, setup_request

pytestmark = pytest.mark.system
SINK_PASSWORD = "sink-pw-Zq8x1"


def test_no_secret_in_logs_events_metrics_or_errors(edge_node, redis_server) -> None:
    node = edge_node()
    op = node.settings["operator_token"]
    sink = redis_server("--requirepass", SINK_PASSWORD)
    sink_url = f"redis://:{SINK_PASSWORD}@127.0.0.1:{sink.port}/0"
    seen: list[str] = []
    secrets = [op, *node.tokens, SINK_PASSWORD]

    def call(method: str, path: str, owner: str = "cloud-a", **kw) -> dict | list | str:
        s = requests.Session() if owner == "operator" else node.client(owner)
        if owner == "operator":
            s.headers["Authorization"] = f"Bearer {op}"
        r = s.request(method, node.url + path, timeout=60, **kw)
        seen.append(r.text)
        return r.json() if r.headers.get("content-type", "").startswith("application/json") \
            else r.text

    # The setup responses are the one place a server's Redis password is meant to go.
    a = handshake(node, data_sink={"url": sink_url},
                  callback_url="http://127.0.0.1:9/events").json()
    b = handshake(node, data_sink={"url": sink_url}).json()
    secrets += [a["redis_password"], b["redis_password"]]
    for srv in (a, b):
        edge = redis.Redis(host=srv["address"], port=6379, password=srv["redis_password"])
        edge.set("u:{1}:name", "x")
        edge.close()
    call("GET", f"/v1/servers/{a['server_id']}")
    call("DELETE", f"/v1/servers/{a['server_id']}")           # merged with the password
    sink.stop()
    call("DELETE", f"/v1/servers/{b['server_id']}")           # merge fails: pending
    # refusals that carry secrets in their input
    call("POST", "/v1/servers", json=setup_request(
        data_sink={"url": f"redis://:{SINK_PASSWORD}@10.0.0.1:6379"}))
    call("POST", "/v1/servers", json=setup_request(
        data_sink={"url": f"redis://:{SINK_PASSWORD}@127.0.0.1:{sink.port}", "x": 1}))
    call("GET", "/v1/node", headers={"Authorization": f"Bearer {op}x"})
    for owner in ("cloud-a", "operator"):
        call("GET", "/v1/events?limit=1000", owner)
        call("GET", "/v1/dashboard", owner)
    call("GET", "/metrics", "operator")
    call("POST", "/v1/autoscale", "operator")
    node.stop()
    down = node.cli("down", "--force")
    assert down.returncode == 0, down.stdout + down.stderr
    outputs = {"http": "\n".join(seen), "cli": down.stdout + down.stderr,
               **{p.name: p.read_text(errors="replace")
                  for p in node.dir.rglob("*.log")}}
    for where, text in outputs.items():
        for secret in secrets:
            assert secret not in text, (where, secret)
        assert "PRIVATE KEY" not in text, where
    assert "migration_failed" in outputs["http"]  # the failure path was really taken
