"""The heavy data set's copy and merge on a local pair of Redis servers, each beside the
bare floor, with the CPU of every part: no node, no container, no SSH, so what is left is
datasync's own work per key (`python -m bench.heavy_pair`).

A run: a fresh cloud Redis loaded from a saved data set (the game's users and the heavy
set of `heavy_data`, made once and kept in `--data`), a fresh edge Redis; `copy_users`
by the key schema with the manifest, then the floor to the edge (`heavy_data.bare_copy`),
a quarter of the users playing, `merge_back` with the manifest, every key of the users
compared with the edge's final state (digests), then the floor to the cloud. Each stage
is metered: CPU seconds of the cloud Redis, the edge Redis (`INFO cpu`) and this process
(`getrusage`: the client's every thread), wall time, and each Redis's commands.

To compare two versions, run it from each tree in turn, interleaved (A B B A ...), on
the same `--data`: `cd TREE && PYTHONPATH=$PWD python -m bench.heavy_pair --out X.json`.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from bench import heavy_data
from bench.deployment import make_users
from enorm import datasync
from games.local import LocalRedis, free_port
from games.pokemon import keys
from games.pokemon.app import key_schema


def make_data(users: int, where: Path) -> None:
    """The cloud's data set, saved once: `where`/dump.rdb and the users' ids."""
    server = LocalRedis()
    try:
        client = datasync.connect(server.url, timeout=120)
        ids = make_users(client, users)
        heavy_data.add(client, ids)
        client.save()
        where.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(server.dir) / "dump.rdb", where / "dump.rdb")
        (where / "users.json").write_text(json.dumps(ids))
    finally:
        server.close()


class Server:
    """A redis-server on loopback in its own directory, loaded from `rdb` if given."""

    def __init__(self, rdb: Path | None = None):
        self.dir = tempfile.mkdtemp(prefix="enorm-heavy-pair-")
        if rdb is not None:
            shutil.copy(rdb, Path(self.dir) / "dump.rdb")
        port = free_port()
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        self.url = f"redis://127.0.0.1:{port}/0"
        probe = redis.Redis.from_url(self.url)
        for _ in range(600):
            try:
                if probe.ping() and probe.info("persistence")["loading"] == 0:
                    break
            except redis.RedisError:
                pass
            time.sleep(0.05)
        probe.close()

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def _cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return info["used_cpu_sys"] + info["used_cpu_user"]


def _self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _commands(client: redis.Redis) -> dict[str, list]:
    """command -> [calls, ms] since the last CONFIG RESETSTAT (calls from scripts too)."""
    return {k[len("cmdstat_"):]: [v["calls"], round(v["usec"] / 1000, 1)]
            for k, v in client.info("commandstats").items()}  # fmt: skip


def metered(cloud: redis.Redis, edge: redis.Redis, stage: Callable[[], Any]) -> tuple[Any, dict]:
    """`stage()` and what it cost each part."""
    cloud.config_resetstat()
    edge.config_resetstat()
    c0, e0, s0, t0 = _cpu(cloud), _cpu(edge), _self_cpu(), time.perf_counter()
    out = stage()
    wall = time.perf_counter() - t0
    return out, {"wall_s": round(wall, 4), "cloud_cpu_s": round(_cpu(cloud) - c0, 4),
                 "edge_cpu_s": round(_cpu(edge) - e0, 4),
                 "client_cpu_s": round(_self_cpu() - s0, 4),
                 "cloud_cmds": _commands(cloud), "edge_cmds": _commands(edge)}  # fmt: skip


def run(data: Path) -> dict:
    """One copy, play and merge beside the floor both ways (see the module's docstring)."""
    users = json.loads((data / "users.json").read_text())
    cloud_server, edge_server = Server(data / "dump.rdb"), Server()
    try:
        cloud = datasync.connect(cloud_server.url, timeout=60)
        edge = datasync.connect(edge_server.url, timeout=60)
        keys_of = datasync.user_keys(cloud, users)
        name = datasync.manifest_key("heavy-pair")
        schema = heavy_data.schema(key_schema())
        copied, copy = metered(cloud, edge, lambda: datasync.copy_users(
            cloud, edge, users, manifest=name, schema=schema))  # fmt: skip
        _, to_edge = metered(cloud, edge, lambda: heavy_data.bare_copy(
            cloud_server.url, edge_server.url, keys_of))  # fmt: skip
        played = heavy_data.play(edge, users)
        final = datasync.digests(edge, keys_of, "source")
        merged, merge = metered(cloud, edge, lambda: datasync.merge_back(
            edge, cloud, shared_patterns=keys.SHARED_PATTERNS, user_ids=users,
            manifest=name))  # fmt: skip
        after = datasync.digests(cloud, keys_of)
        lost = sum(1 for k in keys_of if after[k] != final[k])
        _, to_cloud = metered(cloud, edge, lambda: heavy_data.bare_copy(
            edge_server.url, cloud_server.url, keys_of))  # fmt: skip
    finally:
        cloud_server.close()
        edge_server.close()
    return {"enorm": datasync.__file__, "keys": len(keys_of), "copied": copied.keys,
            "played": played, "written": merged.keys, "untouched": merged.untouched,
            "keys_lost": lost, "copy": copy, "floor_to_edge": to_edge, "merge": merge,
            "floor_to_cloud": to_cloud,
            "ratio_copy": round(copy["wall_s"] / to_edge["wall_s"], 3),
            "ratio_merge": round(merge["wall_s"] / to_cloud["wall_s"], 3)}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "enorm-heavy-pair",
                   help="where the saved data set is (made there if missing)")
    p.add_argument("--users", type=int, default=8000, help="users of a data set made anew")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--out", type=Path, help="the runs' JSON (else printed)")
    a = p.parse_args(argv)
    if not (a.data / "dump.rdb").exists():
        make_data(a.users, a.data)
    runs = [run(a.data) for _ in range(a.runs)]
    text = json.dumps(runs, indent=1)
    if a.out:
        a.out.write_text(text)
    else:
        print(text)
    for r in runs:
        print(f"copy {r['copy']['wall_s']:.3f} s ({r['ratio_copy']}x the floor), merge "
              f"{r['merge']['wall_s']:.3f} s ({r['ratio_merge']}x); CPU cloud/edge/client "
              f"copy {r['copy']['cloud_cpu_s']}/{r['copy']['edge_cpu_s']}/"
              f"{r['copy']['client_cpu_s']}, merge {r['merge']['cloud_cpu_s']}/"
              f"{r['merge']['edge_cpu_s']}/{r['merge']['client_cpu_s']}; "
              f"{r['keys_lost']} keys lost")


if __name__ == "__main__":
    main()
