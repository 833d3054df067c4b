"""The edge node on real parts: LXC containers, iptables, the node's Redis, SSH, HTTP."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import lxc
import paramiko
import pytest
import requests
from nodes import EdgeNode, destroyed, user_namespace

from enorm import network, sizing
from enorm.firewall import Firewall, Port

pytestmark = pytest.mark.system


def ssh_keypair() -> tuple[paramiko.Ed25519Key, str]:
    """A fresh ed25519 key made by ssh-keygen (paramiko cannot generate ed25519)."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
        key = paramiko.Ed25519Key.from_private_key(io.StringIO(path.read_text()))
        return key, (path.with_suffix(".pub")).read_text().strip()


KEY, PUB = ssh_keypair()


def setup_request(**over) -> dict:
    body = {
        "app": "game",
        "priority": 5,
        "ports": [8080],
        "users": [{"id": "u1", "address": "10.90.0.2"}],
        "latency_objective_ms": 50,
        "ssh_public_key": PUB,
    }
    body.update(over)
    return body


def handshake(node: EdgeNode, owner: str = "cloud-a", **over) -> requests.Response:
    return node.client(owner).post(node.url + "/v1/servers", json=setup_request(**over), timeout=30)


def ssh(node: EdgeNode, port: int, key=KEY) -> paramiko.SSHClient:
    c = paramiko.SSHClient()
    c.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    c.connect(
        "127.0.0.1",
        port=port,
        username="root",
        pkey=key,
        timeout=5,
        allow_agent=False,
        look_for_keys=False,
    )
    return c


def nat_rules(node: EdgeNode) -> list[str]:
    out = subprocess.run(
        ["iptables", "-w", "-t", "nat", "-S"], capture_output=True, text=True, check=True
    ).stdout
    return [ln for ln in out.splitlines() if f"enorm:{node.name}:" in ln]


def cgroup(name: str, item: str) -> str:
    return lxc.Container(name).get_cgroup_item(item)


def test_handshake_launches_a_limited_reachable_container(edge_node):
    node = edge_node(unit={"cores": 0.5, "memory_mb": 128})
    r = handshake(node)
    assert r.status_code == 201, r.text
    body = r.json()
    name = body["container"]
    assert name.startswith(f"enorm-{node.name}-")
    assert lxc.Container(name).running
    # The unit, as the kernel enforces it (cgroup v1 here; v2 keys otherwise).
    assert cgroup(name, "cpu.cfs_quota_us") == "50000"
    assert cgroup(name, "cpu.cfs_period_us") == "100000"
    assert int(cgroup(name, "memory.limit_in_bytes")) == 128 << 20
    assert body["limits"] == {"cores": 0.5, "memory_mb": 128}

    # SSH through the access port with the request's key; a small HTTP server inside.
    c = ssh(node, body["access"]["port"])
    try:
        _, out, _ = c.exec_command("hostname; ip -4 -o addr show eth0")
        text = out.read().decode()
        assert body["address"] in text
        _, out, _ = c.exec_command(
            "echo edge-says-hi > /tmp/hi.txt && "
            "enorm-app start -- python3 -m http.server 8080 --directory /tmp && echo started"
        )
        assert out.read().strip() == b"started"
    finally:
        c.close()
    user_port = body["ports"]["8080"]
    deadline = time.monotonic() + 10
    while True:
        try:
            resp = requests.get(f"http://127.0.0.1:{user_port}/hi.txt", timeout=1)
            break
        except requests.ConnectionError:
            assert time.monotonic() < deadline, "user port never answered"
            time.sleep(0.1)
    assert resp.text == "edge-says-hi\n"

    # From a user device in its own network namespace, to the host's user-facing port.
    with user_namespace(int(node.name[1:])) as (ns, _, host_ip):
        out = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                ns,
                "python3",
                "-c",
                "import urllib.request,sys;"
                f"print(urllib.request.urlopen('http://{host_ip}:{user_port}/hi.txt',"
                "timeout=5).read().decode())",
            ],
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert out.stdout.strip() == "edge-says-hi", out.stderr


def test_ssh_accepts_only_the_requested_key(edge_node):
    node = edge_node()
    body = handshake(node).json()
    ssh(node, body["access"]["port"]).close()
    other, _ = ssh_keypair()
    with pytest.raises(paramiko.AuthenticationException):
        ssh(node, body["access"]["port"], key=other)


def test_rejections_name_reason_and_field(edge_node):
    # Room for exactly one unit; min priority 3; access + one port per server.
    node = edge_node(
        cores=1.0, memory_mb=512, unit={"cores": 1.0, "memory_mb": 256}, min_priority=3
    )
    assert handshake(node).status_code == 201

    r = handshake(node)
    assert r.status_code == 409 and r.json()["error"] == "insufficient_resources"
    assert r.json()["free"]["cores"] == 0

    r = handshake(node, priority=1)
    assert r.status_code == 409  # resources are checked first, as in the paper
    assert r.json()["error"] == "insufficient_resources"

    r = handshake(node, app="bad name")
    assert r.status_code == 400 and r.json()["field"] == "app"
    r = handshake(node, ports=[8080, 8080])
    assert r.status_code == 400 and r.json()["field"] == "ports"
    r = handshake(node, ssh_public_key="not a key")
    assert r.status_code == 400 and r.json()["field"] == "ssh_public_key"
    r = handshake(node, users=[{"id": "u1", "address": "nowhere"}])
    assert r.status_code == 400 and r.json()["field"].startswith("users.0.address")
    r = node.client().post(node.url + "/v1/servers", data="[", timeout=5,
                           headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["field"] == "body"
    r = node.client().post(node.url + "/v1/servers", data="[", timeout=5)
    assert r.status_code == 415 and r.json()["field"] == "Content-Type"

    r = requests.post(node.url + "/v1/servers", json=setup_request(), timeout=5)
    assert r.status_code == 401
    r = requests.get(node.url + "/v1/node", headers={"Authorization": "Bearer nope"}, timeout=5)
    assert r.status_code == 401


def test_priority_and_ports_rejections(edge_node, free_tcp_span):
    node = edge_node(min_priority=3, port_range=free_tcp_span(3))
    r = handshake(node, priority=1)
    assert r.status_code == 409 and r.json()["error"] == "priority"
    # Three host ports: the access port plus two user ports fit once, not twice.
    assert handshake(node, ports=[80, 443]).status_code == 201
    r = handshake(node, ports=[80])
    assert r.status_code == 409 and r.json()["error"] == "ports_unavailable"


def test_other_cloud_managers_servers_are_not_found(edge_node):
    """404, not 403: a tenant cannot even learn that another tenant's server id exists."""
    node = edge_node()
    sid = handshake(node).json()["server_id"]
    b = node.client("cloud-b")
    assert b.get(f"{node.url}/v1/servers/{sid}", timeout=5).status_code == 404
    assert b.delete(f"{node.url}/v1/servers/{sid}", timeout=5).status_code == 404
    assert b.get(f"{node.url}/v1/servers", timeout=5).json() == []
    assert node.client().get(f"{node.url}/v1/servers/{sid}", timeout=5).status_code == 200
    assert node.client().get(f"{node.url}/v1/servers/nosuch", timeout=5).status_code == 404


def test_termination_leaves_nothing_behind(edge_node):
    node = edge_node()
    a = node.client()
    before = a.get(node.url + "/v1/node", timeout=5).json()
    bodies = [handshake(node).json() for _ in range(3)]
    assert len(nat_rules(node)) == 6
    during = a.get(node.url + "/v1/node", timeout=5).json()
    assert during["ports_free"] == before["ports_free"] - 6
    assert during["allocated"]["cores"] == pytest.approx(3 * 0.25)

    # Single termination of one, then the rest through the CLI.
    r = a.delete(f"{node.url}/v1/servers/{bodies[0]['server_id']}", timeout=30)
    assert r.status_code == 200 and r.json()["terminated"] == [bodies[0]["server_id"]]
    node.released()  # its forwards, container and guard go after the answer
    assert not lxc.Container(bodies[0]["container"]).defined
    assert len(nat_rules(node)) == 4
    out = node.cli("terminate", *(b["server_id"] for b in bodies[1:]))
    assert out.returncode == 0, out.stderr
    node.released()

    after = a.get(node.url + "/v1/node", timeout=5).json()
    assert after["ports_free"] == before["ports_free"]
    assert after["allocated"] == {"cores": 0.0, "memory_mb": 0}
    assert nat_rules(node) == []
    assert not [n for n in lxc.list_containers() if n.startswith(f"enorm-{node.name}-")]
    # Freed ports and addresses are handed out again.
    again = handshake(node).json()
    assert again["address"] == bodies[0]["address"]
    assert again["access"]["port"] == bodies[0]["access"]["port"]
    events = a.get(node.url + "/v1/events", timeout=5).json()
    assert [e["type"] for e in events].count("server.terminated") == 3


def test_a_connection_kept_open_to_a_terminated_server_is_reset(edge_node):
    """A client that keeps its connection (HTTP keep-alive, SSH) to a server that is then
    terminated is reset at its next packet, and so connects again where it is sent;
    conntrack would otherwise keep NATing it to the gone container, where it hangs
    until its own timeout."""
    node = edge_node()
    body = handshake(node).json()
    conn = socket.create_connection(("127.0.0.1", body["access"]["port"]), timeout=10)
    assert conn.recv(64).startswith(b"SSH-")  # through the forward, to the container
    r = node.client().delete(f"{node.url}/v1/servers/{body['server_id']}", timeout=30)
    assert r.status_code == 200, r.text
    t0 = time.monotonic()
    with pytest.raises((ConnectionResetError, BrokenPipeError)):
        conn.sendall(b"SSH-2.0-client\r\n")
        assert conn.recv(64) == b"", "answered by a server that is gone"
        raise ConnectionResetError  # closed in order: as good as a reset here
    assert time.monotonic() - t0 < 5  # reset at a retransmission, not at a timeout
    conn.close()


def test_a_reused_address_reaches_its_new_container_at_once(edge_node):
    """The host's neighbour entry for a freed address can still name the old container's
    MAC for up to ~45 s; a new server given that address must not wait it out."""
    node = edge_node(launch_timeout_s=10.0)
    first = handshake(node).json()
    ssh(node, first["access"]["port"]).close()
    r = node.client().delete(f"{node.url}/v1/servers/{first['server_id']}", timeout=30)
    assert r.status_code == 200, r.text
    node.released()  # until then its address is held
    # The state the host is in after recent traffic (the kernel does not always keep it).
    old = network.mac_address(first["server_id"])
    subprocess.run(["ip", "neigh", "replace", first["address"], "lladdr", old, "dev",
                    node.settings["bridge"], "nud", "reachable"], check=True)
    r = handshake(node)
    assert r.status_code == 201, r.text
    again = r.json()
    assert again["address"] == first["address"]
    neigh = subprocess.run(["ip", "neigh", "show", again["address"], "dev",
                            node.settings["bridge"]], capture_output=True, text=True).stdout
    assert network.mac_address(again["server_id"]) in neigh
    assert old not in neigh
    ssh(node, again["access"]["port"]).close()


def test_a_container_does_not_inherit_the_daemons_umask(edge_node):
    """sshd refuses a group-writable /run/sshd, which the container's init makes with the
    umask it inherits; the daemon's own umask can change under it (liblxc, other threads)."""
    node = edge_node(start=False)
    node.start(umask=0o002)
    r = handshake(node)
    assert r.status_code == 201, r.text
    c = ssh(node, r.json()["access"]["port"])
    try:
        _, out, _ = c.exec_command("stat -c %a /run/sshd; umask", timeout=20)
        assert out.read().decode().split() == ["755", "0022"]
    finally:
        c.close()


def test_multiple_termination_takes_the_siblings(edge_node):
    node = edge_node()
    a = node.client()
    ids = [handshake(node, termination="multiple").json()["server_id"] for _ in range(3)]
    other = handshake(node, app="other").json()["server_id"]
    r = a.delete(f"{node.url}/v1/servers/{ids[1]}", timeout=30).json()
    assert sorted(r["terminated"]) == sorted(ids)
    assert [s["id"] for s in a.get(node.url + "/v1/servers", timeout=5).json()] == [other]


def test_restart_after_kill_reconciles(edge_node):
    node = edge_node()
    a = node.client()
    bodies = [handshake(node).json() for _ in range(3)]
    rules_before = sorted(nat_rules(node))
    node.kill()

    # While the daemon is dead: one container vanishes behind its back, an orphan
    # container and a stray rule appear.
    lost = bodies[2]
    lxc.Container(lost["container"]).stop()
    lxc.Container(lost["container"]).destroy()
    base = lxc.Container("enorm-base-debian")
    orphan = f"enorm-{node.name}-0rphan00"
    base.clone(orphan, flags=lxc.LXC_CLONE_SNAPSHOT, bdevtype="overlay")
    chain = f"ENORM-{node.name.upper()}"
    subprocess.run(
        [
            "iptables",
            "-w",
            "-t",
            "nat",
            "-A",
            chain,
            "-p",
            "tcp",
            "--dport",
            "1",
            "-m",
            "comment",
            "--comment",
            f"enorm:{node.name}:deadbeef",
            "-j",
            "DNAT",
            "--to-destination",
            "10.89.0.9:1",
        ],
        check=True,
    )
    # A bridge guard removed by hand, a stray one added: the records win.
    fw = Firewall(node.name, node.settings["subnet"], node.settings["bridge"])
    assert set(fw.guards()) == {b["server_id"] for b in bodies}
    fw.unguard(bodies[0]["server_id"])
    fw.guard("deadbeef", Port(network.host_veth("deadbeef"), network.mac_address("deadbeef"),
                              "10.89.0.9"))
    # Someone changed a limit by hand: the store's value wins.
    lxc.Container(bodies[0]["container"]).set_cgroup_item("cpu.cfs_quota_us", "90000")

    node.start()
    servers = a.get(node.url + "/v1/servers", timeout=5).json()
    assert sorted(s["id"] for s in servers) == sorted(b["server_id"] for b in bodies[:2])
    assert not lxc.Container(orphan).defined
    rules = nat_rules(node)
    assert not any("deadbeef" in r for r in rules)
    assert sorted(rules) == sorted(r for r in rules_before if lost["server_id"] not in r)
    assert cgroup(bodies[0]["container"], "cpu.cfs_quota_us") == "25000"
    assert set(fw.guards()) == {b["server_id"] for b in bodies[:2]}
    for b in bodies[:2]:
        assert lxc.Container(b["container"]).running
        ssh(node, b["access"]["port"]).close()
    events = a.get(node.url + "/v1/events?limit=50", timeout=5).json()
    assert any(
        e["reason"] == "container_lost" and e["server_id"] == lost["server_id"] for e in events
    )


def test_concurrent_handshakes_never_overcommit(edge_node):
    # Room for 10 units of 0.1 core; 16 ask at once.
    node = edge_node(cores=1.0, unit={"cores": 0.1, "memory_mb": 32})
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda _: handshake(node), range(16)))
    codes = sorted(r.status_code for r in results)
    assert codes.count(201) == 10 and codes.count(409) == 6
    ok = [r.json() for r in results if r.status_code == 201]
    ports = [p for b in ok for p in (b["access"]["port"], *b["ports"].values())]
    assert len(set(ports)) == len(ports)
    assert len({b["address"] for b in ok}) == 10
    offer = node.client().get(node.url + "/v1/node", timeout=5).json()
    assert offer["allocated"]["cores"] == pytest.approx(1.0)
    assert offer["free"]["cores"] == pytest.approx(0.0)


def test_operator_cli_and_openapi(edge_node):
    node = edge_node()
    handshake(node)
    sid = handshake(node).json()["server_id"]
    out = node.cli("status")
    assert out.returncode == 0 and f"node\t{node.name}\n" in out.stdout
    assert sid in out.stdout and "running" in out.stdout
    data = json.loads(node.cli("status", "--json").stdout)
    assert data["node"]["servers"] == 2
    assert {s["state"] for s in data["servers"]} == {"running"}
    spec = requests.get(node.url + "/v1/openapi.json", timeout=5).json()
    assert "/v1/servers" in spec["paths"] and "SetupRequest" in spec["components"]["schemas"]
    metrics = requests.get(node.url + "/metrics", timeout=5, headers={
        "Authorization": f"Bearer {node.settings['operator_token']}"}).text
    assert "enorm_handshake_duration_seconds_count 2.0" in metrics
    bad = node.cli("terminate", "nosuch")
    assert bad.returncode != 0 and "404" in bad.stderr and "Traceback" not in bad.stderr


def test_preempt_policy_terminates_lower_priority_tenants(edge_node):
    node = edge_node(cores=1.0, unit={"cores": 0.5, "memory_mb": 64}, admission="preempt")
    low = [handshake(node, priority=p).json() for p in (1, 2)]
    r = handshake(node, priority=1)
    assert r.status_code == 409 and r.json()["error"] == "insufficient_resources"
    high = handshake(node, priority=7)
    assert high.status_code == 201, high.text
    a = node.client()
    ids = {s["id"] for s in a.get(node.url + "/v1/servers", timeout=5).json()}
    assert ids == {low[1]["server_id"], high.json()["server_id"]}
    assert destroyed(low[0]["container"])
    events = a.get(node.url + "/v1/events", timeout=5).json()
    assert any(e["type"] == "server.terminated" and e["reason"] == "preempted"
               and e["server_id"] == low[0]["server_id"] for e in events)


def test_container_that_does_not_come_up_answers_503_and_leaves_nothing(own_base, edge_node):
    # A real container whose init never starts sshd (a base of the test's own): however
    # fast or slow the machine, sshd is not up within the launch timeout.
    lxc_path = own_base(init="/bin/sleep infinity",
                        needs=sizing.Needs(memory_mb=5.0, peak_mb=6.0, start_s=1.0))
    node = edge_node(launch_timeout_s=1.0, lxc_path=str(lxc_path))
    a = node.client()
    before = a.get(node.url + "/v1/node", timeout=5).json()
    r = handshake(node)
    assert r.status_code == 503, r.text
    body = r.json()
    assert body["error"] == "container_start_failed"
    assert "sshd not up" in body["detail"]
    # What was seen, for the operator: the container ran, and what the host knew of it.
    assert "(seen: state RUNNING, processes " in body["detail"]
    assert "neighbour " in body["detail"]
    assert f"on {node.settings['bridge']}," in body["detail"]  # its veth: on the bridge
    assert r.headers["Retry-After"] == "5"
    after = a.get(node.url + "/v1/node", timeout=5).json()
    for k in ("allocated", "servers", "ports_free"):
        assert after[k] == before[k], k
    assert nat_rules(node) == []
    assert not [n for n in lxc.list_containers(config_path=str(lxc_path))
                if n.startswith(f"enorm-{node.name}-")]
    ebt = subprocess.run(["ebtables-save"], capture_output=True, text=True).stdout
    assert f"ENORM-{node.name.upper()}-" not in ebt
    assert a.get(node.url + "/v1/servers", timeout=5).json() == []
    metrics = requests.get(node.url + "/metrics", timeout=5, headers={
        "Authorization": f"Bearer {node.settings['operator_token']}"}).text
    assert 'reason="container_start_failed"' in metrics
