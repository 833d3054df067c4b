"""The Ansible playbook provisions this machine into a working edge node, for real.

The target is the local machine (`connection: local`): a fresh Debian 12 box like a board,
without systemd (so the roles' start-stop-daemon path runs). The test node has its own
name, bridge, subnet, ports, directories, Redis and LXC path (all named `ansbl` /
`enans0` / 10.89.250.0/24), so it does not collide with other nodes on the machine.
Everything it creates is removed at the end, also when the test fails.
"""

from __future__ import annotations

import fcntl
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from enorm import network
from enorm.firewall import Firewall

REPO = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = REPO / "ansible"
BIN = Path(sys.executable).parent
PLAYBOOK = BIN / "ansible-playbook"
LINT = BIN / "ansible-lint"

NAME = "ansbl"
BRIDGE = "enans0"
SUBNET = "10.89.250.0/24"
PORT = 18499
TOKEN = "ansbl-test-token"
ETC = Path("/etc/enorm-ansbl")
RUN = Path("/run/enorm-ansbl")
LOG = Path("/var/log/enorm-ansbl")
VARLIB = Path("/var/lib/enorm-ansbl")
PREFIX = Path("/opt/enorm-ansbl")
LXC_PATH = VARLIB / "lxc"
SERVICE = "enorm-ansbl"
NET_SCRIPT = Path(f"/usr/local/sbin/enorm-net-{BRIDGE}")
SYSCTL_FILE = Path("/etc/sysctl.d/60-enorm-ansbl.conf")
URL = f"http://127.0.0.1:{PORT}"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

# Root, ansible-core and ansible-lint (the project's [dev] extra) are on every machine that
# runs `make test`: a missing one is a failure, not a skip.
pytestmark = [pytest.mark.timeout(1800)]

INVENTORY = f"""\
edge_nodes:
  hosts:
    {NAME}:
      ansible_connection: local
      ansible_python_interpreter: /usr/bin/python3
      enorm_source_dir: {REPO}
      enorm_node_name: {NAME}
      enorm_bridge: {BRIDGE}
      enorm_subnet: {SUBNET}
      enorm_etc_dir: {ETC}
      enorm_run_dir: {RUN}
      enorm_log_dir: {LOG}
      enorm_redis_dir: {VARLIB}/redis
      enorm_redis_service: {SERVICE}-redis
      enorm_prefix: {PREFIX}
      enorm_state_dir: {VARLIB}/state
      enorm_lxc_path: {LXC_PATH}
      enorm_service: {SERVICE}
      enorm_listen_port: {PORT}
      enorm_port_range: [24000, 24099]
      enorm_cores: 1.5
      enorm_memory_mb: 1024
      enorm_reserve_cores: 0.25
      enorm_reserve_memory_mb: 128
      enorm_tokens: {{{TOKEN}: ansbl-cloud}}
      enorm_settings_extra: {{probe: none}}
      lxc_sysctl_file: {SYSCTL_FILE}
"""

RECAP = re.compile(
    r"^(?P<host>\S+)\s*:\s*ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+"
    r"unreachable=(?P<unreachable>\d+)\s+failed=(?P<failed>\d+)",
    re.M,
)


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def _quiet(*cmd: str) -> None:
    """A cleanup step: best effort, never raises."""
    try:
        subprocess.run(list(cmd), capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        pass


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        ANSIBLE_CONFIG=str(ANSIBLE_DIR / "ansible.cfg"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_LOCAL_TEMP=str(tmp / "ansible-tmp"),
        ANSIBLE_HOME=str(tmp / "ansible-home"),
        TMPDIR=str(tmp),  # the controller's packed source goes here
        PATH=f"{BIN}:{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}",
    )
    return env


def playbook(tmp: Path, *extra: str) -> dict[str, int]:
    """Run site.yml against the test inventory; return the host's recap counts."""
    proc = _run(
        [str(PLAYBOOK), "-i", str(tmp / "inventory.yml"), str(ANSIBLE_DIR / "site.yml"), *extra],
        cwd=ANSIBLE_DIR,
        env=_env(tmp),
        timeout=1500,
    )
    out = proc.stdout + proc.stderr
    (tmp / f"playbook{'-check' if extra else ''}-{time.time():.0f}.log").write_text(out)
    recap = {m["host"]: m for m in RECAP.finditer(proc.stdout)}
    assert proc.returncode == 0 and NAME in recap, f"ansible-playbook failed:\n{out[-6000:]}"
    counts = {k: int(v) for k, v in recap[NAME].groupdict().items() if k != "host"}
    print(recap[NAME].group(0))
    return counts


def _stop_pidfile(pidfile: Path, *match: str) -> None:
    _quiet(
        "start-stop-daemon",
        "--stop",
        "--quiet",
        "--oknodo",
        "--retry",
        "TERM/30/KILL/5",
        "--pidfile",
        str(pidfile),
        "--remove-pidfile",
        *match,
    )


def _iptables_cleanup() -> None:
    """Rules and chains of this node only: jumps tagged enorm:ansbl, chains ENORM-ANSBL*."""
    chain = f"ENORM-{NAME.upper()}"
    for table in ("nat", "filter"):
        rules = _run(["iptables", "-w", "-t", table, "-S"]).stdout.splitlines()
        for line in rules:
            if line.startswith("-A ") and (f"enorm:{NAME}" in line or f"-j {chain}" in line):
                parts = shlex.split(line)
                if not parts[1].startswith(chain):
                    _quiet("iptables", "-w", "-t", table, "-D", *parts[1:])
        for line in rules:
            if line.startswith(f"-N {chain}"):
                _quiet("iptables", "-w", "-t", table, "-F", line.split()[1])
        for line in rules:
            if line.startswith(f"-N {chain}"):
                _quiet("iptables", "-w", "-t", table, "-X", line.split()[1])


def _destroy_containers() -> None:
    if not LXC_PATH.is_dir():
        return
    names = _run(["lxc-ls", "-P", str(LXC_PATH), "-1"]).stdout.split()
    # Snapshot clones first, the base container they are made from last.
    for name in sorted(names, key=lambda n: n.startswith("enorm-base-")):
        _quiet("lxc-stop", "-P", str(LXC_PATH), "-n", name, "-k")
        _quiet("lxc-destroy", "-P", str(LXC_PATH), "-n", name, "-f")


def cleanup() -> None:
    """Remove everything this test's node created, and nothing else."""
    try:
        servers = requests.get(f"{URL}/v1/servers", headers=AUTH, timeout=5).json()
        for s in servers if isinstance(servers, list) else servers.get("servers", []):
            requests.delete(f"{URL}/v1/servers/{s['id']}", headers=AUTH, timeout=120)
    except (requests.RequestException, ValueError, KeyError, TypeError):
        pass
    _stop_pidfile(RUN / f"{SERVICE}.pid")
    enorm = PREFIX / "venv" / "bin" / "enorm"
    if enorm.exists() and (ETC / "node.toml").exists():
        _quiet(str(enorm), "down", "--config", str(ETC / "node.toml"))
    _stop_pidfile(RUN / "redis.pid", "--exec", "/usr/bin/redis-server")
    _destroy_containers()
    _iptables_cleanup()
    Firewall(NAME, SUBNET, BRIDGE).reconcile_guards({})  # ebtables guards ENORM-ANSBL-*
    _quiet("ip", "link", "del", BRIDGE)
    while _run(["ip", "route", "del", "unreachable", SUBNET, "metric", "4000"]).returncode == 0:
        pass
    for path in (ETC, RUN, LOG, VARLIB, PREFIX):
        shutil.rmtree(path, ignore_errors=True)
    for path in (NET_SCRIPT, SYSCTL_FILE):
        path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def node_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    # One run of this test per machine at a time: its names are fixed. Concurrent test
    # runs (other checkouts) wait here instead of tearing down each other's node.
    lock = os.open("/run/enorm-ansbl.lock", os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        yield from _node_tmp(tmp_path_factory)
    finally:
        os.close(lock)


def _node_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    busy = socket.socket()
    try:
        if busy.connect_ex(("127.0.0.1", PORT)) == 0:
            pytest.fail(f"port {PORT} is in use: another test node runs")
    finally:
        busy.close()
    tmp = tmp_path_factory.mktemp("ansible")
    # A snapshot of the source: edits made meanwhile must not count as a change.
    shutil.copytree(REPO, tmp / "src", symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", "*.pyc", ".pytest_cache", ".ruff_cache", "*.egg-info"))
    (tmp / "inventory.yml").write_text(INVENTORY.replace(f"enorm_source_dir: {REPO}",
                                                         f"enorm_source_dir: {tmp / 'src'}"))
    (tmp / "ansible-tmp").mkdir()
    cleanup()  # leftovers of an interrupted earlier run of this very test
    try:
        yield tmp
    finally:
        cleanup()


def _ssh_key(tmp: Path) -> str:
    key = tmp / "id_ed25519"
    if not key.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return (tmp / "id_ed25519.pub").read_text().strip()


def _banner(host: str, port: int, timeout: float = 20.0) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=2) as s:
                data = s.recv(64)
                if data:
                    return data
        except OSError:
            pass
        if time.monotonic() > deadline:
            return b""
        time.sleep(0.2)


def test_playbook_provisions_a_working_edge_node(node_tmp: Path) -> None:
    # Check mode on the fresh machine: predicts changes, fails nowhere, touches nothing.
    dry = playbook(node_tmp, "--check")
    assert dry["changed"] > 0
    assert not ETC.exists() and not PREFIX.exists()
    assert _run(["ip", "link", "show", "dev", BRIDGE]).returncode != 0

    first = playbook(node_tmp)
    assert first["failed"] == 0 and first["changed"] > 0

    # The daemon answers its offer to a cloud manager with the token, not without it.
    offer = requests.get(f"{URL}/v1/node", headers=AUTH, timeout=5)
    assert offer.status_code == 200, offer.text
    assert offer.json()["name"] == NAME
    assert requests.get(f"{URL}/v1/node", timeout=5).status_code in (401, 403)

    # The node was built as asked: bridge, route guard, Redis with AOF, pidfiles.
    assert "10.89.250.1/24" in _run(["ip", "-4", "addr", "show", "dev", BRIDGE]).stdout
    # The script's MAC is the daemon's (the second run below would change it otherwise).
    link = _run(["ip", "link", "show", BRIDGE]).stdout
    assert f"link/ether {network.bridge_mac(BRIDGE)} " in link
    guard = _run(["ip", "-4", "route", "show", "type", "unreachable", SUBNET]).stdout
    assert "metric 4000" in guard
    aof = _run(
        ["redis-cli", "-s", str(RUN / "redis" / "redis.sock"), "config", "get", "appendonly"]
    )
    assert aof.stdout.split() == ["appendonly", "yes"]

    # A handshake: the node admits a server into a running container.
    body = {
        "app": "ansbltest",
        "priority": 10,
        "ports": [7000],
        "users": [{"id": "u1", "address": "127.0.0.1"}],
        "latency_objective_ms": 200,
        "ssh_public_key": _ssh_key(node_tmp),
    }
    r = requests.post(f"{URL}/v1/servers", json=body, headers=AUTH, timeout=120)
    assert r.status_code == 201, r.text
    setup = r.json()
    assert setup["container"].startswith(f"enorm-{NAME}-")
    running = _run(["lxc-ls", "-P", str(LXC_PATH), "--running", "-1"]).stdout.split()
    assert setup["container"] in running
    # The access port forwards to the container's sshd (loopback -> DNAT -> container).
    assert _banner(setup["access"]["host"], setup["access"]["port"]).startswith(b"SSH-")

    # Idempotent: a second run changes nothing; the server keeps running.
    second = playbook(node_tmp)
    assert second["changed"] == 0, f"second run changed {second['changed']} task(s)"
    running = _run(["lxc-ls", "-P", str(LXC_PATH), "--running", "-1"]).stdout.split()
    assert setup["container"] in running

    # Check mode works and predicts no change either.
    check = playbook(node_tmp, "--check")
    assert check["changed"] == 0

    # Withdraw the server through the API (the cleanup does it again if this fails).
    d = requests.delete(f"{URL}/v1/servers/{setup['server_id']}", headers=AUTH, timeout=120)
    assert d.status_code in (200, 202, 204), d.text


def test_ansible_lint_is_clean(tmp_path: Path) -> None:
    cache = REPO / ".ansible"  # ansible-lint's cache in the project: removed if it made it
    had_cache = cache.exists()
    try:
        proc = _run(
            [str(LINT), "--offline", "--nocolor", "."],
            cwd=ANSIBLE_DIR, env=_env(tmp_path), timeout=600,
        )
    finally:
        if not had_cache:
            shutil.rmtree(cache, ignore_errors=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
