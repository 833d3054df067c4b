"""The cloud and the edge game server on loopback, each with its own redis-server: a
client follows the redirection config from the cloud to the edge and back."""

from __future__ import annotations

import http.client
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis
import requests
from werkzeug.serving import make_server

from enorm import datasync
from games.pokemon import cloud as cloud_server
from games.pokemon import keys
from games.pokemon.client import GameClient

ROOT = Path(__file__).resolve().parents[2]
LONDON = (51.5072, -0.1276)
PARIS = (48.8566, 2.3522)


@pytest.fixture
def cloud(redis_server, free_tcp_port):
    server = redis_server()
    client = redis.Redis.from_url(server.url)
    port = free_tcp_port()
    url = f"http://127.0.0.1:{port}"
    app = cloud_server.create_app(client, public_url=url)
    http = make_server("127.0.0.1", port, app, threaded=True)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    yield url, client, app
    http.shutdown()
    thread.join(5)


@pytest.fixture
def edge_factory(redis_server, tmp_path, free_tcp_port, wait_tcp_port):
    procs: list[subprocess.Popen] = []

    def start(cloud_url: str):
        server = redis_server()
        port = free_tcp_port()
        log = tmp_path / f"edge-{port}" / "requests.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "games.pokemon.edge", "--host", "127.0.0.1",
             "--port", str(port), "--cloud", cloud_url, "--redis", server.url,
             "--log", str(log), "--push-interval", "0.2"],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=(tmp_path / f"edge-{port}.out").open("wb"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        procs.append(proc)
        wait_tcp_port(port)
        return f"http://127.0.0.1:{port}", redis.Redis.from_url(server.url), proc, log

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def play(c: GameClient, where: tuple[float, float], catches: int = 3) -> list[dict]:
    c.update(*where)
    got = []
    for w in c.wild()["wild"][:catches]:
        for _ in range(5):
            r = c.request("POST", "/pm", json={"spawn": w["spawn"]})
            if r.status_code == 200 and r.json()["caught"]:
                got.append(r.json()["pokemon"])
                break
    return got


def test_client_follows_config_to_edge_and_back(cloud, edge_factory):
    cloud_url, cloud_redis, app = cloud
    stats = app.extensions["pokemon"]["stats"]
    alice = GameClient(cloud_url, "google", "alice@example.org")
    bob = GameClient(cloud_url, "google", "bob@example.org")
    alice.login()
    bob.login()
    assert alice.server == cloud_url
    caught_in_cloud = play(alice, LONDON)
    play(bob, LONDON, catches=1)

    # Deployment: copy alice's keys to the edge, then redirect her.
    edge_url, edge_redis, edge_proc, log = edge_factory(cloud_url)
    report = datasync.copy_users(cloud_redis, edge_redis, [alice.user])
    assert report.verified and report.keys >= 4
    cloud_server.redirect(cloud_redis, [alice.user], edge_url)

    cloud_seen = stats.snapshot()["by_user"].get(alice.user, 0)
    before = stats.snapshot()["by_path"]
    # alice still talks to the cloud until her next request is refused with a hint
    assert alice.me()["pokemon"] == len(caught_in_cloud)
    assert alice.server == edge_url
    caught_on_edge = play(alice, PARIS)
    assert alice.pokedex()
    assert len(alice.party()) == min(6, len(caught_in_cloud) + len(caught_on_edge))
    if caught_on_edge:
        assert alice.pokemon(caught_on_edge[0]["uid"])["region"] == caught_on_edge[0]["region"]
    after = stats.snapshot()
    # The cloud saw only the one request refused with the hint (and /config), none after.
    game_paths = ("/u", "/update", "/wpm", "/pm", "/pm/<pm_uid>", "/6pm", "/pd")
    assert sum(after["by_path"].get(p, 0) - before.get(p, 0) for p in game_paths) == 1
    assert after["by_user"][alice.user] - cloud_seen == 1 + 1  # the refused /u, one /config
    play(bob, LONDON, catches=0)  # bob keeps playing on the cloud
    assert bob.server == cloud_url

    # The edge pushed the new region codes to the cloud's global map.
    paris = re.escape(alice.me()["location"]["region"])
    deadline = time.monotonic() + 5
    while not cloud_redis.sismember(keys.REGIONS, alice.me()["location"]["region"]):
        assert time.monotonic() < deadline, f"region {paris} never reached the cloud"
        time.sleep(0.05)
    edge_stats = requests.get(edge_url + "/stats", timeout=5).json()
    assert edge_stats["cloud"]["requests"] >= 1 and edge_stats["cloud"]["bytes"] > 0
    assert edge_stats["by_path"]["/update"] == 1

    # Termination: stop the edge, merge back, restore; alice goes home unnoticed.
    edge_proc.send_signal(signal.SIGTERM)
    edge_proc.wait(5)
    merged = datasync.merge_back(
        edge_redis, cloud_redis, shared_patterns=keys.SHARED_PATTERNS, user_ids=[alice.user]
    )
    assert merged.verified and merged.merged >= 2
    cloud_server.restore(cloud_redis, [alice.user])
    me = alice.me()  # connection refused -> /config -> cloud
    assert alice.server == cloud_url
    assert alice.servers_used == [cloud_url, edge_url, cloud_url]
    assert me["pokemon"] == len(caught_in_cloud) + len(caught_on_edge)
    assert me["location"]["region"] == alice.me()["location"]["region"]

    # The request log: one line per edge request, `<unix ts> <path> <duration_ms>`.
    lines = log.read_text().splitlines()
    assert len(lines) == edge_stats["requests"] + 1  # + the /stats request itself
    for line in lines:
        ts, path, ms = line.split(" ")
        assert abs(float(ts) - time.time()) < 120 and path.startswith("/") and float(ms) >= 0


def test_edge_refuses_unknown_users_with_a_hint(cloud, edge_factory):
    cloud_url, *_ = cloud
    edge_url, *_ = edge_factory(cloud_url)
    r = requests.get(edge_url + "/u", headers={"X-User": "99", "X-Token": "x"}, timeout=5)
    assert r.status_code == 404 and r.json()["redirect"] == cloud_url
    r = requests.get(cloud_url + "/config", params={"user": "99"}, timeout=5)
    assert r.json() == {"user": "99", "server": cloud_url}


def test_edge_server_keeps_connections_alive(cloud, edge_factory):
    """A player's requests ride one TCP connection (waitress, HTTP/1.1 keep-alive; the
    development server closed each one) and each is one line in the request log."""
    cloud_url, cloud_redis, _ = cloud
    edge_url, edge_redis, _, log = edge_factory(cloud_url)
    alice = GameClient(cloud_url, "google", "alice@example.org")
    alice.login()
    datasync.copy_users(cloud_redis, edge_redis, [alice.user])
    conn = http.client.HTTPConnection(*edge_url.removeprefix("http://").split(":"), timeout=5)
    headers = {"X-User": alice.user, "X-Token": alice.token}
    socks = set()
    for path in ("/u", "/pd", "/6pm", "/u"):
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        assert resp.status == 200 and resp.version == 11 and not resp.will_close
        resp.read()
        socks.add(id(conn.sock))
    conn.close()
    assert len(socks) == 1  # one connection for the four requests
    lines = [ln.split(" ") for ln in log.read_text().splitlines()]
    assert [path for _, path, _ in lines] == ["/u", "/pd", "/6pm", "/u"]
    assert all(float(ms) >= 0 for _, _, ms in lines)


def test_edge_server_without_waitress_says_so():
    """An image without python3-waitress: the edge server exits at once and says what
    is missing (in the container's app log), rather than serving on something else."""
    code = ("import sys; sys.modules['waitress'] = None; "
            "from games.pokemon.edge import main; main(['--port', '0', '--log', ''])")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=30)  # fmt: skip
    assert r.returncode == 1
    assert "waitress is not installed" in r.stderr and "python3-waitress" in r.stderr
    assert "Traceback" not in r.stderr


def test_cloud_server_queues_requests_beyond_its_redis_connections(redis_server, free_tcp_port):
    """More requests at once than Redis connections: they wait for one, none fails
    (a plain redis-py 8 pool raises MaxConnectionsError instead)."""
    server = redis_server()
    port = free_tcp_port()
    client = cloud_server.connect_redis(server.url, connections=2)
    http = make_server("127.0.0.1", port, cloud_server.create_app(client), threaded=True)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{port}"
        codes: list[int] = []
        start = threading.Barrier(40)

        def login(i: int) -> None:
            start.wait()
            r = requests.post(f"{url}/id", json={"provider": "t", "identity": f"pool{i}"},
                              timeout=30)  # fmt: skip
            codes.append(r.status_code)

        threads = [threading.Thread(target=login, args=(i,)) for i in range(40)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert codes == [201] * 40  # each one created
        assert client.connection_pool.max_connections == 2
    finally:
        http.shutdown()
        thread.join(5)
