"""The role's files for systemd boards, against the code they must agree with (found on
the board lab's systemd VMs; the suite's machine has no systemd to run them)."""

from __future__ import annotations

import configparser
import fnmatch
from pathlib import Path

import jinja2
import yaml

from enorm import network, output

ROLES = Path(__file__).resolve().parents[2] / "ansible/roles"


def unit(template: Path, **values: str) -> configparser.ConfigParser:
    text = jinja2.Template(template.read_text()).render(ansible_managed="test", **values)
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string(text)
    return cp


def test_systemd_networkd_leaves_every_containers_veth_alone() -> None:
    """A board's own .network (`Name=en*`, `Type=ether`) matched the containers' host
    veths and took them off the node's bridge: ours must match every name the node
    gives them, and sort before the board's files (networkd takes the first match)."""
    net = unit(ROLES / "lxc/templates/enorm-veth.network.j2", lxc_bridge="enorm0")
    assert net["Link"]["Unmanaged"] == "yes"
    assert net["Match"]["Kind"] == "veth"
    globs = net["Match"]["Name"].split()
    for server_id in ("a1b2c3d4", "0123456789abcdef0123"):
        assert any(fnmatch.fnmatch(network.host_veth(server_id), g) for g in globs)
    name = Path(yaml.safe_load((ROLES / "lxc/defaults/main.yml").read_text())
                ["lxc_networkd_file"]).name
    for boards_own in ("10-enorm-board.network", "10-eth0.network", "50-cloud-init.network",
                       "99-default.link"):
        assert name < boards_own


def test_the_daemon_is_not_restarted_when_it_refuses_the_board() -> None:
    """`enorm serve` exits EXIT_USAGE on a bad config or a board that cannot enforce the
    limits: the unit must not restart it every 3 s (Restart=on-failure alone did)."""
    svc = unit(ROLES / "enorm/templates/enorm.service.j2", enorm_node_name="n",
               enorm_redis_service="enorm-redis", enorm_bridge="enorm0",
               enorm_venv="/opt/enorm/venv", enorm_config_file="/etc/enorm/node.toml")
    s = svc["Service"]
    assert s["Restart"] == "on-failure" and s["KillMode"] == "process"
    assert s["RestartPreventExitStatus"].split() == [str(output.EXIT_USAGE)]
