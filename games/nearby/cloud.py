"""Nearby's cloud server: logins, the route that says which server serves a user, and
every request of the users it serves itself. It embeds the cloud manager as any app
would: its Redis client decodes replies (the library keeps its own connection), and the
manager's callback is one more blueprint (`create_app(..., manager=...)`)."""

from __future__ import annotations

from collections.abc import Iterable

from flask import Flask, jsonify, request

from . import keys
from .logic import Nearby, NearbyError
from .routes import blueprint


def _text(v) -> str | None:
    return v.decode() if isinstance(v, bytes) else v


def redirect(redis_client, users: Iterable[str], url: str) -> None:
    """The cloud manager's hook: these users are served by the edge server at `url`."""
    users = list(users)
    if users:
        redis_client.hset(keys.ROUTE, mapping=dict.fromkeys(users, url.rstrip("/")))


def restore(redis_client, users: Iterable[str]) -> None:
    """The cloud manager's hook: these users are served by the cloud again."""
    users = list(users)
    if users:
        redis_client.hdel(keys.ROUTE, *users)


def served_by(redis_client, uid: str) -> str | None:
    return _text(redis_client.hget(keys.ROUTE, uid))


def create_app(redis_client, *, public_url: str | None = None, manager=None) -> Flask:
    """The cloud server on `redis_client` (any decode setting); with `manager` (a
    `cloud_manager.CloudManager`), its edge-event callback at /edge-events."""
    app = Flask(__name__)
    nb = Nearby(redis_client)

    def here(uid: str) -> None:
        server = served_by(redis_client, uid)
        if server:
            raise NearbyError(f"user {uid} is served by {server}", 409, redirect=server)

    app.register_blueprint(blueprint(nb, check=here))
    if manager is not None:
        app.register_blueprint(manager.blueprint(name="nearby_edge_events"))

    @app.errorhandler(NearbyError)
    def _refused(exc: NearbyError):
        return jsonify({"error": str(exc), **exc.extra}), exc.status

    @app.post("/login")
    def login():
        body = request.get_json(silent=True) or {}
        uid = str(body.get("user", ""))
        if keys.is_user_id(uid):
            here(uid)  # a user on an edge server logs in again there, not here
        return jsonify({"user": uid, "token": nb.login(uid, str(body.get("name", "")))})

    @app.get("/where")
    def where():
        uid = request.args.get("user", "")
        if not keys.is_user_id(uid):
            raise NearbyError("user: a user id is required")
        return jsonify({"user": uid, "server": served_by(redis_client, uid)
                        or (public_url or request.host_url).rstrip("/")})

    @app.get("/healthz")
    def healthz():
        return jsonify({"ok": True})

    return app
