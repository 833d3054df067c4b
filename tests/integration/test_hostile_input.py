"""Hostile input against a real daemon over real HTTP: strict types, no 5xx, bounded bodies.

Every case must answer 4xx with the field and the reason, and afterwards the daemon must be
alive with its allocations unchanged.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from nodes import EdgeNode, make_node
from test_edge_node import PUB, handshake, setup_request

pytestmark = pytest.mark.system
HASHED_TOKEN = "tenant-c-secret"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EdgeNode]:
    """One real node for the whole module (the cases only read it or are refused)."""
    n = make_node(tmp_path_factory.mktemp("hostile"))
    # A third tenant whose token the config holds only as a digest.
    digest = hashlib.sha256(HASHED_TOKEN.encode()).hexdigest()
    n.settings["tokens"] = {**n.tokens, f"sha256:{digest}": "cloud-c"}
    # Only cloud-a may name loopback destinations; cloud-b none at all.
    n.settings["destinations"] = {"cloud-a": ["127.0.0.0/8"]}
    n.write_config()
    n.start()
    yield n
    n.down()


def raw(node: EdgeNode, method: str, path: str, body: bytes = b"",
        headers: dict[str, str] | None = None) -> tuple[int, dict]:
    """One request over a plain socket-level client: no client-side checks of the input."""
    port = int(node.settings["listen_port"])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    hdrs = {"Authorization": f"Bearer {next(iter(node.tokens))}",
            "Content-Type": "application/json", **(headers or {})}
    conn.putrequest(method, path, skip_accept_encoding=True)
    for k, v in hdrs.items():
        conn.putheader(k, v.encode("utf-8", "surrogateescape"))
    conn.putheader("Content-Length", str(len(body)))
    conn.endheaders(body)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    try:
        parsed = json.loads(data)
    except ValueError:
        parsed = {"raw": data[:200].decode("latin-1")}
    return resp.status, parsed


def body(**over) -> bytes:
    return json.dumps(setup_request(**over)).encode()


# (what, request body override, the field the 400 must name)
LAX_TYPES = [
    ("boolean priority", {"priority": True}, "priority"),
    ("string priority", {"priority": "7"}, "priority"),
    ("string port", {"ports": ["8080"]}, "ports.0"),
    ("boolean port", {"ports": [True]}, "ports.0"),
    ("string override", {"override": "yes"}, "override"),
    ("integer address", {"users": [{"id": "u", "address": 167772161}]}, "users.0.address"),
    ("second key after \\r", {"ssh_public_key": PUB + "\rssh-ed25519 " + "B" * 68},
     "ssh_public_key"),
    ("second key after \\n", {"ssh_public_key": PUB + "\n" + PUB}, "ssh_public_key"),
    ("string latency", {"latency_objective_ms": "50"}, "latency_objective_ms"),
    ("float priority", {"priority": 5.5}, "priority"),
    ("NUL in app", {"app": "ga\x00me"}, "app"),
    ("unknown field", {"admin": True}, "admin"),
]


@pytest.mark.parametrize("what,over,field", LAX_TYPES, ids=[c[0] for c in LAX_TYPES])
def test_no_type_coercion(node: EdgeNode, what: str, over: dict, field: str) -> None:
    status, err = raw(node, "POST", "/v1/servers", body(**over))
    assert status == 400, (what, err)
    assert err["field"] == field and err["detail"], err


def test_hand_made_hostile_requests(node: EdgeNode) -> None:
    before = node.client().get(node.url + "/v1/node", timeout=5).json()
    sid = "deadbeef"
    cases: list[tuple[str, str, bytes, dict, int, str]] = [
        ("POST", "/v1/servers", b"[" * 100_000, {}, 400, "body"),
        ("POST", "/v1/servers", b'{"a":' * 50_000, {}, 400, "body"),
        ("POST", "/v1/servers", b"\xff\xfe not json", {}, 400, "body"),
        ("POST", "/v1/servers", b"[1, 2]", {}, 400, "body"),
        ("POST", "/v1/servers", b"", {}, 400, "body"),
        ("POST", "/v1/servers", body(), {"Content-Type": "text/plain"}, 415, "Content-Type"),
        ("POST", "/v1/servers", body(), {"Content-Type": "application/x-www-form-urlencoded"},
         415, "Content-Type"),
        ("GET", "/v1/node", b"", {"Authorization": "Bearer ünïcödé"}, 401, "Authorization"),
        ("GET", "/v1/node", b"", {"Authorization": "Bearer \udcff\udcfe"}, 401,
         "Authorization"),
        ("GET", "/v1/node", b"", {"Authorization": "Bearer "}, 401, "Authorization"),
        ("GET", "/v1/node", b"", {"Authorization": "Basic abc"}, 401, "Authorization"),
        ("GET", "/v1/node", b"", {"Authorization": "Bearer " + "x" * 60_000}, 401,
         "Authorization"),
        ("GET", "/v1/node", b"", {"X-Junk": "y" * 100_000}, 431, "headers"),
        ("GET", "/metrics", b"", {"Authorization": "Bearer ünï"}, 401, "Authorization"),
        ("GET", f"/v1/servers/{sid}%00", b"", {}, 404, "id"),
        ("GET", "/v1/servers/..%2F..%2Fetc%2Fpasswd", b"", {}, 404, "path"),
        ("GET", "/v1/servers/../../etc/passwd", b"", {}, 404, "path"),
        ("DELETE", "/v1/servers/%00", b"", {}, 404, "id"),
        ("DELETE", "/v1/servers/" + "a" * 5000, b"", {}, 404, "id"),
        ("GET", "/v1/events?limit=1e3", b"", {}, 400, "limit"),
        ("GET", "/v1/events?server=%00%ff", b"", {}, 200, ""),
        ("PUT", "/v1/servers", b"{}", {}, 405, "method"),
        ("POST", "/v1/autoscale", b"", {}, 403, ""),
    ]
    for method, path, data, headers, want, field in cases:
        status, err = raw(node, method, path, data, headers)
        assert status == want, (method, path[:60], headers.keys(), status, err)
        if 400 <= status < 500 and status != 431:  # 431 is waitress's own plain answer
            assert err.get("detail") and err.get("error"), (path[:60], err)
            if field:
                assert err.get("field") == field, (path[:60], err)
    after = node.client().get(node.url + "/v1/node", timeout=5).json()
    assert after["allocated"] == before["allocated"] and after["servers"] == before["servers"]
    assert requests.get(node.url + "/healthz", timeout=5).ok


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_big_body_is_refused_before_it_is_read(node: EdgeNode, framing: str) -> None:
    """A body over the limit is 413 after the headers (declared) or at the limit (chunked),
    never read whole and parsed."""
    port = int(node.settings["listen_port"])
    head = (b"POST /v1/servers HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + next(iter(node.tokens)).encode() + b"\r\n")
    chunk = b" " * (1 << 20)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        try:
            if framing == "content-length":
                s.sendall(head + b"Content-Length: %d\r\n\r\n" % (64 << 20) + chunk)
            else:
                s.sendall(head + b"Transfer-Encoding: chunked\r\n\r\n")
                for _ in range(24):
                    s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                s.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the node stopped reading: that is the point
        reply = s.recv(4096)
    assert reply.split(b" ")[1] == b"413", reply[:200]
    assert requests.get(node.url + "/healthz", timeout=5).ok


def test_refusals_carry_the_headers_rfc_9110_requires(node: EdgeNode) -> None:
    """A 405 says which methods the path has (`Allow`), a 401 which scheme it wants
    (`WWW-Authenticate`): on every path of the document, beside our JSON body."""
    spec = requests.get(node.url + "/v1/openapi.json", timeout=5).json()
    for path, item in spec["paths"].items():
        url = node.url + path.replace("{sid}", "deadbeef").replace("{name}", "x.js")
        has = {m.upper() for m in item}
        r = requests.request("TRACE", url, timeout=5)
        assert r.status_code == 405 and r.json()["field"] == "method", (path, r.text)
        allow = {m.strip() for m in r.headers["Allow"].split(",")}
        assert has <= allow and "TRACE" not in allow, (path, allow)
        for method in has:
            if item[method.lower()]["security"]:
                r = requests.request(method, url, timeout=5)
                assert r.status_code == 401, (method, path, r.status_code)
                assert r.headers["WWW-Authenticate"].startswith("Bearer "), (method, path)
                assert r.json()["field"] == "Authorization"


def test_another_tenants_server_is_not_found(node: EdgeNode) -> None:
    """404 for another tenant's id, exactly like a missing one."""
    r = handshake(node)
    assert r.status_code == 201, r.text
    sid = r.json()["server_id"]
    try:
        b = node.client("cloud-b")
        mine = b.get(f"{node.url}/v1/servers/{sid}", timeout=5)
        missing = b.get(f"{node.url}/v1/servers/ffffffff", timeout=5)
        assert mine.status_code == missing.status_code == 404
        assert mine.json()["error"] == missing.json()["error"] == "not_found"
    finally:
        assert node.client().delete(f"{node.url}/v1/servers/{sid}", timeout=60).ok


def test_token_configured_as_digest(node: EdgeNode) -> None:
    """`sha256:<hex>` in the config: the token works, its digest as a token does not."""
    def get(token: str) -> int:
        return requests.get(node.url + "/v1/servers", timeout=5,
                            headers={"Authorization": f"Bearer {token}"}).status_code

    assert get(HASHED_TOKEN) == 200
    assert get(hashlib.sha256(HASHED_TOKEN.encode()).hexdigest()) == 401
    assert get("sha256:" + hashlib.sha256(HASHED_TOKEN.encode()).hexdigest()) == 401


def test_no_ssrf_through_setup_requests(node: EdgeNode) -> None:
    """Destinations the operator did not allow are 403 naming the field (a URL the
    document's pattern refuses: 400), and the node never connects to them; the node's
    own store and API are refused even when allowed."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    own_store = Path(node.settings["state_dir"]) / "store.sock"
    api_port = node.settings["listen_port"]
    cases = [
        ("cloud-b", {"callback_url": f"http://127.0.0.1:{port}/x"}, "callback_url", 403),
        ("cloud-b", {"data_sink": {"url": f"redis://127.0.0.1:{port}"}}, "data_sink.url", 403),
        ("cloud-a", {"callback_url": "http:///x"}, "callback_url", 400),
        ("cloud-a", {"callback_url": "http://cloud.invalid:80/x"}, "callback_url", 403),
        ("cloud-a", {"callback_url": "http://10.1.2.3/x"}, "callback_url", 403),
        ("cloud-a", {"callback_url": f"http://127.0.0.1:{api_port}/v1/autoscale"},
         "callback_url", 403),
        ("cloud-a", {"data_sink": {"url": f"redis://[::ffff:127.0.0.1]:{api_port}"}},
         "data_sink.url", 403),
        ("cloud-a", {"data_sink": {"url": f"redis://0.0.0.0:{port}"}}, "data_sink.url", 403),
        ("cloud-a", {"data_sink": {"url": f"unix://{own_store}",
                                   "shared_patterns": ["*"]}}, "data_sink.url", 403),
        ("cloud-a", {"data_sink": {"url": f"unix://{own_store.parent}/../state/store.sock"}},
         "data_sink.url", 403),
        ("cloud-a", {"data_sink": {"url": "unix:///tmp/some.sock"}}, "data_sink.url", 403),
        ("cloud-a", {"data_sink": {"url": "redis://[::1"}}, "data_sink.url", 403),  # was 500
        ("cloud-a", {"data_sink": {"url": "unix:///tmp/some.sock", "cluster": True}},
         "data_sink", 400),
    ]
    before = node.client().get(node.url + "/v1/node", timeout=5).json()
    try:
        for owner, over, field, status in cases:
            r = node.client(owner).post(node.url + "/v1/servers", timeout=30,
                                        json=setup_request(**over))
            assert r.status_code == status, (owner, over, r.text)
            assert r.json()["field"] == field and r.json()["detail"], (over, r.json())
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody connected
    finally:
        listener.close()
    after = node.client().get(node.url + "/v1/node", timeout=5).json()
    assert after["servers"] == before["servers"]
