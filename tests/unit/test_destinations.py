"""The egress policy on its own: which destinations an allow-list admits."""

from __future__ import annotations

import pytest

from enorm.destinations import Allowed, Policy, Refused


def policy(**allowed: list[str]) -> Policy:
    return Policy(allowed, own_sockets=["/var/lib/enorm/n/store.sock"],
                  own_ports=[("127.0.0.1", 8470)])


@pytest.mark.parametrize("url", [
    "redis://10.1.2.3:6379", "redis://10.9.9.9:6379/0", "http://10.1.2.3:6379/cb",
    "redis://cloud.example:6379", "unix:///run/cloud.sock", "redis://[fd00::5]:7000",
    "redis://127.0.0.1:7000",
])
def test_listed_destinations_pass(url: str) -> None:
    p = policy(a=["10.0.0.0/8:6379", "cloud.example:6379", "unix:/run/cloud.sock",
                  "[fd00::/64]:7000", "127.0.0.1:7000"])
    p.check_url("a", "f", url)


@pytest.mark.parametrize("url,why", [
    ("redis://10.1.2.3:6380", "not in"),           # other port
    ("redis://192.168.1.1:6379", "not in"),        # other network
    ("http://cloud.example/cb", "not in"),         # name, but port 80 not listed
    ("http://other.example:6379/", "host name"),   # names only by name
    ("unix:///run/other.sock", "not in"),
    ("unix:///var/lib/enorm/n/store.sock", "own store"),
    ("http://127.0.0.1:8470/v1/node", "own services"),
    ("http://[::1]:8470/", "own services"),
    ("http://0.0.0.0:8470/", "own services"),
    ("redis://127.0.0.1:7001", "not in"),
    ("redis://[::1", "not a URL"),                # unclosed IPv6 literal: was a 500
])
def test_other_destinations_are_refused(url: str, why: str) -> None:
    p = policy(a=["10.0.0.0/8:6379", "cloud.example:6379", "unix:/run/cloud.sock",
                  "127.0.0.1:7000"])
    with pytest.raises(Refused, match=why) as exc:
        p.check_url("a", "data_sink.url", url)
    assert exc.value.field == "data_sink.url"


def test_broad_network_does_not_open_loopback() -> None:
    p = policy(a=["0.0.0.0/0"], b=["127.0.0.0/8"])
    p.check_url("a", "f", "redis://8.8.8.8:6379")
    for url in ("redis://127.0.0.1:6379", "redis://0.0.0.0:6379",
                "redis://[::ffff:127.0.0.1]:6379"):
        with pytest.raises(Refused):
            p.check_url("a", "f", url)
    p.check_url("b", "f", "redis://127.0.0.1:6379")


def test_lists_are_per_cloud_manager_and_star_is_everyone() -> None:
    p = policy(a=["10.0.0.1:1"], **{"*": ["10.0.0.2:2"]})
    p.check_url("a", "f", "http://10.0.0.1:1/")
    p.check_url("b", "f", "http://10.0.0.2:2/")
    with pytest.raises(Refused):
        p.check_url("b", "f", "http://10.0.0.1:1/")


@pytest.mark.parametrize("entry", ["cloud.example", "unix:relative", "10.0.0.1:99999",
                                   "host:port"])
def test_bad_entries_are_refused(entry: str) -> None:
    with pytest.raises(ValueError):
        Allowed.parse(entry)
