"""The board lab's pure parts (the lab itself runs in `make boards`, not here): where
packages come from, the VMs' network, the wheelhouse's platforms, the inventory."""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench.boards import disk, lab, provisioned, sources, vm, wheelhouse
from enorm import pressure, resources
from enorm.protocol import Resources

DEB822 = """\
Types: deb
# a snapshot comment
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main

Types: deb-src
URIs: http://mirror.example/debian
Suites: bookworm
Components: main

Types: deb
URIs: https://vendor.example/node_20.x
Suites: nodistro
Components: main
"""


def apt_root(tmp_path: Path) -> Path:
    d = tmp_path / "etc/apt"
    (d / "sources.list.d").mkdir(parents=True)
    (d / "sources.list.d/debian.sources").write_text(DEB822)
    (d / "sources.list.d/vendor.list").write_text(
        "deb [signed-by=/k.gpg arch=amd64] https://packages.vendor.example/apt cloud-sdk main\n"
        "deb http://vendor.example/raspi bookworm main\n")
    lists = tmp_path / "var/lib/apt/lists"
    lists.mkdir(parents=True)
    (lists / "vendor.example_raspi_dists_bookworm_InRelease").write_text(
        "Origin: Raspberry Pi Foundation\nLabel: Raspberry Pi Foundation\n"
        "Suite: stable\nCodename: bookworm\n")
    return tmp_path


def test_a_boards_apt_gets_the_machines_debian_entries_for_the_release(tmp_path) -> None:
    """The release and its companions, from the machine's Debian archives only: not a
    vendor archive serving the same suite, not another suite, not deb-src."""
    assert sources.debian_lines("bookworm", apt_root(tmp_path)).splitlines() == [
        "deb http://mirror.example/debian bookworm main",
        "deb http://mirror.example/debian bookworm-updates main",
        "deb http://mirror.example/debian-security bookworm-security main"]


def test_no_debian_source_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "etc/apt/sources.list.d").mkdir(parents=True)
    with pytest.raises(RuntimeError, match="no apt source of this machine serves Debian "
                                           "bookworm"):
        sources.debian_lines("bookworm", tmp_path)


def spec(tmp_path: Path, arch: str = "arm64") -> vm.Spec:
    d = disk.Disk(arch, tmp_path / "root.img", tmp_path / "vmlinuz", tmp_path / "initrd", 0)
    return vm.Spec(arch, d, tmp_path / "o.qcow2", tmp_path / "c.log", tmp_path / "pid",
                   hostfwd={2222: 22, 8471: 8470}, guestfwd={3142: 41000, 6379: 41001})


def test_the_vm_reaches_only_the_forwards_it_names(tmp_path: Path) -> None:
    nic = vm.netdev(spec(tmp_path)).split(",")
    assert "restrict=on" in nic and "ipv6=off" in nic
    fwd = [p for p in nic if "fwd=" in p]
    assert fwd == ["hostfwd=tcp:127.0.0.1:2222-:22", "hostfwd=tcp:127.0.0.1:8471-:8470",
                   f"guestfwd=tcp:{vm.HOST_ALIAS}:3142-cmd:socat STDIO TCP:127.0.0.1:41000",
                   f"guestfwd=tcp:{vm.HOST_ALIAS}:6379-cmd:socat STDIO TCP:127.0.0.1:41001"]


def test_the_board_is_a_1_gb_4_cpu_cortex_a72_on_tcg(tmp_path: Path) -> None:
    s = spec(tmp_path)
    s.cmdline_extra = "cgroup_disable=memory"
    cmd = vm.command(s)
    assert cmd[:5] == ["qemu-system-aarch64", "-M", "virt", "-cpu", "cortex-a72"]
    assert cmd[cmd.index("-smp") + 1] == "4" and cmd[cmd.index("-m") + 1] == "1024"
    assert cmd[cmd.index("-accel") + 1] == "tcg,thread=multi"
    assert cmd[cmd.index("-append") + 1] == \
        "console=ttyAMA0 root=/dev/vda rw cgroup_disable=memory"
    assert vm.command(spec(tmp_path, "amd64"))[0] == "qemu-system-x86_64"
    # the overlay is made on the fresh disk (raw), or on a provisioned one (qcow2)
    assert s.backing_disk == (tmp_path / "root.img", "raw")
    s.backing = tmp_path / "provisioned-k.qcow2"
    assert s.backing_disk == (tmp_path / "provisioned-k.qcow2", "qcow2")


def test_wheels_for_the_boards_platform() -> None:
    tags = wheelhouse.platforms("arm64")
    assert tags[0] == "manylinux_2_36_aarch64" and "manylinux2014_aarch64" in tags
    assert all("x86_64" not in t for t in tags)
    args = wheelhouse.download_args("arm64", Path("/w"))
    # sdists are allowed for what has no wheel: --no-deps, never --only-binary
    assert "--no-deps" in args and "--prefer-binary" in args and "--only-binary" not in args
    assert args[args.index("--python-version") + 1] == "3.11"
    report = {"install": [{"metadata": {"name": "enorm", "version": "0.1.0"}},
                          {"metadata": {"name": "redis", "version": "8.2.0"}},
                          {"metadata": {"name": "Flask", "version": "3.1.3"}}]}
    assert wheelhouse.pins(report) == ["Flask==3.1.3", "redis==8.2.0"]


def test_the_inventory_sends_apt_and_pip_through_the_host(tmp_path: Path) -> None:
    ports = lab.Ports(ssh=1, api=2, node=tuple(range(30000, 30016)), apt=3, redis=4, http=5)
    inv = lab.inventory("arm64", ports, source=tmp_path / "src", wheelhouse=tmp_path / "w",
                        image_tarball=None, key=tmp_path / "k")
    host = inv["edge_nodes"]["hosts"]["enorm-board-arm64"]
    assert host["enorm_apt_proxy"] == f"http://{vm.HOST_ALIAS}:3"
    assert host["enorm_pip_wheelhouse"] == str(tmp_path / "w")
    assert host["enorm_port_range"] == [30000, 30015]
    assert host["ansible_host"] == "127.0.0.1" and host["ansible_port"] == 1
    # the node may send its data and events to the cloud's two forwards, nothing else
    assert host["enorm_destinations"] == {"board-cloud": [f"{vm.HOST_ALIAS}:4",
                                                          f"{vm.HOST_ALIAS}:5"]}
    assert "enorm_image_tarball" not in host


def test_the_disk_is_built_again_when_its_recipe_changes() -> None:
    a = disk.recipe("arm64", "deb http://m/debian bookworm main", "ssh-ed25519 AAA lab")
    b = disk.recipe("arm64", "deb http://m/debian bookworm main", "ssh-ed25519 BBB lab")
    assert disk.digest(a) != disk.digest(b)
    assert disk.digest(a) == disk.digest(dict(a))
    assert "linux-image-arm64" in a["packages"] and "systemd-sysv" in a["packages"]


def _offer(capacity: int, reserved: int, basic: int, allocated: int) -> dict:
    return {k: {"cores": 1.0, "memory_mb": v} for k, v in
            (("capacity", capacity), ("reserved", reserved), ("basic_service", basic),
             ("allocated", allocated))}


def _ended_by_the_watcher(offer: dict, own_mb: int, headroom: int, tenants: list) -> list:
    """What the node's pressure watcher ends, look after look, when the board's own
    processes take `own_mb` more (its policy and arithmetic, as protect_basic_service)."""
    m = {k: v["memory_mb"] for k, v in offer.items()}
    basic = m["basic_service"] + own_mb
    ended: list = []
    for _ in range(3):
        left = resources.free(Resources(cores=4, memory_mb=m["capacity"]),
                              Resources(cores=0, memory_mb=m["reserved"]),
                              Resources(cores=0, memory_mb=basic),
                              resources.total(t.limits for t in tenants
                                              if t.id not in ended)).memory_mb
        ended += pressure.evictions([t for t in tenants if t.id not in ended], headroom - left)
    return ended


@pytest.mark.parametrize("basic, noise", [(250, 0), (250, 30), (250, -30), (330, 8)])
def test_the_pressure_step_makes_the_watcher_end_the_low_tenant_only(basic, noise) -> None:
    """The 1 GB board of the lab: two tenants of 80 MB, priority 1 and 9. The hog sized
    from the node's offer (plus a growth step or noise) ends the low one and keeps the
    high one, look after look; the hog of the run of 2026-12-07 (up to 700 MB) ended
    both."""
    low = SimpleNamespace(id="low", priority=1, created_at=1.0, state="running",
                          limits=Resources(cores=0.25, memory_mb=80))
    high = SimpleNamespace(id="high", priority=9, created_at=2.0, state="running",
                           limits=Resources(cores=0.25, memory_mb=80))
    offer = _offer(977, 192, basic, 160)
    grow = lab.hog_mb(offer, 80, 96)
    assert _ended_by_the_watcher(offer, grow + noise, 96, [low, high]) == ["low"]
    assert _ended_by_the_watcher(offer, 700, 96, [low, high]) == ["low", "high"]
    with pytest.raises(lab.CheckFailed, match="reserve"):
        lab.hog_mb(_offer(512, 400, 100, 80), 80, 96)


@pytest.mark.parametrize("now, more", [(0, "10"), (10, "0"), (15, "0")])
def test_the_vm_runs_at_nice_10_not_10_more_than_make(monkeypatch, now, more) -> None:
    import bench.boards as boards

    monkeypatch.setattr(boards.os, "nice", lambda inc: now)
    assert boards.at_nice() == ["nice", "-n", more]


def test_the_onboard_figures_send_a_setup_request_the_node_takes(tmp_path: Path) -> None:
    """The figures step on the amd64 board got 400 for every server: the key was read
    from the host's .pub file, newline included, and the API takes one line without it."""
    from bench.boards.onboard import setup_body
    from enorm.protocol import SetupRequest

    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")],
                   check=True)
    text = (tmp_path / "k.pub").read_text()
    assert text.endswith("\n")
    req = SetupRequest.model_validate(setup_body(text))
    assert req.ssh_public_key == text.strip() and req.ports == [8080]


def test_the_onboard_figures_read_the_nodes_config_in_a_process_of_its_own(
        tmp_path: Path) -> None:
    """The measuring process is counted as the board's own use beside the 8 servers: it
    reads the node's config (its derived names, the operator token made at first start)
    through a child, and keeps neither the config loader nor the daemon's imports."""
    import sys

    from bench.boards import onboard

    (tmp_path / "node.toml").write_text(
        f'name = "b1"\nlisten_port = 18555\nstate_dir = "{tmp_path}/state"\n'
        f'subnet = "10.77.3.0/24"\nunit = {{ cores = 0.25, memory_mb = 64 }}\n')
    board = onboard.read_board(str(tmp_path / "node.toml"))
    token = (tmp_path / "state" / "operator.token").read_text().strip()
    assert (board.listen_port, board.gateway, board.subnet.prefixlen) == (18555, "10.77.3.1", 24)
    assert (board.unit_cores, board.unit_memory_mb, board.operator_token) == (0.25, 64, token)
    assert board.base_container == "enorm-base-debian"
    p = subprocess.run([sys.executable, "-c", "import sys, bench.boards.onboard; print("
                        "sorted({'pydantic_settings', 'flask', 'enorm.daemon'} & "
                        "set(sys.modules)))"], capture_output=True, text=True, check=True,
                       cwd=Path(__file__).resolve().parents[2])
    assert p.stdout.strip() == "[]"


ROLES = {
    "lxc/defaults/main.yml": "lxc_packages: [lxc, lxcfs]\nlxc_bridge: enorm0\n",
    "lxc/tasks/main.yml": """
- name: Install LXC
  ansible.builtin.apt:
    name: "{{ lxc_packages }}"
    install_recommends: false
- name: Foreign architectures
  when: true
  block:
    - name: Install qemu-user-static
      ansible.builtin.apt:
        name: [qemu-user-static, binfmt-support]
- name: A template
  ansible.builtin.template: {src: a.j2, dest: /etc/a}
""",
    "redis/tasks/main.yml": "- name: Install Redis\n  apt:\n    name: redis-server\n",
}


def _roles(root: Path, **changed: str) -> Path:
    for rel, text in {**ROLES, **changed}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_the_provisioned_disk_is_keyed_by_the_roles_packages(tmp_path: Path) -> None:
    """What apt installs, from a task's list, a role default it names, a block; a change
    of the list (a package added, or one dropped: apt would leave it installed) is
    another key, a change the converging run applies (a template) is not."""
    roles = _roles(tmp_path / "a")
    pkgs = provisioned.role_packages(roles)
    assert pkgs == ["binfmt-support", "lxc", "lxcfs", "qemu-user-static", "redis-server"]
    built = provisioned.inputs("amd64", "d1", pkgs, Path("/w/amd64-pins1"))
    same = _roles(tmp_path / "b", **{"lxc/tasks/main.yml": ROLES["lxc/tasks/main.yml"]
                                     .replace("/etc/a", "/etc/b")})
    assert provisioned.key(provisioned.inputs(
        "amd64", "d1", provisioned.role_packages(same), Path("/w/amd64-pins1"))) == \
        provisioned.key(built)
    for other in ({"lxc/defaults/main.yml": "lxc_packages: [lxc]\n"},
                  {"redis/tasks/main.yml": ROLES["redis/tasks/main.yml"] + "    state: latest\n"
                   "- name: More\n  ansible.builtin.apt:\n    name: [gcc]\n"}):
        changed = provisioned.role_packages(_roles(tmp_path / str(len(other)) / "r", **other))
        assert changed != pkgs
        assert provisioned.key(provisioned.inputs("amd64", "d1", changed,
                                                  Path("/w/amd64-pins1"))) != provisioned.key(built)
    # the project's own roles: what the board lab's boards get
    real = provisioned.role_packages(lab.ANSIBLE_DIR / "roles")
    assert {"lxc", "lxcfs", "redis-server", "python3-venv"} <= set(real)
    assert not any("{{" in p for p in real)


def test_a_provisioned_disk_is_used_only_under_its_inputs(tmp_path: Path, monkeypatch) -> None:
    """None saved: from zero. Saved (written under a temporary name, then renamed): found.
    Another base disk, other packages or other Python pins: not found, with the reason
    in words, and the next save replaces the stale one. A save that fails leaves
    nothing that could be taken for a disk."""
    flattened: list[tuple[Path, Path]] = []

    def fake_flatten(overlay: Path, dest: Path) -> None:
        flattened.append((overlay, dest))
        dest.write_bytes(b"QFI\xfb disk of " + overlay.name.encode())

    monkeypatch.setattr(provisioned, "flatten", fake_flatten)
    built = provisioned.inputs("amd64", "disk1", ["lxc", "redis-server"], Path("/w/amd64-p1"))
    first = provisioned.find(built, tmp_path)
    assert first.disk is None and first.why_not == "none saved yet"

    saved = provisioned.save(tmp_path / "overlay.qcow2", built, tmp_path, source="abc123")
    assert saved == provisioned.path(built, tmp_path) and saved.parent == tmp_path / "amd64"
    assert provisioned.find(built, tmp_path).disk == saved
    assert flattened[0][1].name.startswith(".provisioned-") and not flattened[0][1].exists()

    for change, words in (({"base_disk": "disk2"}, "the base disk"),
                          ({"python_pins": "amd64-p2"}, "the Python pins"),
                          ({"packages": ["lxc", "gcc"]}, "packages (+gcc -redis-server)")):
        other = {**built, **change}
        found = provisioned.find(other, tmp_path)
        assert found.disk is None and words in found.why_not, found.why_not
    assert provisioned.find({**built, "arch": "arm64"}, tmp_path).why_not == "none saved yet"

    newer = {**built, "base_disk": "disk2"}
    provisioned.save(tmp_path / "overlay.qcow2", newer, tmp_path)
    assert provisioned.find(built, tmp_path).disk is None  # the stale one is gone
    assert sorted(p.name for p in (tmp_path / "amd64").iterdir()) == sorted(
        [provisioned.path(newer, tmp_path).name, provisioned.path(newer, tmp_path)
         .with_suffix(".json").name])

    def failing(overlay: Path, dest: Path) -> None:
        dest.write_bytes(b"half")
        raise subprocess.CalledProcessError(1, "qemu-img")

    monkeypatch.setattr(provisioned, "flatten", failing)
    third = {**built, "base_disk": "disk3"}
    with pytest.raises(subprocess.CalledProcessError):
        provisioned.save(tmp_path / "overlay.qcow2", third, tmp_path)
    assert provisioned.find(third, tmp_path).disk is None
    assert not list((tmp_path / "amd64").glob(".provisioned-*"))
    assert provisioned.find(newer, tmp_path).disk is not None  # the last good one stays


def test_where_a_playbook_run_goes_per_task() -> None:
    log = "\n".join([
        "    0.3 PLAY [Provision enorm edge nodes] ****",
        "    0.6 TASK [Gathering Facts] ****",
        "    6.0 ok: [b]",
        "    6.0 TASK [redis : Create the directories of the state store] ****",
        "    8.3 ok: [b] => (item=/etc/enorm)",
        "   20.0 ok: [b] => (item=/run/enorm)",
        "   20.0 RUNNING HANDLER [enorm : Restart the daemon (systemd)] ****",
        "   25.5 changed: [b]",
        "   25.5 TASK [redis : Create the directories of the state store] ****",
        "   26.0 ok: [b]",
        "   26.5 PLAY RECAP ****",
        "   26.5 b : ok=3 changed=1 unreachable=0 failed=0"])
    spent = lab.task_seconds(log)
    assert spent == {"Gathering Facts": 5.4,
                     "redis : Create the directories of the state store": 15.0,
                     "enorm : Restart the daemon (systemd)": 5.5}
    assert list(lab.slowest(spent, 2)) == ["redis : Create the directories of the state store",
                                           "enorm : Restart the daemon (systemd)"]
    out = "\n".join(lab.TIMED.match(line)["line"] for line in log.splitlines())
    assert lab.changed_tasks(out) == ["enorm : Restart the daemon (systemd)"]
