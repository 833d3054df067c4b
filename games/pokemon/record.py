"""Record a game session: a scripted player drives the real cloud server on loopback for
20 minutes of game time, and every request goes into `session.jsonl`.

Think times are simulated (the game clock is advanced, nobody waits), so recording takes
seconds. Each line: the request type, method, path, params, request and response sizes,
status, the think time before it, the game time, and its class: `data` for
data-intensive requests (the body moves a user's collection or a region's spawns:
pokedex, party, wild Pokemon, or anything over DATA_BYTES) and `regular` for the rest.
The last line is a summary of the classification.

    python -m games.pokemon.record [--minutes 20] [--seed 7] [--out games/pokemon/session.jsonl]
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import redis
import requests
from werkzeug.serving import make_server

from . import cloud
from .client import GameClient

DATA_BYTES = 1024
DATA_TYPES = {"pokedex", "party", "wild"}
HERE = Path(__file__).resolve().parent


class GameClock:
    """The game's time: starts now, moves only when the player thinks."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def classify(kind: str, req_bytes: int, resp_bytes: int) -> str:
    return "data" if kind in DATA_TYPES or req_bytes + resp_bytes > DATA_BYTES else "regular"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def record(minutes: float = 20, seed: int = 7, out: Path = HERE / "session.jsonl") -> dict:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    rng = random.Random(seed)
    clock = GameClock()
    with tempfile.TemporaryDirectory(prefix="enorm-record-") as tmp:
        rport, hport = _free_port(), _free_port()
        rs = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--port", str(rport),
             "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", tmp],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            r = redis.Redis(port=rport)
            for _ in range(100):
                try:
                    r.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.05)
            url = f"http://127.0.0.1:{hport}"
            http = make_server("127.0.0.1", hport, cloud.create_app(r, public_url=url, clock=clock))
            threading.Thread(target=http.serve_forever, daemon=True).start()
            try:
                lines = _play(
                    GameClient(url, "google", "recorded@example.org"), clock, rng, minutes
                )
            finally:
                http.shutdown()
        finally:
            rs.terminate()
            rs.wait(5)
    summary = {"type": "summary", "requests": len(lines), "game_seconds": minutes * 60}
    for cls in ("data", "regular"):
        sel = [x for x in lines if x["class"] == cls]
        summary[cls] = {
            "requests": len(sel),
            "types": sorted({x["type"] for x in sel}),
            "bytes": sum(x["req_bytes"] + x["resp_bytes"] for x in sel),
        }
    out.write_text("".join(json.dumps(x, sort_keys=True) + "\n" for x in [*lines, summary]))
    return summary


def _play(c: GameClient, clock: GameClock, rng: random.Random, minutes: float) -> list[dict]:
    lines: list[dict] = []
    start = clock.now
    think = 0.0

    def call(kind: str, method: str, path: str, **kw) -> requests.Response:
        body = json.dumps(kw["json"]).encode() if "json" in kw else b""
        r = c.request(method, path, **kw)
        lines.append(
            {
                "type": kind,
                "method": method,
                "path": path,
                "params": kw.get("json") or kw.get("params") or {},
                "req_bytes": len(body),
                "resp_bytes": len(r.content),
                "status": r.status_code,
                "think_s": round(think, 3),
                "t": round(clock.now - start, 3),
                "class": classify(kind, len(body), len(r.content)),
            }
        )
        return r

    c.login()
    lat, lng = 51.5072, -0.1276  # a walk through London
    caught: list[int] = []
    while clock.now - start < minutes * 60:
        lat += rng.uniform(-0.004, 0.004)
        lng += rng.uniform(-0.006, 0.006)
        call("update", "POST", "/update", json={"lat": round(lat, 6), "lng": round(lng, 6)})
        wild = call("wild", "GET", "/wpm").json()["wild"]
        for w in rng.sample(wild, rng.randrange(0, 3)):
            think = rng.uniform(1, 4)
            clock.now += think
            r = call("catch", "POST", "/pm", json={"spawn": w["spawn"]})
            if r.ok and r.json().get("caught"):
                caught.append(r.json()["pokemon"]["uid"])
        roll = rng.random()
        think = rng.uniform(2, 8)
        clock.now += think
        if roll < 0.2:
            call("pokedex", "GET", "/pd")
        elif roll < 0.4:
            call("party", "GET", "/6pm")
        elif roll < 0.5 and caught:
            call("pokemon", "GET", f"/pm/{rng.choice(caught)}")
        elif roll < 0.6:
            call("profile", "GET", "/u")
        think = rng.uniform(5, 20)  # walking to the next spot
        clock.now += think
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=20)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", type=Path, default=HERE / "session.jsonl")
    a = p.parse_args(argv)
    print(json.dumps(record(a.minutes, a.seed, a.out)))


if __name__ == "__main__":
    main()
