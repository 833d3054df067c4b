"""Benchmark enorm.datasync: copy_users and merge_back at 1 and 16,384 users on loopback.

Starts two throw-away redis-servers, fills game-shaped data (4-10 keys per user), and
writes bench/results/datasync.json.   python bench/datasync.py
"""

from __future__ import annotations

import json
import platform
import random
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from enorm import datasync
from games.pokemon import keys

OUT = Path(__file__).resolve().parent / "results" / "datasync.json"


def _server(tmp: str) -> tuple[subprocess.Popen, redis.Redis]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", tmp], stdout=subprocess.DEVNULL,
    )  # fmt: skip
    client = datasync.connect(f"redis://127.0.0.1:{port}/0")
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    return proc, client


def fill(client: redis.Redis, n: int) -> None:
    rng = random.Random(1)
    pipe = client.pipeline(transaction=False)
    for u in map(str, range(n)):
        pms = rng.randrange(0, 7)
        pipe.hset(keys.user(u), mapping={"id": u, "name": f"t{u}", "token": "x" * 32, "xp": 5})
        pipe.sadd(keys.pokedex(u), *rng.sample(range(1, 152), 5))
        pipe.hset(keys.location(u), mapping={"lat": 51.5, "lng": -0.12, "region": "gcpvj0"})
        pipe.zadd(keys.pokemon_index(u), {str(k): k for k in range(max(pms, 1))})
        for k in range(pms):
            pipe.hset(keys.pokemon(u, k), mapping={"species": 25, "cp": 99, "region": "gcpvj0"})
        if len(pipe) > 5000:
            pipe.execute()
    for r in range(200):
        pipe.sadd(keys.region(f"gcp{r:03d}"), "user:1")
    pipe.execute()


def main() -> None:
    results = []
    with tempfile.TemporaryDirectory(prefix="enorm-bench-") as tmp:
        procs = []
        try:
            p1, cloud = _server(tmp)
            procs.append(p1)
            p2, edge = _server(tmp)
            procs.append(p2)
            fill(cloud, 16_384)
            for users in (1, 16_384):
                ids = [str(u) for u in range(users)]
                for run in range(3):
                    edge.flushall()
                    c = datasync.copy_users(cloud, edge, ids)
                    edge.sadd(keys.region("gcp000"), "user:edge")
                    m = datasync.merge_back(
                        edge, cloud, shared_patterns=keys.SHARED_PATTERNS, user_ids=ids
                    )
                    results.append(
                        {"users": users, "run": run, "copy": c.as_dict(), "merge_back": m.as_dict()}
                    )
                    print(users, run, f"copy {c.seconds:.3f}s {c.keys} keys",
                          f"merge_back {m.seconds:.3f}s {m.keys}+{m.merged} keys")  # fmt: skip
        finally:
            for p in procs:
                p.terminate()
                p.wait(5)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(
        json.dumps(
            {"machine": platform.platform(), "redis_py": redis.__version__, "results": results},
            indent=1,
        )  # fmt: skip
    )


if __name__ == "__main__":
    main()
