"""The edge game server: the game partitioned at function level, run inside an enorm
container for the users the cloud redirected there.

It serves the user, location, Pokemon and wild-Pokemon requests against the container's
local Redis (the users' keys were copied there at deployment), pushes region codes it
sees for the first time to the cloud's global map in batches, and writes one log line
per request (`<unix ts> <path> <duration_ms>`) for the edge node's Monitor.

Only the standard library, Flask 2.2, redis-py 4.3 and waitress 2.1 (Debian bookworm's
python3-flask, python3-redis and python3-waitress): the container has no pip and no
internet. Served by waitress with persistent connections (`serving.py`). Start it as

    python3 -m games.pokemon.edge --port 8080 --cloud http://CLOUD:8000 \
        --redis redis://127.0.0.1:6379/0 --log /var/log/enorm-app/requests.log

(from the directory holding `games/`) or as `python3 games/pokemon/edge.py ...`.
Every option also reads an environment variable (ENORM_APP_PORT, ENORM_APP_CLOUD,
ENORM_APP_REDIS, ENORM_APP_LOG, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import urllib.error
import urllib.request

if __package__ in (None, ""):  # run as a file: make the package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    __package__ = "games.pokemon"  # noqa: A001

from flask import Flask, jsonify  # noqa: E402

from . import serving  # noqa: E402
from .logic import Game, GameError, NotServed  # noqa: E402
from .routes import RequestStats, game_blueprint  # noqa: E402

DEFAULT_LOG = "/var/log/enorm-app/requests.log"


class RegionPusher:
    """Region codes new to this edge, sent to the cloud's global map in batches.

    A batch goes when `batch` codes are waiting or every `interval` seconds. A failed
    push keeps the codes for the next round; the regions are in the local Redis as well,
    so the merge at termination brings them home in any case.
    """

    def __init__(self, cloud_url: str | None, batch: int = 50, interval: float = 5.0,
                 timeout: float = 3.0):  # fmt: skip
        self.url = cloud_url.rstrip("/") + "/regions" if cloud_url else None
        self.batch, self.interval, self.timeout = batch, interval, timeout
        self.pending: dict[str, set[str]] = {}
        self.requests = self.bytes = self.failures = self.pushed = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, code: str, annotation: str) -> None:
        with self._lock:
            self.pending.setdefault(code, set()).add(annotation)
            full = len(self.pending) >= self.batch
        if full:
            self._wake.set()

    def flush(self) -> bool:
        """Push what is waiting; False if the cloud did not take it."""
        with self._lock:
            batch, self.pending = self.pending, {}
        if not batch or self.url is None:
            return True
        body = json.dumps({"regions": {c: sorted(a) for c, a in batch.items()}}).encode()
        req = urllib.request.Request(
            self.url, data=body, method="POST", headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                resp.read()
            ok = True
        except (urllib.error.URLError, OSError):
            ok = False
        with self._lock:
            self.requests += 1
            self.bytes += len(body)
            if ok:
                self.pushed += len(batch)
            else:
                self.failures += 1
                for code, annotations in batch.items():
                    self.pending.setdefault(code, set()).update(annotations)
        return ok

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="region-pusher", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(self.timeout + 1)
        self.flush()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            if not self._stop.is_set():
                self.flush()

    def stats(self) -> dict:
        with self._lock:
            return {
                "requests": self.requests,
                "bytes": self.bytes,
                "failures": self.failures,
                "regions_pushed": self.pushed,
                "regions_pending": len(self.pending),
            }


def create_app(redis_client, *, cloud_url: str | None = None, log_path: str | None = None,
               push_batch: int = 50, push_interval: float = 5.0, clock=None) -> Flask:  # fmt: skip
    """A fresh edge server on `redis_client`; the pusher starts with the app."""
    app = Flask(__name__)
    game = Game(redis_client, **({"clock": clock} if clock else {}))
    pusher = RegionPusher(cloud_url, push_batch, push_interval)
    stats = RequestStats(log_path)
    stats.install(app)
    app.extensions["pokemon"] = {"game": game, "pusher": pusher, "stats": stats}

    def on_new_region(code: str, uid: str) -> None:
        pusher.add(code, "user:" + uid)

    app.register_blueprint(game_blueprint(game, on_new_region=on_new_region))

    @app.errorhandler(GameError)
    def _refused(exc: GameError):
        body = {"error": str(exc)}
        if isinstance(exc, NotServed) and cloud_url:
            body["redirect"] = cloud_url  # not served here: ask the cloud again
        return jsonify(body), exc.status

    @app.get("/stats")
    def stats_view():
        out = stats.snapshot()
        out["cloud"] = pusher.stats()
        return jsonify(out)

    @app.get("/healthz")
    def healthz():
        redis_client.ping()
        return jsonify({"ok": True})

    pusher.start()
    return app


def _arg(name: str, default):
    return os.environ.get("ENORM_APP_" + name, default)


def main(argv: list[str] | None = None) -> None:
    import redis

    p = argparse.ArgumentParser(description="iPokeMon-style edge game server")
    p.add_argument("--host", default=_arg("HOST", "0.0.0.0"))
    p.add_argument("--port", type=int, default=int(_arg("PORT", 8080)))
    p.add_argument("--cloud", default=_arg("CLOUD", None), help="cloud game server base URL")
    p.add_argument("--redis", default=_arg("REDIS", "redis://127.0.0.1:6379/0"))
    p.add_argument("--log", default=_arg("LOG", DEFAULT_LOG), help="request log ('' for none)")
    p.add_argument("--push-batch", type=int, default=int(_arg("PUSH_BATCH", 50)))
    p.add_argument("--push-interval", type=float, default=float(_arg("PUSH_INTERVAL", 5.0)))
    p.add_argument("--threads", type=int, default=int(_arg("THREADS", serving.THREADS)))
    a = p.parse_args(argv)

    client = redis.Redis.from_url(a.redis, socket_timeout=5, socket_connect_timeout=2)
    app = create_app(client, cloud_url=a.cloud, log_path=a.log or None,
                     push_batch=a.push_batch, push_interval=a.push_interval)  # fmt: skip
    try:
        serving.run(serving.server(app, a.host, a.port, threads=a.threads))
    finally:
        app.extensions["pokemon"]["pusher"].stop()


if __name__ == "__main__":
    main()
