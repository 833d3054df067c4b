"""The cloud game server: the global view.

It creates and authenticates users, serves every game request in the cloud-only model,
keeps the global map (region codes pushed by edge servers) and the redirection config
that tells each user which server to talk to. The cloud manager offloads users by
calling `redirect` and brings them home with `restore`.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable

from flask import Flask, jsonify, request

from . import keys, serving
from .logic import Game, GameError
from .routes import RequestStats, game_blueprint


def _text(v: bytes | str | None) -> str | None:
    return v.decode() if isinstance(v, bytes) else v


class Redirections:
    """The redirection config: a Redis hash user id -> base URL. A user not in it is
    served by the cloud. Every change is one atomic command, so a user never sees a
    half-applied config."""

    def __init__(self, redis_client):
        self.r = redis_client

    def redirect(self, users: Iterable[str], url: str) -> int:
        """Send `users` to the server at `url` (an edge server's user-facing address)."""
        users = [str(u) for u in users]
        if not users:
            return 0
        self.r.hset(keys.REDIRECT, mapping=dict.fromkeys(users, url.rstrip("/")))
        return len(users)

    def restore(self, users: Iterable[str] | None = None) -> int:
        """Send `users` (None: everyone redirected) back to the cloud."""
        if users is None:
            return self.r.delete(keys.REDIRECT)
        users = [str(u) for u in users]
        return self.r.hdel(keys.REDIRECT, *users) if users else 0

    def server_of(self, user: str) -> str | None:
        """The base URL serving `user`, None when the cloud does."""
        return _text(self.r.hget(keys.REDIRECT, str(user)))

    def all(self) -> dict[str, str]:
        return {_text(k): _text(v) for k, v in self.r.hgetall(keys.REDIRECT).items()}


def redirect(redis_client, users: Iterable[str], url: str) -> int:
    """Cloud manager hook: users now play on the edge server at `url`."""
    return Redirections(redis_client).redirect(users, url)


def restore(redis_client, users: Iterable[str] | None = None) -> int:
    """Cloud manager hook: users play on the cloud again."""
    return Redirections(redis_client).restore(users)


def create_app(redis_client, *, public_url: str | None = None, clock=None) -> Flask:
    """A fresh cloud server on `redis_client`. `public_url` is the base URL users reach
    the cloud at (default: the URL of each request)."""
    app = Flask(__name__)
    game = Game(redis_client, **({"clock": clock} if clock else {}))
    redirections = Redirections(redis_client)
    stats = RequestStats()
    stats.install(app)
    app.extensions["pokemon"] = {"game": game, "redirections": redirections, "stats": stats}

    def own_url() -> str:
        return (public_url or request.host_url).rstrip("/")

    def served_here(uid: str) -> None:
        """Users redirected to an edge get a hint instead of a (stale) answer."""
        server = redirections.server_of(uid)
        if server and server != own_url():
            exc = GameError(f"user {uid} is served by {server}", 409)
            exc.extra = {"redirect": server}
            raise exc

    app.register_blueprint(game_blueprint(game, check_user=served_here))

    @app.errorhandler(GameError)
    def _refused(exc: GameError):
        return jsonify({"error": str(exc), **getattr(exc, "extra", {})}), exc.status

    @app.post("/id")
    def login():
        body = request.get_json(silent=True) or {}
        uid, token, created = game.create_or_login(
            str(body.get("provider", "")), str(body.get("identity", "")), str(body.get("name", ""))
        )
        return jsonify({"user": uid, "token": token, "created": created}), 201 if created else 200

    @app.get("/config")
    def config():
        user = request.args.get("user", "")
        if not keys.is_valid_user_id(user):
            raise GameError("query parameter user is required")
        return jsonify({"user": user, "server": redirections.server_of(user) or own_url()})

    @app.post("/regions")
    def regions():
        """A batch from an edge server: {"regions": {code: [annotation, ...]}}."""
        body = request.get_json(silent=True) or {}
        batch = body.get("regions")
        if not isinstance(batch, dict):
            raise GameError('body must be JSON {"regions": {code: [annotation, ...]}}')
        pipe = redis_client.pipeline(transaction=False)
        for code, notes in batch.items():
            if not isinstance(code, str) or not code.isalnum() or len(code) > 12:
                raise GameError(f"bad region code {code!r}")
            pipe.sadd(keys.REGIONS, code)
            if notes:
                pipe.sadd(keys.region(code), *[str(a) for a in notes])
        pipe.execute()
        return jsonify({"accepted": len(batch)})

    @app.get("/map")
    def global_map():
        codes = sorted(_text(c) for c in redis_client.smembers(keys.REGIONS))
        return jsonify({"regions": codes})

    @app.get("/stats")
    def stats_view():
        return jsonify(stats.snapshot())

    @app.get("/healthz")
    def healthz():
        return jsonify({"ok": True})

    return app


def connect_redis(url: str, connections: int = 256):
    """The game server's Redis client: a request thread waits for a free connection
    rather than failing (redis-py 8 caps a plain pool at 100 and raises beyond it, which
    a threaded server under thousands of users reaches)."""
    import redis

    return redis.Redis(connection_pool=redis.BlockingConnectionPool.from_url(
        url, max_connections=connections, timeout=30))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="iPokeMon-style cloud game server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    p.add_argument("--public-url", default=None)
    p.add_argument("--threads", type=int, default=16)
    a = p.parse_args(argv)
    app = create_app(connect_redis(a.redis), public_url=a.public_url)
    serving.run(serving.server(app, a.host, a.port, threads=a.threads))


if __name__ == "__main__":
    main()
