"""The auto-scaler on real containers: cgroup limits grow and shrink, and a growing basic
service makes the node terminate its lowest-priority tenant (data back in the cloud Redis,
event at the cloud's callback).

Latency is driven deterministically: computing latency from lines the test writes into
the request log on the host side of the container's overlay; network latency from TCP
probes of users at loopback addresses (127.0.0.0/8, answered with an RST at once).
Rounds run only when the test asks (`POST /v1/autoscale`, `enorm autoscale --once`); the
schedule's interval is an hour.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import lxc
import psutil
import pytest
import redis
import requests
from nodes import EdgeNode, destroyed

pytestmark = pytest.mark.system

LXC_PATH = Path("/var/lib/lxc")
REQUEST_LOG = "overlay/delta/var/log/enorm-app/requests.log"
QUIET = 3600.0  # autoscale_interval_s: only the test's own rounds run


def ssh_public_key() -> str:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
                       check=True)
        return path.with_suffix(".pub").read_text().strip()


PUB = ssh_public_key()


def launch(node: EdgeNode, *, priority: int, users: list[str], **over) -> dict:
    body = {
        "app": "game",
        "priority": priority,
        "ports": [8080],
        "users": [{"id": f"u{i}", "address": a} for i, a in enumerate(users)],
        "latency_objective_ms": 50,
        "ssh_public_key": PUB,
        **over,
    }
    r = node.client().post(node.url + "/v1/servers", json=body, timeout=60)
    assert r.status_code == 201, r.text
    return r.json()


def autoscale(node: EdgeNode) -> dict:
    r = requests.post(node.url + "/v1/autoscale", timeout=120,
                      headers={"Authorization": f"Bearer {node.settings['operator_token']}"})
    assert r.status_code == 200, r.text
    report = r.json()
    assert report["error"] is None, report
    return report


def write_requests(container: str, durations_ms: list[float]) -> None:
    """Append request-log lines as the game's edge server would (host side of the overlay)."""
    path = LXC_PATH / container / REQUEST_LOG
    path.parent.mkdir(parents=True, exist_ok=True)
    now = time.time()
    with path.open("a") as f:
        for i, d in enumerate(durations_ms):
            f.write(f"{now - len(durations_ms) + i:.3f} /api/location {d}\n")


def cgroup_limits(container: str) -> tuple[int, int]:
    """(cpu.cfs_quota_us, memory.limit_in_bytes) as the kernel enforces them (cgroup v1)."""
    c = lxc.Container(container)
    return int(c.get_cgroup_item("cpu.cfs_quota_us")), int(
        c.get_cgroup_item("memory.limit_in_bytes"))


def actions_for(report: dict, sid: str) -> list[dict]:
    return [a for a in report["plan"] if a["server_id"] == sid]


# ----------------------------------------------------------------------------- scaling


def test_over_objective_grows_under_objective_shrinks_to_one_unit(edge_node):
    unit_quota, unit_mem = 25_000, 64 << 20  # 0.25 core, 64 MB
    node = edge_node(unit={"cores": 0.25, "memory_mb": 64}, autoscale_interval_s=QUIET)
    a = launch(node, priority=8, users=["127.0.0.1", "127.0.0.2"])
    b = launch(node, priority=4, users=["127.0.0.3"])
    for s in (a, b):
        assert cgroup_limits(s["container"]) == (unit_quota, unit_mem)

    # Round 1: both far over their 50 ms objective -> one more unit each.
    write_requests(a["container"], [180, 220, 200])
    write_requests(b["container"], [120, 140])
    r1 = autoscale(node)
    acts = {x["server_id"]: x for x in r1["plan"]}
    assert acts[a["server_id"]]["action"] == "ScaleUp"
    assert acts[a["server_id"]]["reason"] == "latency_above_objective"
    assert acts[a["server_id"]]["numbers"]["computing_ms"] == pytest.approx(200)
    assert acts[b["server_id"]]["action"] == "ScaleUp"
    assert all(x["ok"] for x in r1["results"])
    for s in (a, b):
        assert cgroup_limits(s["container"]) == (2 * unit_quota, 2 * unit_mem)

    # Round 2: a still over, b now well under -> a grows again, b shrinks by one unit.
    write_requests(a["container"], [90, 110])
    write_requests(b["container"], [2, 4, 3])
    r2 = autoscale(node)
    assert [x["action"] for x in actions_for(r2, a["server_id"])] == ["ScaleUp"]
    down = actions_for(r2, b["server_id"])
    assert [x["action"] for x in down] == ["ScaleDown"]
    assert down[0]["reason"] == "latency_below_objective"
    assert down[0]["new_limits"] == {"cores": 0.25, "memory_mb": 64}
    assert cgroup_limits(a["container"]) == (3 * unit_quota, 3 * unit_mem)
    assert cgroup_limits(b["container"]) == (unit_quota, unit_mem)

    # Round 3 (through the CLI): b is still under its objective but at one unit: no lower.
    write_requests(b["container"], [1, 1])
    out = node.cli("autoscale", "--once")
    assert out.returncode == 0, out.stdout + out.stderr
    r3 = json.loads(out.stdout)
    assert {"servers", "free", "plan", "results"} <= r3.keys()
    assert actions_for(r3, b["server_id"]) == []
    seen_b = next(s for s in r3["servers"] if s["id"] == b["server_id"])
    assert seen_b["latency_ms"] < seen_b["objective_ms"]
    assert cgroup_limits(b["container"]) == (unit_quota, unit_mem)

    # The limits the node reports agree with the kernel; every change is an event.
    servers = {s["id"]: s for s in node.client().get(node.url + "/v1/servers", timeout=5).json()}
    assert servers[b["server_id"]]["limits"] == {"cores": 0.25, "memory_mb": 64}
    events = node.client().get(node.url + "/v1/events?limit=100", timeout=5).json()
    scaled = [e for e in events if e["type"] == "server.scaled"]
    assert len([e for e in scaled if e["server_id"] == b["server_id"]]) == 2
    assert any(e["reason"] == "latency_below_objective" and e["data"]["to"]["cores"] == 0.25
               for e in scaled)


# ----------------------------------------------------------------------------- basic service


class Callbacks:
    """A tiny cloud-side HTTP endpoint on 127.0.0.1 collecting the edge's events."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self.cond = threading.Condition()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with outer.cond:
                    outer.events.append(json.loads(body))
                    outer.cond.notify_all()
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/enorm/events"

    def wait_for(self, type_: str, server_id: str, timeout: float = 20.0) -> dict:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for e in self.events:
                    if e["type"] == type_ and e["server_id"] == server_id:
                        return e
                left = deadline - time.monotonic()
                assert left > 0, f"no {type_} for {server_id}; got {self.events}"
                self.cond.wait(left)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def callbacks() -> Iterator[Callbacks]:
    cb = Callbacks()
    yield cb
    cb.close()


@pytest.fixture
def memory_load() -> Iterator:
    """`memory_load(mb)`: a host process (this test's own) that holds `mb` MB resident."""
    procs: list[subprocess.Popen] = []

    def start(mb: int) -> subprocess.Popen:
        code = (f"import sys, time\nx = b'\\x01' * ({mb} << 20)\n"
                "print('ready', flush=True)\nsys.stdin.read()\n")
        p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        procs.append(p)
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(10)


def used_mb() -> float:
    vm = psutil.virtual_memory()
    return (vm.total - vm.available) / (1 << 20)


def test_growing_basic_service_terminates_the_lowest_priority_tenant(
    redis_server, callbacks, memory_load, edge_node
):
    # edge_node last: its teardown (`enorm down`, which merges back into the sink and
    # reports to the callback) runs before the cloud Redis and the callback go away.
    unit_mb = 1024
    headroom_mb = 1024
    # The node's memory is what the machine uses now, three units and some headroom; its
    # cores are plenty (memory is the dimension this test squeezes, CPU is too noisy).
    capacity_mb = int(used_mb()) + 3 * unit_mb + headroom_mb
    node = edge_node(
        cores=64.0,
        memory_mb=capacity_mb,
        unit={"cores": 0.25, "memory_mb": unit_mb},
        basic_service="measured",
        autoscale_interval_s=QUIET,
    )
    cloud = redis_server()
    sink = {"url": cloud.url}
    servers = {
        p: launch(node, priority=p, users=[f"127.0.1.{p}"], data_sink=sink,
                  callback_url=callbacks.url)
        for p in (9, 6, 3)
    }
    low = servers[3]

    # The lowest tenant's user (u0) played at the edge: its data lives in its Redis.
    edge = redis.Redis(host=low["address"], port=6379, password=low["redis_password"],
                       socket_timeout=5)
    deadline = time.monotonic() + 10
    while True:
        try:
            edge.ping()
            break
        except redis.ConnectionError:
            assert time.monotonic() < deadline, "container Redis never answered"
            time.sleep(0.05)
    edge.hset("u:{u0}", mapping={"name": "ash", "level": "7"})
    edge.set("loc:{u0}", "51.5,-0.1")
    edge.rpush("pokedex:{u0}", "pikachu", "eevee")

    # A quiet round: everything fits, nobody is terminated.
    r0 = autoscale(node)
    assert not [x for x in r0["plan"] if x["action"] == "Terminate"], r0
    assert r0["free"]["memory_mb"] >= 0

    # The basic service grows by the headroom and half a unit: free goes below zero.
    memory_load(headroom_mb + unit_mb // 2)
    r1 = autoscale(node)
    assert r1["free"]["memory_mb"] < 0, r1["free"]
    terminated = [x for x in r1["plan"] if x["action"] == "Terminate"]
    assert [x["server_id"] for x in terminated] == [low["server_id"]], r1
    assert terminated[0]["reason"] == "insufficient_resources"
    assert all(x["ok"] for x in r1["results"]), r1["results"]

    # Gone from the node, its container destroyed; the higher tenants stay.
    left = {s["id"] for s in node.client().get(node.url + "/v1/servers", timeout=5).json()}
    assert left == {servers[9]["server_id"], servers[6]["server_id"]}
    assert destroyed(low["container"])

    # Its data is back in the cloud Redis.
    c = redis.Redis.from_url(cloud.url, decode_responses=True)
    assert c.hgetall("u:{u0}") == {"name": "ash", "level": "7"}
    assert c.get("loc:{u0}") == "51.5,-0.1"
    assert c.lrange("pokedex:{u0}", 0, -1) == ["pikachu", "eevee"]

    # The cloud was told, with the reason and the keys moved.
    ev = callbacks.wait_for("server.terminated", low["server_id"])
    assert ev["reason"] == "insufficient_resources"
    assert ev["data"]["keys_migrated"] >= 3

    # With the load still there, the basic service has its headroom back: the next round
    # sees free >= 0 and terminates nobody else.
    r2 = autoscale(node)
    assert r2["free"]["memory_mb"] >= 0, r2["free"]
    assert not [x for x in r2["plan"] if x["action"] == "Terminate"], r2
    offer = node.client().get(node.url + "/v1/node", timeout=5).json()
    assert offer["basic_service"]["memory_mb"] >= headroom_mb


# ----------------------------------------------------------------------------- priorities


def test_dynamic_priorities_let_a_busy_server_evict_an_unused_one(edge_node):
    """Two quarter-core servers fill a half-core node. The slow one (declared 5) needs
    one more unit; the other (declared 6) has had no request for half its idle timeout.
    With dynamic priorities the round sees 6 against 5, evicts the unused server and
    grows the slow one; the report shows both priorities."""
    idle_after_s = 8.0
    node = edge_node(cores=0.5, unit={"cores": 0.25, "memory_mb": 64},
                     autoscale_interval_s=QUIET, idle_after_s=idle_after_s,
                     dynamic_priorities=True)  # fmt: skip
    unused = launch(node, priority=6, users=["127.0.2.1"])
    born = time.monotonic()
    slow = launch(node, priority=5, users=["127.0.2.2"])
    time.sleep(max(0.0, born + idle_after_s / 2 + 0.5 - time.monotonic()))
    write_requests(slow["container"], [180, 220, 200])
    report = autoscale(node)
    assert time.monotonic() - born < idle_after_s  # not yet idle enough to be terminated
    seen = {s["id"]: (s["priority"], s["declared_priority"]) for s in report["servers"]}
    assert seen == {slow["server_id"]: (6, 5), unused["server_id"]: (5, 6)}
    assert [(x["action"], x["server_id"], x["reason"]) for x in report["plan"]] == [
        ("Terminate", unused["server_id"], "evicted_for_higher_priority"),
        ("ScaleUp", slow["server_id"], "latency_above_objective")]
    assert all(x["ok"] for x in report["results"])
    assert cgroup_limits(slow["container"])[0] == 50_000
    assert destroyed(unused["container"])
