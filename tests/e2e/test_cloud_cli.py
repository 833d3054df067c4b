"""`enorm-cloud` driving a real edge node from the cloud side, one process per command, as
an operator's script would: the ledger in the cloud Redis carries what one command did to
the next."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from nodes import VENV_BIN
from world import LONDON, cloud_world, make_users, play

pytestmark = pytest.mark.system


def cloud_cli(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(VENV_BIN / "enorm-cloud"), *args, "-c", str(cfg)],
                          capture_output=True, text=True, timeout=300)


def write_config(path: Path, redis_url: str, cloud, nodes: str) -> Path:
    """An `enorm-cloud` config for the game on `cloud` with the `[[nodes]]` text given."""
    path.write_text(f"""
cloud_redis = "{redis_url}"
app = "games.pokemon.app:app"
callback_url = "{cloud.url}/edge-events"
[app_options]
cloud_port = {cloud.port}
push_interval = 0.2
{nodes}""")
    return path


def test_enorm_cloud_offload_where_withdraw(edge_node, redis_server, tmp_path):
    node = edge_node()
    redis = redis_server()
    with cloud_world(redis.url, [node]) as cloud:
        users = make_users(cloud, 3)
        for u in users:
            u.update(*LONDON)
        token = next(t for t, o in node.tokens.items() if o == "cloud-a")
        (tmp_path / "edge.token").write_text(token + "\n")
        cfg = write_config(tmp_path / "cloud.toml", redis.url, cloud, f"""[[nodes]]
name = "{node.name}"
url = "{node.url}"
token_file = "{tmp_path / 'edge.token'}"
[[nodes]]
name = "nowhere"
url = "http://127.0.0.1:9"
token = "x"
""")
        listed = cloud_cli(cfg, "nodes")
        assert listed.returncode == 0, listed.stderr
        rows = [line.split("\t") for line in listed.stdout.splitlines()]
        assert rows[0][:3] == ["name", "url", "state"]
        assert {r[0]: r[2] for r in rows[1:]} == {node.name: "up", "nowhere": "unreachable"}

        ids = [u.user for u in users[:2]]
        off = cloud_cli(cfg, "offload", "--json", f"{ids[0]}=127.0.0.1", ids[1])
        assert off.returncode == 0, off.stderr
        dep = json.loads(off.stdout)
        assert dep["node"] == node.name and sorted(dep["users"]) == sorted(ids)
        assert "offloading 2 users" in off.stderr  # progress on stderr, JSON alone on stdout

        where = json.loads(cloud_cli(cfg, "where", "--json", ids[0]).stdout)
        assert where["served_by"] == "edge" and where["server_id"] == dep["server_id"]
        assert cloud_cli(cfg, "where", users[2].user).stdout.strip() == f"{users[2].user}: cloud"
        # The users really play on the edge server the CLI deployed.
        users[0].refresh()
        assert users[0].server == dep["url"]
        play(users[0], LONDON)

        listing = json.loads(cloud_cli(cfg, "deployments", "--json").stdout)
        assert [(d["server_id"], d["state"]) for d in listing] == [(dep["server_id"],
                                                                     "running")]
        out = cloud_cli(cfg, "withdraw", "--json", dep["server_id"])
        assert out.returncode == 0, out.stderr
        done = json.loads(out.stdout)
        assert done["state"] == "withdrawn" and done["confirmed"] is True
        assert done["keys_migrated"] > 0
        assert json.loads(cloud_cli(cfg, "where", "--json", ids[0]).stdout)["served_by"] == "cloud"
        assert users[0].refresh() == cloud.url
        assert json.loads(cloud_cli(cfg, "deployments", "--json").stdout) == []

        # Clear errors, named fields, documented exit codes.
        again = cloud_cli(cfg, "withdraw", dep["server_id"])
        assert again.returncode == 2 and "server_id" in again.stderr
        bad_user = cloud_cli(cfg, "offload", "a b")
        assert bad_user.returncode == 2 and "USERS" in bad_user.stderr
        (tmp_path / "bad.toml").write_text('cloud_redis = "redis://127.0.0.1:1/0"\n')
        bad_cfg = cloud_cli(tmp_path / "bad.toml", "nodes")
        assert bad_cfg.returncode == 2 and "app" in bad_cfg.stderr
        assert "Traceback" not in bad_cfg.stderr + bad_user.stderr + again.stderr
        (tmp_path / "dead.toml").write_text(f"""
cloud_redis = "{redis.url}"
app = "games.pokemon.app:app"
[[nodes]]
name = "nowhere"
url = "http://127.0.0.1:9"
token = "x"
""")
        dead = cloud_cli(tmp_path / "dead.toml", "nodes")
        assert dead.returncode == 3 and "nowhere" in dead.stdout


def test_enorm_cloud_handover_moves_a_servers_users_to_another_node(edge_node, redis_server,
                                                                    tmp_path):
    a, b = edge_node(), edge_node()
    redis = redis_server()
    with cloud_world(redis.url, [a, b]) as cloud:
        users = make_users(cloud, 2)
        for u in users:
            play(u, LONDON)
        nodes = ""
        for n in (a, b):
            token = next(t for t, o in n.tokens.items() if o == "cloud-a")
            nodes += f'[[nodes]]\nname = "{n.name}"\nurl = "{n.url}"\ntoken = "{token}"\n'
        cfg = write_config(tmp_path / "cloud.toml", redis.url, cloud, nodes)
        ids = [u.user for u in users]
        off = cloud_cli(cfg, "offload", "--json", "--node", a.name, *ids)
        assert off.returncode == 0, off.stderr
        old = json.loads(off.stdout)
        caught = len(users[0].party())
        # bad input: exit 2 naming what is wrong, nothing moved
        for args, says in ((["nosuch"], "server_id"),
                           (["--to", "nowhere", old["server_id"]], "nowhere"),
                           (["--to", a.name, old["server_id"]], "--to"),
                           ([old["server_id"], "stranger=127.0.0.1"], "users")):
            bad = cloud_cli(cfg, "handover", *args)
            assert bad.returncode == 2 and says in bad.stderr, (args, bad.stderr)
            assert "Traceback" not in bad.stderr
        out = cloud_cli(cfg, "handover", "--json", "--to", b.name, old["server_id"])
        assert out.returncode == 0, out.stderr
        new = json.loads(out.stdout)
        assert new["node"] == b.name and new["from"]["state"] == "handed_over"
        assert new["from"]["confirmed"] is True and new["keys_copied"] > 0
        assert new["path"] == "direct"  # node to node: both nodes allow loopback
        where = json.loads(cloud_cli(cfg, "where", "--json", ids[0]).stdout)
        assert where["server_id"] == new["server_id"] and where["node"] == b.name
        assert users[0].refresh() == new["url"] and len(users[0].party()) == caught
        listing = json.loads(cloud_cli(cfg, "deployments", "--json").stdout)
        assert [d["server_id"] for d in listing] == [new["server_id"]]
        done = cloud_cli(cfg, "withdraw", "--json", new["server_id"])
        assert done.returncode == 0 and json.loads(done.stdout)["confirmed"] is True
