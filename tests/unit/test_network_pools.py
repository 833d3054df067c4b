"""Host port and container address pools (pure: they pick from what is taken)."""

from __future__ import annotations

import ipaddress
import socket

from enorm.network import free_port_count, pick_address, pick_ports, port_is_bindable


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
