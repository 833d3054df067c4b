"""Nearby's edge server: the same requests as the cloud's, for the users the cloud sent
here, on the container's own Redis; served by waitress with kept-alive connections.

It writes no request log: the edge node counts its users' packets itself, and idle time
comes from that; latency is then the network part only (docs/apps.md says what a log
adds). Run in the container as `python3 -m games.nearby.edge` with NEARBY_PORT and
NEARBY_REDIS from the environment the cloud manager gives (`app.py`).
"""

from __future__ import annotations

import os
import signal
import sys

from flask import Flask, jsonify

from .logic import Nearby
from .routes import blueprint


def create_app(redis_client) -> Flask:
    app = Flask(__name__)
    app.register_blueprint(blueprint(Nearby(redis_client)))

    @app.get("/healthz")
    def healthz():
        redis_client.ping()
        return jsonify({"ok": True})

    return app


def serve(app: Flask, host: str, port: int) -> None:
    """waitress (Debian's python3-waitress), until SIGTERM."""
    try:
        from waitress.server import create_server
    except ImportError:
        raise SystemExit(f"nearby: waitress is not installed for {sys.executable}") from None
    http = create_server(app, host=host, port=port, threads=8, channel_timeout=60,
                         asyncore_use_poll=True, ident="nearby")

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    http.run()


def main() -> None:
    import redis

    client = redis.Redis.from_url(os.environ.get("NEARBY_REDIS", "redis://127.0.0.1:6379/0"),
                                  decode_responses=True, socket_timeout=5)
    # 0.0.0.0: the node forwards the users' port to the container's address
    serve(create_app(client), "0.0.0.0", int(os.environ.get("NEARBY_PORT", "8090")))


if __name__ == "__main__":
    main()
