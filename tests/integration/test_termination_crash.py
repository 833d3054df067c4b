"""An edge-initiated termination is never lost: kill -9 of the daemon at each step, a
restart, and the cloud's callback learns of the termination, with the data merged."""

from __future__ import annotations

import threading
import time

import lxc
import pytest
import redis
import requests
from flask import Flask, request
from test_datasync import fill_users
from test_edge_node import handshake
from werkzeug.serving import make_server

from enorm import datasync
from games.pokemon import keys

pytestmark = pytest.mark.system


class Receiver:
    """The cloud's callback endpoint on 127.0.0.1: keeps every event posted to it."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        app = Flask("receiver")

        @app.post("/edge-events")
        def _event():
            self.events.append(request.get_json())
            return {"ok": True}

        self._http = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self._http.server_port}/edge-events"
        threading.Thread(target=self._http.serve_forever, daemon=True).start()

    def terminated(self, sid: str) -> list[dict]:
        return [e for e in self.events if e["type"] == "server.terminated"
                and e["server_id"] == sid]

    def close(self) -> None:
        self._http.shutdown()


@pytest.mark.parametrize("point", ["terminate.started", "terminate.merged",
                                   "terminate.stopped", "terminate.forgotten",
                                   "terminate.released"])
def test_kill_at_each_step_of_a_termination(edge_node, redis_server, monkeypatch, point):
    sink = redis_server()
    cloud = datasync.connect(sink.url)
    fill_users(cloud, ["u1"])
    receiver = Receiver()
    try:
        node = edge_node(start=False)
        monkeypatch.setenv("ENORM_FAULT", point)
        node.start()
        monkeypatch.delenv("ENORM_FAULT")
        body = handshake(node, users=[{"id": "u1", "address": "10.90.0.2"}],
                         data_sink={"url": sink.url}, callback_url=receiver.url).json()
        sid = body["server_id"]
        edge = redis.Redis(host=body["address"], port=6379, password=body["redis_password"])
        datasync.copy_users(cloud, edge, ["u1"], manifest=datasync.manifest_key(sid))
        edge.hset(keys.user("u1"), "xp", 777)
        op = {"Authorization": f"Bearer {node.settings['operator_token']}"}
        try:  # the release (after the answer) may die before or after the answer went
            r = requests.delete(f"{node.url}/v1/servers/{sid}", headers=op, timeout=60)
            assert point == "terminate.released" and r.status_code == 200, r.status_code
        except requests.RequestException:
            pass
        assert node.proc is not None and node.proc.wait(30) == 70  # died at `point`
        node.start()  # reconciles: finishes the termination or delivers its event
        deadline = time.monotonic() + 30
        while not receiver.terminated(sid) and time.monotonic() < deadline:
            time.sleep(0.1)
        got = receiver.terminated(sid)
        assert got, f"no server.terminated for {sid} after a crash at {point}"
        assert {e["id"] for e in got} == {got[0]["id"]}  # one event (maybe resent)
        assert got[0]["reason"] == "cloud_withdrawal"  # the reason it began with
        assert cloud.hget(keys.user("u1"), "xp") == b"777"  # the data came home first
        assert requests.get(f"{node.url}/v1/servers/{sid}", headers=op,
                            timeout=10).status_code == 404
        assert body["container"] not in lxc.list_containers()
    finally:
        receiver.close()
