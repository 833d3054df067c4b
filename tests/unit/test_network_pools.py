"""Host port and container address pools (pure: they pick from what is taken), and the
names and addresses the bridge guard is keyed by."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from enorm.firewall import Egress
from enorm.network import (
    free_port_count,
    host_veth,
    mac_address,
    pick_address,
    pick_ports,
    port_is_bindable,
)


def test_ports_lowest_free_first_skipping_taken_and_unusable():
    got = pick_ports((100, 110), taken={100, 102}, count=3, usable=lambda p: p != 103)
    assert got == [101, 104, 105]


def test_ports_none_when_not_enough():
    assert pick_ports((100, 102), taken={101}, count=3, usable=lambda p: True) is None
    assert pick_ports((100, 102), taken=set(), count=0, usable=lambda p: True) == []
    assert free_port_count((100, 102), {101}) == 2


def test_port_held_by_another_process_is_not_bindable():
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        assert not port_is_bindable(s.getsockname()[1])


def test_address_skips_gateway_and_taken():
    net = ipaddress.IPv4Network("10.89.1.0/29")  # .1 gateway, .2-.6 containers
    assert str(pick_address(net, [])) == "10.89.1.2"
    assert str(pick_address(net, ["10.89.1.2", "10.89.1.3"])) == "10.89.1.4"
    full = [f"10.89.1.{i}" for i in range(2, 7)]
    assert pick_address(net, full) is None


def test_veth_and_mac_follow_the_server_id():
    assert host_veth("1a2b3c4d") == "en1a2b3c4d"
    assert mac_address("1a2b3c4d") == "02:1a:2b:3c:4d:01"  # locally administered, unicast
    ids = [f"{i:08x}" for i in range(0, 1 << 32, 0x01010101)]
    assert len({mac_address(i) for i in ids}) == len({host_veth(i) for i in ids}) == len(ids)


def test_egress_destinations():
    assert Egress.parse("10.89.3.1:8080") == Egress(ipaddress.IPv4Network("10.89.3.1/32"), 8080)
    assert Egress.parse("192.0.2.0/24:443").net.prefixlen == 24
    for bad in ("10.89.3.1", "10.89.3.1:http", "10.89.3.1:70000", "host:80", "::1:80"):
        with pytest.raises(ValueError):
            Egress.parse(bad)
