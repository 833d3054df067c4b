"""The cloud manager deciding by itself on real nodes: a party of players offloaded to
the node of their area, handed over when they walk into another node's area, and
withdrawn when no node pays any more -- with no call from the app, only its players
playing (their locations read where their data is: the cloud, then each edge server)."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
from nodes import VENV_BIN
from test_cloud_cli import cloud_cli, write_config
from world import LONDON, PARIS, TcpProxy, as_users, cloud_world, make_users, play

from cloud_manager.policy import Settings
from games.pokemon import groups

pytestmark = [pytest.mark.system, pytest.mark.timeout(240)]

NEW_YORK = (40.7128, -74.006)  # far from both nodes: the cloud (40 ms) is nearer


def wait_for(loop, n: int, timeout: float = 60) -> list:
    deadline = time.monotonic() + timeout
    while len(loop.events) < n:
        assert time.monotonic() < deadline, f"after {list(loop.events)}"
        time.sleep(0.1)
    return list(loop.events)


def test_a_party_is_offloaded_followed_and_withdrawn_by_the_policy(edge_node, redis_server):
    london, paris = edge_node(), edge_node()
    with cloud_world(redis_server().url, [london, paris]) as cloud:
        players = make_users(cloud, 3)
        for p in players:
            play(p, LONDON)
        settings = Settings(interval_s=0.3, dwell_s=1.5, withdraw_dwell_s=1.5, cloud_ms=40.0,
                            locations={london.name: LONDON, paris.name: PARIS})
        hook = groups.population(cloud.redis, {"party": as_users(players)})
        loop = cloud.manager.start_policy(hook, settings)

        # In London: offloaded to the London node (2 ms against the cloud's 40).
        (off,) = wait_for(loop, 1)
        assert (off.kind, off.reason, off.node, off.ok) == ("offload", "edge_pays", london.name,
                                                            True)
        assert off.figures["cloud_ms"] == 40.0 and off.figures["node_ms"] == 2.0
        first = cloud.manager.deployments[off.new_server_id]
        for p in players:
            assert p.refresh() == first.url
            play(p, LONDON)
        caught = {p.user: len(p.party()) for p in players}

        # They walk to Paris (the moves reach the London server): handed over, once.
        t_moved = time.monotonic()
        for p in players:
            play(p, PARIS, catches=0)
        hand = wait_for(loop, 2)[1]
        reaction = time.monotonic() - t_moved
        assert (hand.kind, hand.reason, hand.node, hand.to, hand.ok) == (
            "handover", "better_node", london.name, paris.name, True)
        assert hand.server_id == first.server_id and hand.figures["for_s"] >= 1.5
        assert hand.figures["gain_ms"] == pytest.approx(0.02 * 344, abs=0.2)
        assert reaction < 1.5 + 2 * 0.3 + hand.seconds + 3  # dwell, two rounds, the moves
        # the Paris server was started while the dwell ran: the move was the switch
        assert hand.figures["prepared_ahead_s"] > 0
        second = cloud.manager.deployments[hand.new_server_id]
        assert first.state == "handed_over" and first.confirmed
        assert second.edge.name == paris.name
        for p in players:
            assert p.refresh() == second.url
            assert len(p.party()) == caught[p.user]  # what they caught in London
            play(p, PARIS, catches=1)
        time.sleep(2.5)  # they stay in Paris: no more decisions
        assert len(loop.events) == 2

        # To New York: no node pays; withdrawn, their data home.
        for p in players:
            play(p, NEW_YORK, catches=0)
        back = wait_for(loop, 3)[2]
        assert (back.kind, back.reason, back.node, back.ok) == ("withdraw", "gain_gone",
                                                                paris.name, True)
        assert back.figures["gain_ms"] < 5 and back.figures["for_s"] >= 1.5
        assert second.state == "withdrawn" and second.confirmed
        for p in players:
            assert p.refresh() == cloud.url
            assert float(cloud.redis.hget(f"loc:{{{p.user}}}", "lat")) == NEW_YORK[0]
        time.sleep(1.5)
        assert [e.kind for e in loop.events] == ["offload", "handover", "withdraw"]
        assert loop.owned == {}


def test_a_node_down_past_the_bound_its_party_comes_home_and_keeps_what_it_wrote_since(
        edge_node, redis_server):  # fmt: skip
    """The node's API goes out of reach (a proxy cut): after `down_bound_s` the party is
    sent home although the node cannot merge; they play on the cloud; when the node is
    back the loop has it merge, the cloud winning every conflict: their newer moves stay."""
    london = edge_node()
    with cloud_world(redis_server().url, [london]) as cloud:
        proxy = TcpProxy(int(london.url.rsplit(":", 1)[1]))
        cloud.manager.edges[0].url = f"http://127.0.0.1:{proxy.port}"
        players = make_users(cloud, 2)
        for p in players:
            play(p, LONDON)
        settings = Settings(interval_s=0.3, dwell_s=0.5, withdraw_dwell_s=0.5, down_bound_s=1.0,
                            cloud_ms=40.0,
                            locations={london.name: LONDON})
        loop = cloud.manager.start_policy(
            groups.population(cloud.redis, {"party": as_users(players)}), settings)
        (off,) = wait_for(loop, 1)
        assert (off.kind, off.node, off.ok) == ("offload", london.name, True)
        for p in players:
            assert p.refresh() == cloud.manager.deployments[off.new_server_id].url
            play(p, LONDON)  # on the edge server

        proxy.down()
        down = wait_for(loop, 2)[1]
        assert (down.kind, down.reason, down.ok) == ("withdraw", "node_down", False)
        assert down.figures["down_for_s"] >= 1.0 and "DELETE" in down.error
        assert loop.owned == {} and list(loop.unreached) == [off.new_server_id]
        for p in players:
            assert p.refresh() == cloud.url  # home, although the node did not answer
            play(p, PARIS, catches=1)  # newer than what the edge server holds
        time.sleep(1.0)
        assert len(loop.events) == 2  # no node to go to, no merge while it is down

        proxy.up()
        back, again = wait_for(loop, 4)[2:]
        assert (back.kind, back.reason, back.server_id, back.ok) == (
            "withdraw", "node_back", off.new_server_id, True)
        assert back.figures["conflicts"] >= 2  # at least each player's location
        assert back.figures["conflicts_cloud_won"] == back.figures["conflicts"]
        assert cloud.manager.deployments[off.new_server_id].state == "withdrawn"
        for p in players:  # the cloud kept their move to Paris, not the edge's London
            assert float(cloud.redis.hget(f"loc:{{{p.user}}}", "lat")) == PARIS[0]
        # back in the London node's area by where they are now (Paris is 344 km off)
        assert (again.kind, again.reason, again.node) == ("offload", "edge_pays",
                                                          london.name)
        assert loop.unreached == {}
        loop.stop()
        cloud.manager.withdraw(loop.owned["party"])


def test_a_node_down_past_the_bound_its_party_goes_to_the_other_node_in_one_move(
        edge_node, redis_server):  # fmt: skip
    """The London node's API goes out of reach: after `down_bound_s` the party goes
    straight to the Paris node (a server from the cloud's copy of their data), redirected
    once, never through the cloud; when London is back its server is merged (the cloud
    winning conflicts), and the party, in London's area, handed back there."""
    london, paris = edge_node(), edge_node()
    with cloud_world(redis_server().url, [london, paris]) as cloud:
        proxy = TcpProxy(int(london.url.rsplit(":", 1)[1]))
        cloud.manager.edges[0].url = f"http://127.0.0.1:{proxy.port}"
        players = make_users(cloud, 2)
        for p in players:
            play(p, LONDON, catches=1)
        on_cloud = {p.user: len(p.party()) for p in players}
        settings = Settings(interval_s=0.3, dwell_s=0.5, withdraw_dwell_s=0.5, down_bound_s=1.0,
                            cloud_ms=40.0,
                            locations={london.name: LONDON, paris.name: PARIS})
        loop = cloud.manager.start_policy(
            groups.population(cloud.redis, {"party": as_users(players)}), settings)
        (off,) = wait_for(loop, 1)
        assert (off.kind, off.node, off.ok) == ("offload", london.name, True)
        first = cloud.manager.deployments[off.new_server_id]
        for p in players:
            assert p.refresh() == first.url
            play(p, LONDON, catches=0)  # on the London server

        served = {p.user: [] for p in players}  # every URL each player was sent to
        t_down = time.monotonic()
        proxy.down()
        while len(loop.events) < 2:
            assert time.monotonic() - t_down < 60, list(loop.events)
            for p in players:
                served[p.user].append(p.refresh())
            time.sleep(0.05)
        move = loop.events[1]
        assert (move.kind, move.reason, move.node, move.to, move.ok) == (
            "handover", "node_down", london.name, paris.name, True), move
        assert move.server_id == first.server_id and move.figures["down_for_s"] >= 1.0
        assert move.figures["prepared_ahead_s"] > 0  # started while the bound ran
        second = cloud.manager.deployments[move.new_server_id]
        for p in players:
            assert p.refresh() == second.url
            # one move: the London server, then the Paris one; never the cloud between
            assert {u for u in served[p.user] if u not in (first.url, second.url)} == set()
            assert len(p.party()) == on_cloud[p.user]  # the cloud's copy of their data
            play(p, LONDON, catches=1)
        caught = {p.user: len(p.party()) for p in players}  # on the Paris server
        assert list(loop.unreached) == [first.server_id] and first.state == "deployed"
        time.sleep(1.0)
        assert len(loop.events) == 2  # London down: nothing more, nothing merged

        proxy.up()
        back, again = wait_for(loop, 4, timeout=90)[2:]
        assert (back.kind, back.reason, back.server_id, back.ok) == (
            "withdraw", "node_back", first.server_id, True)
        assert back.figures["conflicts"] == back.figures["conflicts_cloud_won"]
        assert first.state == "withdrawn" and first.confirmed
        # still in London's area: handed back there, with what they caught in Paris's
        assert (again.kind, again.reason, again.node, again.to) == (
            "handover", "better_node", paris.name, london.name)
        third = cloud.manager.deployments[again.new_server_id]
        for p in players:
            assert p.refresh() == third.url
            assert len(p.party()) == caught[p.user]
        assert loop.unreached == {}
        loop.stop()
        cloud.manager.withdraw(loop.owned["party"])
        for p in players:
            assert p.refresh() == cloud.url and len(p.party()) == caught[p.user]


def test_enorm_cloud_policy_offloads_and_a_later_run_withdraws_what_the_ledger_holds(
        edge_node, redis_server, tmp_path):  # fmt: skip
    """`enorm-cloud policy --once`: refused while off; on, it offloads the party (the
    ledger records it); a later run adopts that deployment from the ledger and withdraws
    it when the budget says no server at all."""
    node = edge_node()
    redis = redis_server()
    with cloud_world(redis.url, [node]) as cloud:
        players = make_users(cloud, 2)
        for p in players:
            play(p, LONDON, catches=1)
        token = next(t for t, o in node.tokens.items() if o == "cloud-a")
        party = json.dumps([f"{p.user}=127.0.0.1" for p in players])

        def config(policy: str) -> object:
            return write_config(tmp_path / "cloud.toml", redis.url, cloud, f"""
[[nodes]]
name = "{node.name}"
url = "{node.url}"
token = "{token}"
[policy]
cloud_ms = 40
population = "games.pokemon.groups:population"
{policy}
[policy.locations]
{node.name} = [{LONDON[0]}, {LONDON[1]}]
[policy.population_options.parties]
party = {party}
""")

        off = cloud_cli(config(""), "policy", "--once")
        assert off.returncode == 2 and "policy.enabled" in off.stderr
        bad = cloud_cli(config("enabled = true\nwithdraw_gain_ms = 20"), "policy", "--once")
        assert bad.returncode == 2 and "withdraw_gain_ms" in bad.stderr

        out = cloud_cli(config("enabled = true"), "policy", "--once", "--json")
        assert out.returncode == 0, out.stderr
        (ev,) = [json.loads(line) for line in out.stdout.splitlines()]
        assert (ev["kind"], ev["reason"], ev["node"], ev["ok"]) == ("offload", "edge_pays",
                                                                    node.name, True)
        where = json.loads(cloud_cli(config(""), "where", "--json", players[0].user).stdout)
        assert where["server_id"] == ev["new_server_id"]
        assert players[0].refresh() == where["url"]
        play(players[0], LONDON, catches=1)
        caught = len(players[0].party())

        again = cloud_cli(config("enabled = true"), "policy", "--once", "--json")
        assert again.returncode == 0 and again.stdout == ""  # adopted: nothing to do
        # The long-running command: withdraws at its first round, runs on until SIGTERM.
        cfg = config("enabled = true\nmax_servers = 0\ninterval_s = 0.2")
        proc = subprocess.Popen([str(VENV_BIN / "enorm-cloud"), "policy", "-c", str(cfg)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            line = proc.stdout.readline()
            assert line.startswith(f"withdraw party (budget_spent): {node.name}"), line
            time.sleep(1)  # more rounds: nothing more to do
            proc.send_signal(signal.SIGTERM)
            rest, err = proc.communicate(timeout=30)
        finally:
            proc.kill()
        assert proc.returncode == 0 and rest == "", err
        assert cloud_cli(config(""), "where", players[0].user).stdout.strip() \
            == f"{players[0].user}: cloud"
        assert players[0].refresh() == cloud.url
        assert len(players[0].party()) == caught  # what they caught on the edge, home
