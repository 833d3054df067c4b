"""What Nearby does with its data, the same on the cloud and on an edge server (which
holds only the users it serves and the map cells around them).

Only the standard library and redis-py 4.3 (Debian bookworm's python3-redis): the edge
container has no pip. The client is made with `decode_responses=True`.
"""

from __future__ import annotations

import secrets
import time
import uuid
from typing import Any

from . import keys


class NearbyError(Exception):
    """A request that cannot be served; `status` is its HTTP status."""

    def __init__(self, message: str, status: int = 400, **extra: Any):
        super().__init__(message)
        self.status, self.extra = status, extra


class Nearby:
    def __init__(self, redis_client, clock=time.time):
        self.r = redis_client
        self.clock = clock

    # -- users -----------------------------------------------------------------------
    def login(self, uid: str, name: str = "") -> str:
        """A new session token (the cloud's: users log in there); the profile is made on
        the first login."""
        if not keys.is_user_id(uid):
            raise NearbyError(f"user: {uid!r} is not a user id (letters, digits, _.:-)")
        token = secrets.token_urlsafe(16)
        pipe = self.r.pipeline()
        pipe.set(keys.session(uid), token, ex=keys.SESSION_TTL_S)
        pipe.hsetnx(keys.profile(uid), "name", name or uid)
        pipe.hsetnx(keys.profile(uid), "posts", 0)
        pipe.execute()
        return token

    def authenticate(self, uid: str | None, token: str | None) -> str:
        if not uid or not token:
            raise NearbyError("headers X-User and X-Token are required", 401)
        if not self.r.exists(keys.profile(uid)):
            raise NearbyError(f"user {uid} is not served here", 404)
        if self.r.get(keys.session(uid)) != token:
            raise NearbyError("session expired or unknown: log in again", 401)
        self.r.expire(keys.session(uid), keys.SESSION_TTL_S)  # a session used is kept
        return uid

    def logout(self, uid: str) -> None:
        cell = self.r.hget(keys.profile(uid), "cell")
        pipe = self.r.pipeline()
        pipe.delete(keys.session(uid), keys.typing(uid))
        if cell:
            pipe.srem(keys.here(cell), uid)
        pipe.execute()

    def me(self, uid: str) -> dict:
        pipe = self.r.pipeline()
        pipe.hgetall(keys.profile(uid))
        pipe.smembers(keys.follows(uid))
        pipe.lrange(keys.trail(uid), 0, -1)
        pipe.scard(keys.drafts(uid))
        pipe.xlen(keys.inbox(uid))
        profile, follows, trail, drafts, inbox = pipe.execute()
        return {"user": uid, "profile": profile, "follows": sorted(follows), "trail": trail,
                "drafts": drafts, "inbox": inbox}

    # -- the map -------------------------------------------------------------------------
    def cell(self, uid: str) -> str:
        cell = self.r.hget(keys.profile(uid), "cell")
        if not cell:
            raise NearbyError("no position yet: POST /move first", 409)
        return cell

    def move(self, uid: str, lat: float, lng: float) -> str:
        if not (-90 <= lat <= 90 and -180 <= lng <= 180):
            raise NearbyError("lat, lng: not a position")
        cell, old = keys.cell_of(lat, lng), self.r.hget(keys.profile(uid), "cell")
        pipe = self.r.pipeline()
        pipe.hset(keys.profile(uid), mapping={"lat": lat, "lng": lng, "cell": cell,
                                              "updated": self.clock()})
        if old != cell:
            if old:
                pipe.srem(keys.here(old), uid)
            pipe.lpush(keys.trail(uid), cell)
            pipe.ltrim(keys.trail(uid), 0, keys.TRAIL_LEN - 1)
        pipe.sadd(keys.here(cell), uid)
        pipe.expire(keys.here(cell), keys.HERE_TTL_S)
        pipe.execute()
        return cell

    def post(self, uid: str, text: str) -> str:
        if not text or len(text) > 280:
            raise NearbyError("text: 1 to 280 characters")
        cell, now = self.cell(uid), self.clock()
        msg = self.r.xadd(keys.board(cell), {"by": uid, "text": text, "at": now},
                          maxlen=keys.BOARD_MAXLEN, approximate=True)
        pipe = self.r.pipeline()
        pipe.zincrby(keys.CELLS, 1, cell)
        pipe.hincrby(keys.card(cell), "posts", 1)
        pipe.hset(keys.card(cell), mapping={"last_by": uid, "last_at": now})
        pipe.set(keys.latest(cell), msg, ex=keys.LATEST_TTL_S)
        pipe.lpush(keys.recent(cell), uid)
        pipe.ltrim(keys.recent(cell), 0, keys.RECENT_LEN - 1)
        pipe.hincrby(keys.profile(uid), "posts", 1)
        pipe.delete(keys.typing(uid))
        pipe.execute()
        return msg

    def nearby(self, uid: str, count: int = 20) -> list[dict]:
        """The newest messages of the user's cell and its neighbours."""
        cells = keys.around(self.cell(uid))
        pipe = self.r.pipeline()
        for c in cells:
            pipe.xrevrange(keys.board(c), count=count)
        out = [{"id": i, "cell": c, **f}
               for c, msgs in zip(cells, pipe.execute(), strict=True) for i, f in msgs]
        out.sort(key=lambda m: tuple(int(x) for x in m["id"].split("-")), reverse=True)
        return out[:count]

    def read(self, uid: str, ids: list[str]) -> int:
        if not ids:
            return 0
        return self.r.zadd(keys.seen(uid), dict.fromkeys(map(str, ids), self.clock()))

    def unread(self, uid: str, ids: list[str]) -> int:
        return self.r.zrem(keys.seen(uid), *ids) if ids else 0

    def forget_trail(self, uid: str) -> bool:
        """Privacy: the cells the user was in, gone."""
        return bool(self.r.delete(keys.trail(uid)))

    def typing(self, uid: str) -> None:
        self.r.set(keys.typing(uid), self.cell(uid), ex=keys.TYPING_TTL_S)

    # -- people --------------------------------------------------------------------------
    def follow(self, uid: str, other: str, on: bool = True) -> None:
        if not keys.is_user_id(other) or other == uid:
            raise NearbyError(f"user: {other!r} cannot be followed")
        if on:
            self.r.sadd(keys.follows(uid), other)
        else:
            self.r.srem(keys.follows(uid), other)

    def dm(self, uid: str, to: str, text: str) -> str:
        """A direct message, to a user this server holds."""
        if not text or len(text) > 1000:
            raise NearbyError("text: 1 to 1000 characters")
        if not keys.is_user_id(to) or not self.r.exists(keys.profile(to)):
            raise NearbyError(f"user {to} is not served here", 404)
        return self.r.xadd(keys.inbox(to), {"from": uid, "text": text, "at": self.clock()})

    def inbox(self, uid: str) -> list[dict]:
        return [{"id": i, **f} for i, f in self.r.xrange(keys.inbox(uid))]

    def ack(self, uid: str, ids: list[str]) -> int:
        """Read messages leave the inbox."""
        return self.r.xdel(keys.inbox(uid), *ids) if ids else 0

    def clear_inbox(self, uid: str) -> bool:
        return bool(self.r.delete(keys.inbox(uid)))

    # -- drafts --------------------------------------------------------------------------
    def save_draft(self, uid: str, text: str, draft_id: str | None = None) -> str:
        if len(text) > 280:
            raise NearbyError("text: at most 280 characters")
        draft_id = draft_id or uuid.uuid4().hex[:12]
        if not draft_id.isalnum():
            raise NearbyError("id: letters and digits")
        pipe = self.r.pipeline()
        pipe.hset(keys.draft(uid, draft_id), mapping={
            "text": text, "cell": self.r.hget(keys.profile(uid), "cell") or "",
            "updated": self.clock()})
        pipe.expire(keys.draft(uid, draft_id), keys.DRAFT_TTL_S)
        pipe.sadd(keys.drafts(uid), draft_id)
        pipe.execute()
        return draft_id

    def drop_draft(self, uid: str, draft_id: str) -> bool:
        pipe = self.r.pipeline()
        pipe.delete(keys.draft(uid, draft_id))
        pipe.srem(keys.drafts(uid), draft_id)
        return bool(pipe.execute()[0])

    def drafts(self, uid: str) -> dict[str, dict]:
        ids = sorted(self.r.smembers(keys.drafts(uid)))
        pipe = self.r.pipeline()
        for d in ids:
            pipe.hgetall(keys.draft(uid, d))
        return {d: v for d, v in zip(ids, pipe.execute(), strict=True) if v}
