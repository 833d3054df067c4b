"""Nearby's requests, one blueprint registered by the cloud and by the edge server (Flask
2.2 compatible: the edge container's python3-flask). Requests name the user with the
headers `X-User` and `X-Token` (from the cloud's `POST /login`)."""

from __future__ import annotations

from collections.abc import Callable

from flask import Blueprint, jsonify, request

from .logic import Nearby, NearbyError


def _body() -> dict:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise NearbyError("body: a JSON object is required")
    return body


def _ids(body: dict) -> list[str]:
    ids = body.get("ids")
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise NearbyError("ids: a list of message ids is required")
    return ids


def blueprint(nb: Nearby, check: Callable[[str], None] | None = None) -> Blueprint:
    """`check(uid)` may refuse a user this server does not serve (the cloud's, for users
    on an edge server)."""
    bp = Blueprint("nearby", __name__)

    def user() -> str:
        uid = nb.authenticate(request.headers.get("X-User"), request.headers.get("X-Token"))
        if check is not None:
            check(uid)
        return uid

    @bp.errorhandler(NearbyError)
    def _refused(exc: NearbyError):
        return jsonify({"error": str(exc), **exc.extra}), exc.status

    @bp.get("/me")
    def me():
        return jsonify(nb.me(user()))

    @bp.post("/move")
    def move():
        uid, body = user(), _body()
        try:
            lat, lng = float(body["lat"]), float(body["lng"])
        except (KeyError, TypeError, ValueError):
            raise NearbyError("lat, lng: numbers are required") from None
        return jsonify({"cell": nb.move(uid, lat, lng)})

    @bp.post("/post")
    def post():
        uid = user()
        return jsonify({"id": nb.post(uid, str(_body().get("text", "")))})

    @bp.get("/nearby")
    def nearby():
        return jsonify({"messages": nb.nearby(user())})

    @bp.post("/read")
    def read():
        uid = user()
        return jsonify({"marked": nb.read(uid, _ids(_body()))})

    @bp.post("/unread")
    def unread():
        uid = user()
        return jsonify({"unmarked": nb.unread(uid, _ids(_body()))})

    @bp.delete("/trail")
    def forget_trail():
        return jsonify({"deleted": nb.forget_trail(user())})

    @bp.post("/typing")
    def typing():
        nb.typing(user())
        return jsonify({"ok": True})

    @bp.post("/follow/<other>")
    def follow(other: str):
        nb.follow(user(), other)
        return jsonify({"ok": True})

    @bp.delete("/follow/<other>")
    def unfollow(other: str):
        nb.follow(user(), other, on=False)
        return jsonify({"ok": True})

    @bp.post("/dm/<to>")
    def dm(to: str):
        uid = user()
        if check is not None:
            check(to)
        return jsonify({"id": nb.dm(uid, to, str(_body().get("text", "")))})

    @bp.get("/inbox")
    def inbox():
        return jsonify({"messages": nb.inbox(user())})

    @bp.delete("/inbox")
    def clear_inbox():
        return jsonify({"deleted": nb.clear_inbox(user())})

    @bp.post("/inbox/ack")
    def ack():
        uid = user()
        return jsonify({"deleted": nb.ack(uid, _ids(_body()))})

    @bp.get("/drafts")
    def drafts():
        return jsonify({"drafts": nb.drafts(user())})

    @bp.post("/drafts")
    def save_draft():
        uid, body = user(), _body()
        return jsonify({"id": nb.save_draft(uid, str(body.get("text", "")), body.get("id"))})

    @bp.delete("/drafts/<draft_id>")
    def drop_draft(draft_id: str):
        return jsonify({"deleted": nb.drop_draft(user(), draft_id)})

    @bp.post("/logout")
    def logout():
        nb.logout(user())
        return jsonify({"ok": True})

    return bp
