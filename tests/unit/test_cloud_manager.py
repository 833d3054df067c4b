"""Pure logic of the cloud manager: keys, the setup request it builds, which files it
uploads, how it answers edge events, failover order, the edge client's error mapping."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from flask import Flask, jsonify
from redis.exceptions import RedisClusterUnreachableError
from werkzeug.serving import make_server

from cloud_manager import App, CloudManager, EdgeClient, NoEdgeAvailable, Rejected
from cloud_manager.deployer import Deployer, files_of, new_key
from cloud_manager.ledger import CloudUnreachable, Ended, Entry, Intent, Intents
from cloud_manager.orchestrator import Deployment
from enorm.protocol import (
    Access,
    DataSink,
    Event,
    Resources,
    SetupRequest,
    SetupResponse,
    User,
)


def fake_app(log: list) -> App:
    return App(name="game", port=8080, files={}, command=["true"], env=lambda ctx: {},
               redirect=lambda users, url: log.append(("redirect", list(users), url)),
               restore=lambda users: log.append(("restore", list(users))))  # fmt: skip


def manager(edges=(), log=None) -> CloudManager:
    return CloudManager(list(edges), fake_app(log if log is not None else []), cloud_redis=None,
                        sink=DataSink(url="redis://127.0.0.1:1/0"),
                        callback_url="http://127.0.0.1:9/edge-events",
                        deployer=Deployer(*new_key()))  # fmt: skip


def setup_response(sid: str = "s1") -> SetupResponse:
    return SetupResponse(server_id=sid, container=f"enorm-x-{sid}", address="10.89.0.2",
                         access=Access(host="127.0.0.1", port=30001), ports={8080: 30002},
                         limits=Resources(cores=1, memory_mb=200), redis_password="pw")  # fmt: skip


def users(*ids: str) -> list[User]:
    return [User(id=i, address="10.90.1.2") for i in ids]


def event(type_: str, sid: str, reason: str, **data) -> Event:
    """An event as a node sends it (the callback endpoint parses the body into one)."""
    return Event(id="e1", type=type_, server_id=sid, app="game", at=1.0, reason=reason,
                 data=data)


def test_new_key_is_accepted_by_the_protocol():
    key, public = new_key()
    req = manager().request_for([])
    assert req.ssh_public_key.startswith("ssh-ed25519 ")
    assert public.split()[1] == key.get_base64()
    SetupRequest.model_validate(req.model_dump(mode="json"))


def test_request_for_names_the_app_port_sink_and_callback():
    m = manager()
    req = m.request_for([User(id="7", address="10.90.1.2")], priority=9, override=True)
    assert req.app == "game" and req.ports == [8080] and req.priority == 9 and req.override
    assert [u.id for u in req.users] == ["7"]
    assert req.data_sink.url == "redis://127.0.0.1:1/0"
    assert str(req.callback_url) == "http://127.0.0.1:9/edge-events"


def test_files_of_uploads_python_sources_only(tmp_path: Path):
    (tmp_path / "pkg" / "__pycache__").mkdir(parents=True)
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    (tmp_path / "pkg" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0")
    (tmp_path / "pkg" / "data.jsonl").write_text("{}\n")
    (tmp_path / "top.py").write_text("")
    files = files_of(tmp_path, "/opt/app/games")
    assert files == {"/opt/app/games/pkg/a.py": tmp_path / "pkg" / "a.py",
                     "/opt/app/games/top.py": tmp_path / "top.py"}  # fmt: skip


def test_terminated_event_restores_the_users_once():
    log: list = []
    m = manager(log=log)
    dep = Deployment(edge=None, setup=setup_response(), users=users("1", "2"), url="http://e")
    m.deployments["s1"] = dep
    ev = event("server.terminated", "s1", "idle", keys_migrated=12)
    assert m.handle_event(ev) == "users restored"
    assert log == [("restore", ["1", "2"])]
    assert dep.state == "terminated" and dep.end_reason == "idle" and dep.keys_migrated == 12
    assert dep.confirmed and dep.ended.is_set()
    assert m.handle_event(ev) == "already ended"
    assert log == [("restore", ["1", "2"])]
    assert m.handle_event(ev.model_copy(update={"server_id": "other"})) == "unknown server"


def test_a_server_ended_for_its_handover_ends_handed_over_whichever_word_comes_first():
    """Through the cloud, the old node's `server.terminated` (for the cloud's DELETE) may
    come before the DELETE's answer: the deployment ends handed over either way, and its
    users are not re-homed elsewhere (they are going to the new server)."""
    log: list = []
    m = manager(log=log)
    m.rehome = True
    dep = Deployment(edge=None, setup=setup_response(), users=users("1"), url="http://e")
    dep.state = "handing_over"  # set by the handover before it asks the node
    m.deployments["s1"] = dep
    ev = event("server.terminated", "s1", "preempted", keys_migrated=3)
    assert m.handle_event(ev) == "handed over"
    assert dep.state == "handed_over" and dep.end_reason == "handover"
    assert dep.keys_migrated == 3 and dep.ended.is_set() and not m.rehomed
    assert m.handle_event(ev) == "already ended"


def test_migration_failed_event_sends_users_home_and_waits_for_the_merge():
    log: list = []
    m = manager(log=log)
    dep = Deployment(edge=None, setup=setup_response(), users=users("1"), url="http://e")
    m.deployments["s1"] = dep
    ev = event("server.migration_failed", "s1", "idle")
    assert m.handle_event(ev) == "users restored, merge pending"
    assert dep.state == "migration_pending" and not dep.ended.is_set()
    assert m.handle_event(event("server.scaled", "s1", "operator")) == "noted"


def test_callback_endpoint_acknowledges_with_2xx():
    m = manager()
    app = Flask("t")
    app.register_blueprint(m.blueprint())
    c = app.test_client()
    ev = event("server.terminated", "nope", "idle")
    r = c.post("/edge-events", json=ev.model_dump(mode="json"))
    assert r.status_code == 200 and r.json["done"] == "unknown server"
    assert c.post("/edge-events", data="x").status_code == 400
    # A reason the cloud does not know is refused loudly, naming the field.
    r = c.post("/edge-events", json={**ev.model_dump(mode="json"), "reason": "bored"})
    assert r.status_code == 400 and r.json["field"] == "reason"


@pytest.fixture
def fake_edge():
    """Edge nodes on loopback that answer setup requests with fixed statuses."""
    servers = []

    def start(status: int, body: dict) -> str:
        app = Flask("edge")
        app.add_url_rule("/v1/servers", "s", lambda: (jsonify(body), status), methods=["POST"])
        http = make_server("127.0.0.1", 0, app, threaded=True)
        threading.Thread(target=http.serve_forever, daemon=True).start()
        servers.append(http)
        return f"http://127.0.0.1:{http.server_port}"

    yield start
    for s in servers:
        s.shutdown()


def test_handshake_fails_over_on_409_and_dead_nodes(fake_edge):
    full = fake_edge(409, {"error": "insufficient_resources", "detail": "no room"})
    low = fake_edge(409, {"error": "priority", "detail": "below 10"})
    ok = fake_edge(201, setup_response("s9").model_dump(mode="json"))
    dead = EdgeClient("http://127.0.0.1:9", "t", name="dead", timeout=0.5, retries=0)
    edges = [EdgeClient(full, "t", name="full"), dead, EdgeClient(low, "t", name="low"),
             EdgeClient(ok, "t", name="ok")]  # fmt: skip
    m = manager(edges)
    edge, resp, refused = m.handshake(m.request_for([]))
    assert edge.name == "ok" and resp.server_id == "s9"
    assert refused["full"] == "insufficient_resources" and refused["low"] == "priority"
    assert refused["dead"].startswith("unreachable")
    with pytest.raises(NoEdgeAvailable) as exc:
        m2 = manager(edges[:3])
        m2.handshake(m2.request_for([]))
    assert set(exc.value.refusals) == {"full", "dead", "low"}


def test_edge_client_raises_rejected_with_the_reason(fake_edge):
    url = fake_edge(409, {"error": "ports_unavailable", "detail": "none left"})
    with pytest.raises(Rejected) as exc:
        EdgeClient(url, "t").setup(manager().request_for([]))
    assert exc.value.reason == "ports_unavailable" and exc.value.status == 409


def test_the_app_declares_its_data_once():
    from dataclasses import replace

    from cloud_manager import sink_for

    app = replace(fake_app([]), shared_patterns=["region:*"], cloud_wins_patterns=["cfg:*"])
    sink = sink_for(app, DataSink(url="redis://127.0.0.1:1/0"))
    # The App's declaration reaches the sink the edge merges into (it was ignored before).
    assert sink.shared_patterns == ["region:*"] and sink.cloud_wins_patterns == ["cfg:*"]
    assert sink_for(app, sink) == sink  # saying the same twice is fine
    with pytest.raises(ValueError, match="shared_patterns: the app game declares"):
        sink_for(app, DataSink(url="redis://127.0.0.1:1/0", shared_patterns=["other:*"]))
    with pytest.raises(ValueError, match="hash tag"):
        sink_for(replace(app, shared_patterns=["*{*}*"]), DataSink(url="redis://x:1/0"))
    m = CloudManager([], app, cloud_redis=None, sink=DataSink(url="redis://127.0.0.1:1/0"),
                     deployer=Deployer(*new_key()))
    assert m.request_for([]).data_sink.shared_patterns == ["region:*"]


def test_a_record_the_cloud_redis_did_not_answer_is_left_to_its_lease():
    """The record may have landed: ending the server could leave a record of a server gone,
    so it is left to its lease (the process that takes it over completes or ends it); a
    record refused (`Ended`) ends it, nobody sent there, as before."""
    released, log = [], []

    class Ledger:  # what `Intents` asks of it
        def intend(self, intent, owner, lease_s):
            pass

        def release(self, sid):
            released.append(sid)

    class Edge:
        name = "n1"

        def __init__(self):
            self.terminated = []

        def terminate(self, sid, conflicts=None):
            self.terminated.append(sid)

    m, edge = manager(log=log), Edge()
    m.intents = Intents(Ledger(), lease_s=30.0)
    deps = {}
    for sid in ("s1", "s2"):
        deps[sid] = m.deployments[sid] = Deployment(
            edge=edge, setup=setup_response(sid), users=users("1"), url="http://e")
        m.intents.begin(Intent(Entry(server_id=sid, node="n1", app="game", url="http://e",
                                     users=users("1"))))

    def cut_off(dep):
        raise RedisClusterUnreachableError("Redis Cluster cannot be connected")

    with pytest.raises(CloudUnreachable, match="did not answer"):
        m.record(deps["s1"], cut_off, restore=False)
    assert edge.terminated == [] and released == [] and log == []
    assert not m.intents.holds("s1") and "s1" not in m.deployments
    assert deps["s1"].state == "left_to_lease"

    def refused(dep):
        raise Ended(dep.server_id)

    with pytest.raises(Ended):
        m.record(deps["s2"], refused, restore=False)
    assert edge.terminated == ["s2"] and released == ["s2"] and log == []
    assert deps["s2"].state == "withdrawn"


def test_the_deployer_waits_its_connect_timeout_for_an_sshd_then_says_where():
    """A new server's sshd that never speaks SSH (here: a listener that closes each
    connection) is retried for the deployer's `connect_timeout` (an emulated board needs
    more than the default 20 s), then a DeployError names the endpoint."""
    import socket
    import time

    from cloud_manager.deployer import DeployError

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        stop = threading.Event()

        def close_each() -> None:
            listener.settimeout(0.1)
            while not stop.is_set():
                try:
                    listener.accept()[0].close()
                except OSError:
                    continue

        threading.Thread(target=close_each, daemon=True).start()
        port = listener.getsockname()[1]
        deployer = Deployer(*new_key(), connect_timeout=0.6)
        assert Deployer(*new_key()).connect_timeout == 20.0
        t0 = time.monotonic()
        with pytest.raises(DeployError, match=f"no SSH at 127.0.0.1:{port}"):
            deployer.connect(Access(host="127.0.0.1", port=port))
        assert time.monotonic() - t0 >= 0.6
        patient = Deployer(*new_key(), connect_timeout=30.0)
        t0 = time.monotonic()
        with pytest.raises(DeployError):  # the caller's own deadline: one attempt
            patient.connect(Access(host="127.0.0.1", port=port), timeout=0.0)
        assert time.monotonic() - t0 < 10.0
        stop.set()
