"""Each JMeter plan runs for real, briefly, against a real edge game server on loopback
(its own redis-server, the players logged in at the cloud, copied to the edge and
redirected there, as a deployment does); the .jtl must show requests, no errors and
latencies, and the edge's own request counts must agree with it."""

from __future__ import annotations

import ipaddress
import os
import subprocess

import psutil
import pytest
import requests

from bench import jmeter
from games.pokemon.jmeter import plans

USERS = 6


@pytest.fixture(scope="module")
def edge():
    with jmeter.local_edge(USERS, prefix="t-jmeter") as served:
        yield served


def absent_address() -> str:
    """An address of TEST-NET-3 that this host does not have now (other runs on the
    machine put documentation and benchmark addresses on their interfaces: the
    testbed's 198.18.<i>.1, a test's 192.0.2.2)."""
    have = {a.address for addrs in psutil.net_if_addrs().values() for a in addrs}
    return next(str(a) for a in ipaddress.ip_network("203.0.113.0/24").hosts()
                if str(a) not in have)


def edge_stats(host: str, port: int) -> dict:
    return requests.get(f"http://{host}:{port}/stats", timeout=5).json()


def test_aggressive_plan_loads_the_edge(edge, tmp_path):
    host, port, players = edge
    before = edge_stats(host, port)
    r = jmeter.run("aggressive", host, port, users=3, duration=3, players=players,
                   out_dir=tmp_path)  # fmt: skip
    after = edge_stats(host, port)
    assert r.requests > 30 and r.errors == 0, r.error_codes
    assert (r.p50, r.p99) > (0, 0) and r.p50 <= r.p95 <= r.p99 <= r.max
    assert r.achieved_rate == r.throughput > 0 and r.target_rate is None
    assert r.client_cpu_s > 0
    assert set(r.by_label) == {"wild /wpm", "pokedex /pd", "party /6pm"}
    assert (tmp_path / "aggressive.jtl").is_file()
    # The edge answered every sample itself, for the first three players only.
    served = {u: after["by_user"].get(u, 0) - before["by_user"].get(u, 0) for u in after["by_user"]}
    assert sum(served.values()) == r.requests
    assert {u for u, n in served.items() if n} == {p.uid for p in players[:3]}


def test_mixed_plan_multiplexes_users_onto_fewer_threads(edge, tmp_path):
    host, port, players = edge
    before = edge_stats(host, port)
    r = jmeter.run("mixed", host, port, users=USERS, duration=5, players=players,
                   max_threads=2, think_ms=300, out_dir=tmp_path)  # fmt: skip
    after = edge_stats(host, port)
    assert r.threads == 2 and r.users == USERS
    assert r.requests > 10 and r.errors == 0, r.error_codes
    assert r.p50 > 0 and r.p50 <= r.p95 <= r.p99
    # six users thinking 0.3 s each offer 20 requests/s; two threads must carry that
    # (each thinks 0.1 s: an iteration of six requests takes about 0.7 s)
    assert r.target_rate == 20.0
    assert 0.5 * r.target_rate <= r.achieved_rate <= 1.5 * r.target_rate
    data = sum(r.by_label[k]["requests"] for k in r.by_label if k.split()[0] in plans.AGGRESSIVE)
    assert abs(data - (r.requests - data)) <= 3  # as many regular as data-intensive
    served = {u: after["by_user"].get(u, 0) - before["by_user"].get(u, 0) for u in after["by_user"]}
    assert sum(served.values()) == r.requests
    # each iteration plays the next player: more players than threads played, as many
    # as iterations began (one /wpm per iteration; a thread may be cut off before it)
    played = {u for u, n in served.items() if n}
    assert played <= {p.uid for p in players}
    iterations = r.by_label["wild /wpm"]["requests"]
    assert r.threads < len(played) and min(USERS, iterations) <= len(played)
    assert len(played) <= min(USERS, iterations + r.threads)


def test_jmeter_failures_are_reported(edge, tmp_path):
    """A server that is not there: every sample fails, and the Result says so."""
    _, _, players = edge
    from games.local import free_port

    r = jmeter.run("aggressive", "127.0.0.1", free_port(), users=1, duration=1,
                   players=players, out_dir=tmp_path)  # fmt: skip
    assert r.requests > 0 and r.errors == r.requests and r.throughput == 0
    assert all("ConnectException" in code or "Connection refused" in code for code in r.error_codes)


def test_locust_runs_the_same_plan_into_the_same_result(edge, tmp_path):
    """The fallback for the largest runs: same requests, same players, same Result."""
    host, port, players = edge
    before = edge_stats(host, port)
    r = jmeter.run("mixed", host, port, users=USERS, duration=3, players=players,
                   engine="locust", max_threads=2, think_ms=600, out_dir=tmp_path)  # fmt: skip
    after = edge_stats(host, port)
    assert r.engine == "locust" and r.threads == 2 and r.target_rate == 10.0
    assert r.requests > 10 and r.errors == 0, r.error_codes
    assert r.p50 > 0 and r.p50 <= r.p95 <= r.p99 and r.client_cpu_s > 0
    assert {k.split()[0] for k in r.by_label} == set(plans.MIXED)
    served = sum(after["by_user"].get(u, 0) - before["by_user"].get(u, 0) for u in after["by_user"])
    # every request in the .jtl reached the edge; Locust stops its users mid-request, so
    # each may have had one more on the way that the .jtl does not hold
    assert r.requests <= served <= r.requests + r.threads


def test_requests_leave_from_each_players_source_address(edge, tmp_path):
    """Player one leaves from 127.0.0.2 (a loopback address: served); player two from
    an address this host does not have: JMeter must fail to bind it, so none of its
    requests are sent at all."""
    host, port, players = edge
    one = jmeter.Player(**{**vars(players[0]), "src": "127.0.0.2"})
    two = jmeter.Player(**{**vars(players[1]), "src": absent_address()})
    before = edge_stats(host, port)
    r = jmeter.run("aggressive", host, port, users=2, duration=2, players=[one, two],
                   out_dir=tmp_path)  # fmt: skip
    after = edge_stats(host, port)
    served = {u: after["by_user"].get(u, 0) - before["by_user"].get(u, 0) for u in after["by_user"]}
    assert 0 < r.errors < r.requests
    assert all("BindException" in code for code in r.error_codes), r.error_codes
    assert served.get(one.uid, 0) == r.requests - r.errors and served.get(two.uid, 0) == 0


def test_netns_runs_the_engine_inside_the_namespace(edge, tmp_path):
    """In a fresh namespace 127.0.0.1 is that namespace's own loopback, where nothing
    listens: every request is refused there, and the edge outside sees none of them."""
    host, port, players = edge
    ns = f"enorm-tjm-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        before = edge_stats(host, port)
        r = jmeter.run("aggressive", host, port, users=1, duration=1, players=players,
                       netns=ns, out_dir=tmp_path)  # fmt: skip
        after = edge_stats(host, port)
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=True)
    assert r.requests > 0 and r.errors == r.requests
    assert all("ConnectException" in code for code in r.error_codes), r.error_codes
    assert after["requests"] == before["requests"] + 1  # only the /stats call between


def test_wrk_plays_the_plan_on_kept_alive_connections(edge, tmp_path):
    """wrk (for the highest rates): the same steps, players and think times, the same
    Result, one keep-alive connection per thread."""
    host, port, players = edge
    before = edge_stats(host, port)
    r = jmeter.run("mixed", host, port, users=USERS, duration=5, players=players,
                   engine="wrk", max_threads=2, think_ms=300, out_dir=tmp_path)  # fmt: skip
    after = edge_stats(host, port)
    assert r.engine == "wrk" and r.threads == 2 and r.target_rate == 20.0
    assert r.requests > 10 and r.errors == 0, r.error_codes
    assert 0 <= r.p50 <= r.p95 <= r.p99 <= r.max and r.p99 > 0 and r.client_cpu_s > 0
    assert 0.5 * r.target_rate <= r.achieved_rate <= 1.5 * r.target_rate
    assert {k.split()[0] for k in r.by_label} == set(plans.MIXED)
    served = {u: after["by_user"].get(u, 0) - before["by_user"].get(u, 0) for u in after["by_user"]}
    # wrk stops its threads mid-request: one each may be on the way without a sample
    assert r.requests <= sum(served.values()) <= r.requests + r.threads
    played = {u for u, n in served.items() if n}
    assert played <= {p.uid for p in players} and len(played) > r.threads


def test_wrk_refuses_a_server_that_is_not_there(edge, tmp_path):
    """wrk checks the address before it starts: nothing listening is an error that says
    so, not a run of failed samples (JMeter's way)."""
    _, _, players = edge
    from games.local import free_port

    with pytest.raises(jmeter.JMeterError, match="unable to connect to 127.0.0.1"):
        jmeter.run("aggressive", "127.0.0.1", free_port(), users=1, duration=1,
                   players=players, engine="wrk", out_dir=tmp_path)  # fmt: skip
