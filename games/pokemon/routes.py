"""The game's HTTP requests, one blueprint registered by both the cloud and the edge
server. Flask 2.2 compatible (the edge container's python3-flask).

Requests name the player with the headers `X-User` and `X-Token` (from `POST /id`).
"""

from __future__ import annotations

from collections.abc import Callable

from flask import Blueprint, jsonify, request

from .logic import Game, GameError

# Paths of the requests the edge serves (the partition at function level).
GAME_PATHS = ("/u", "/update", "/wpm", "/pm", "/6pm", "/pd")


def game_blueprint(
    game: Game,
    *,
    check_user: Callable[[str], None] | None = None,
    on_new_region: Callable[[str, str], None] | None = None,
) -> Blueprint:
    """The user, location, Pokemon and wild-Pokemon requests. The app registers the
    GameError handler (the cloud and the edge add different redirect hints).

    check_user(uid) may raise GameError (the cloud uses it to send users who are served
    by an edge there); on_new_region(code, uid) is told about regions new to this server.
    """
    bp = Blueprint("game", __name__)

    def player() -> str:
        uid = game.authenticate(request.headers.get("X-User"), request.headers.get("X-Token"))
        if check_user is not None:
            check_user(uid)
        return uid

    @bp.get("/u")
    def profile():
        return jsonify(game.profile(player()))

    @bp.post("/update")
    def update():
        uid = player()
        body = request.get_json(silent=True) or {}
        try:
            lat, lng = float(body["lat"]), float(body["lng"])
        except (KeyError, TypeError, ValueError):
            raise GameError("body must be JSON with numbers lat and lng") from None
        loc, new = game.update_location(uid, lat, lng)
        if new and on_new_region is not None:
            on_new_region(loc["region"], uid)
        return jsonify({"location": loc, "new_region": new})

    @bp.get("/wpm")
    def wild():
        return jsonify(game.wild(player(), request.args.get("region")))

    @bp.post("/pm")
    def catch():
        uid = player()
        spawn = (request.get_json(silent=True) or {}).get("spawn")
        if not isinstance(spawn, str):
            raise GameError("body must be JSON with a string spawn")
        return jsonify(game.catch(uid, spawn))

    @bp.get("/pm/<pm_uid>")
    def pokemon(pm_uid: str):
        return jsonify(game.pokemon(player(), pm_uid))

    @bp.get("/6pm")
    def party():
        return jsonify({"party": game.party(player())})

    @bp.get("/pd")
    def pokedex():
        return jsonify({"pokedex": game.pokedex(player())})

    return bp


class RequestStats:
    """Requests served per path, and optionally one log line per request
    (`<unix ts> <path> <duration_ms>`) that the edge Monitor reads incrementally."""

    def __init__(self, log_path: str | None = None):
        import threading

        self._lock = threading.Lock()
        self.by_path: dict[str, int] = {}
        self.by_user: dict[str, int] = {}
        self._log = None
        if log_path:
            import os

            os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
            self._log = open(log_path, "a", buffering=1)  # noqa: SIM115 (lives with the app)

    def install(self, app) -> None:
        import time

        from flask import g

        @app.before_request
        def _start():
            g.enorm_started = time.time()

        @app.after_request
        def _count(response):
            started = getattr(g, "enorm_started", time.time())
            ms = (time.time() - started) * 1000
            rule = request.url_rule.rule if request.url_rule is not None else request.path
            uid = request.headers.get("X-User") or request.args.get("user")
            with self._lock:
                self.by_path[rule] = self.by_path.get(rule, 0) + 1
                if uid:
                    self.by_user[uid] = self.by_user.get(uid, 0) + 1
                if self._log is not None:
                    self._log.write(f"{started:.3f} {request.path} {ms:.3f}\n")
            return response

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "requests": sum(self.by_path.values()),
                "by_path": dict(self.by_path),
                "by_user": dict(self.by_user),
            }
