"""Many edge nodes: the registry's heartbeats in a real Redis, the node's own probe of
the users, and scored placement choosing between real nodes."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from nodes import user_namespace
from test_edge_node import handshake

from cloud_manager import App, CloudManager, EdgeClient
from cloud_manager.registry import Heartbeats, Registry
from enorm import datasync
from enorm.protocol import DataSink, User

pytestmark = pytest.mark.system


def token(node, owner: str = "cloud-a") -> str:
    return next(t for t, o in node.tokens.items() if o == owner)


def cloud_manager(edges, redis_url: str, **kw) -> CloudManager:
    app = App(name="game", port=8000, files={}, command=["true"], env=lambda ctx: {},
              redirect=lambda users, url: None, restore=lambda users: None)
    return CloudManager(edges, app, cloud_redis=datasync.connect(redis_url),
                        sink=DataSink(url=redis_url), **kw)


def test_registry_heartbeats_mark_a_silent_node_down(edge_node, redis_server):
    redis = redis_server()
    a, b = edge_node(), edge_node()
    edges = [EdgeClient(n.url, token(n), name=n.name, retries=0) for n in (a, b)]
    registry = Registry(datasync.connect(redis.url), down_after_s=1.0)
    beats = Heartbeats(registry, edges, interval_s=0.2, timeout_s=1.0)
    first = beats.beat()
    assert {n: s.error for n, s in first.items()} == {a.name: None, b.name: None}
    assert first[a.name].offer.min_priority == 0 and first[a.name].offer.load >= 0
    # A second cloud-manager process sees the same view from the same Redis.
    other = Registry(datasync.connect(redis.url), down_after_s=1.0)
    assert other.up(a.name) and other.up(b.name)
    assert other.nodes()[b.name].offer.name == b.name

    b.stop()
    beats.start()
    try:
        deadline = time.monotonic() + 10
        while other.up(b.name) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not other.up(b.name), "the silent node was never marked down"
        assert other.up(a.name)
        st = other.get(b.name)
        assert st.error and st.offer is not None  # it keeps its last offer
        # Placement passes the down node over, whatever the policy.
        m = cloud_manager([edges[1], edges[0]], redis.url, registry=other)
        order, refused, _ = m.place(m.request_for([]))
        assert [e.name for e in order] == [a.name]
        assert refused == {b.name: "down (no heartbeat)"}
    finally:
        beats.stop()
    assert not beats._thread


def test_the_node_probes_users_and_refuses_what_is_not_a_user(edge_node):
    node = edge_node(probe_timeout_s=0.3)
    c = node.client()
    n = int(node.name[1:])
    nobody = f"10.90.{n}.129"  # in a prefix this test makes unreachable: nothing leaves
    subprocess.run(["ip", "route", "replace", "unreachable", f"10.90.{n}.128/25"], check=True)
    try:
        with user_namespace(n) as (_ns, user_ip, _host):
            r = c.post(node.url + "/v1/probe", json={"addresses": [user_ip, nobody]},
                       timeout=10)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["method"] == "tcp"
            assert 0 < body["rtt_ms"][user_ip] < 100  # the namespace answers (RST, port 7)
            assert body["rtt_ms"][nobody] is None  # nobody there
            assert body["median_ms"] == body["rtt_ms"][user_ip]
    finally:
        subprocess.run(["ip", "route", "del", "unreachable", f"10.90.{n}.128/25"])
    bad = c.post(node.url + "/v1/probe", json={"addresses": ["127.0.0.1"]}, timeout=5)
    assert bad.status_code == 400 and bad.json()["field"].startswith("addresses")
    assert "loopback" in bad.json()["detail"]
    many = c.post(node.url + "/v1/probe", json={"addresses": ["10.1.1.1"] * 257}, timeout=5)
    assert many.status_code == 400
    text = c.post(node.url + "/v1/probe", data="x", timeout=5)
    assert text.status_code == 415


def test_scored_placement_picks_the_node_with_room_where_first_fit_does_not(edge_node,
                                                                           redis_server):
    redis = redis_server()
    # `full` has room for one more unit only and is busy with two servers; `roomy` has 8.
    full = edge_node(cores=0.75, memory_mb=192)
    roomy = edge_node(cores=2.0, memory_mb=512)
    for _ in range(2):
        assert handshake(full, "cloud-b").status_code == 201
    edges = [EdgeClient(n.url, token(n), name=n.name, retries=0) for n in (full, roomy)]
    with user_namespace(int(roomy.name[1:])) as (_ns, user_ip, _host):
        users = [User(id="u1", address=user_ip)]
        first = cloud_manager(edges, redis.url)
        order, _, placed = first.place(first.request_for(users))
        assert [e.name for e in order] == [full.name, roomy.name]
        assert placed["policy"] == "first" and placed["order"] == [full.name, roomy.name]

        scored = cloud_manager(edges, redis.url, placement="scored")
        req = scored.request_for(users)
        order, refused, placed = scored.place(req)
        assert [e.name for e in order] == [roomy.name, full.name] and refused == {}
        figures = placed["nodes"]
        assert 0 < placed["ms"]["probes"] <= placed["ms"]["total"]
        assert figures[full.name]["free_units"] == pytest.approx(1.0)
        assert figures[roomy.name]["free_units"] == pytest.approx(8.0)
        for f in figures.values():  # both nodes probed the user themselves
            assert f["latency_ms"] is not None and f["latency_ms"] < 100
        edge, setup, refused = scored.handshake(req)
        assert edge.name == roomy.name and refused == {}
        assert edge.terminate(setup.server_id).terminated == [setup.server_id]


ANSWER = r"""
import http.server, sys
word = sys.argv[2].encode()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(word)))
        self.end_headers()
        self.wfile.write(word)
    def log_message(self, *a):
        pass
host, port = sys.argv[1].rsplit(":", 1)
http.server.ThreadingHTTPServer((host, int(port)), H).serve_forever()
"""


def fetch(url: str, netns: str | None = None) -> str:
    """GET `url` from the users' namespace (or from the host): the answer's text."""
    code = ("import sys, urllib.request\n"
            "print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())")
    cmd = [sys.executable, "-c", code, url]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    return out.stdout.strip() or f"error: {out.stderr.strip()[-200:]}"


def test_transparent_redirection_sends_only_the_served_users_to_the_edge(edge_node,
                                                                         free_tcp_port):
    node = edge_node(start=False)
    n = int(node.name[1:])
    cloud_ip, cloud_port = f"10.90.{n}.1", free_tcp_port()
    node.settings["destinations"] = {"*": ["127.0.0.0/8", f"{cloud_ip}/32:{cloud_port}"]}
    node.write_config()
    node.start()
    c = node.client()
    procs = []
    with user_namespace(n) as (ns, user_ip, _host):
        try:
            procs.append(subprocess.Popen([sys.executable, "-c", ANSWER,
                                           f"{cloud_ip}:{cloud_port}", "cloud"]))
            intercept = [{"address": cloud_ip, "port": cloud_port, "to_port": 8080}]
            users = [{"id": "u1", "address": user_ip}]
            # Refused: a destination the operator did not list, a port not forwarded.
            bad = handshake(node, users=users, intercept=[{**intercept[0], "port": 9}])
            assert bad.status_code == 403 and bad.json()["field"] == "intercept.0"
            bad = handshake(node, users=users, intercept=[{**intercept[0], "to_port": 81}])
            assert bad.status_code == 400 and "to_port" in bad.json()["detail"]

            r = handshake(node, users=users, intercept=intercept)
            assert r.status_code == 201, r.text
            srv = r.json()
            procs.append(subprocess.Popen(
                ["lxc-attach", "-n", srv["container"], "-P", "/var/lib/lxc", "--", "python3",
                 "-c", ANSWER, "0.0.0.0:8080", "edge"]))
            deadline = time.monotonic() + 20
            while fetch(f"http://{srv['address']}:8080/") != "edge":
                assert time.monotonic() < deadline, "the app in the container never answered"
                time.sleep(0.2)
            cloud_url = f"http://{cloud_ip}:{cloud_port}/"
            assert fetch(cloud_url, ns) == "cloud"  # not switched on yet: the app was starting

            on = c.put(f"{node.url}/v1/servers/{srv['server_id']}/redirect", timeout=10)
            assert on.status_code == 200 and on.json()["rules"] == 1
            assert fetch(cloud_url, ns) == "edge"  # the served user, same URL, no change
            assert fetch(cloud_url) == "cloud"  # anyone else (here: the host itself)

            # A restart puts back a redirect that went missing.
            chain = f"ENORM-{node.name.upper()}-X"
            subprocess.run(["iptables", "-w", "-t", "nat", "-F", chain], check=True)
            assert fetch(cloud_url, ns) == "cloud"
            node.kill()
            node.start()
            assert fetch(cloud_url, ns) == "edge"

            done = c.delete(f"{node.url}/v1/servers/{srv['server_id']}", timeout=60)
            assert done.status_code == 200, done.text
            assert fetch(cloud_url, ns) == "cloud"
            rules = subprocess.run(["iptables", "-w", "-t", "nat", "-S", chain],
                                   capture_output=True, text=True).stdout
            assert srv["server_id"] not in rules

            plain = handshake(node, users=users).json()
            no = c.put(f"{node.url}/v1/servers/{plain['server_id']}/redirect", timeout=10)
            assert no.status_code == 409 and no.json()["error"] == "no_intercept"
            assert no.json()["field"] == "intercept"
        finally:
            for p in procs:
                p.kill()
                p.wait(10)
