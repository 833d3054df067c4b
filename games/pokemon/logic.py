"""Game rules shared by the cloud and the edge server: one implementation, two hosts.

Pure parts (region codes, wild spawns, catch rolls) are plain functions; `Game` applies
them to a Redis client. Only the standard library and redis-py 4.3 API: this module runs
inside the edge container on Debian bookworm.
"""

from __future__ import annotations

import hashlib
import random
import secrets
import time

from . import keys

SPECIES = 151
SPAWN_WINDOW_S = 600  # wild Pokemon of a region change every 10 minutes
SPAWNS_PER_REGION = 6
PARTY_SIZE = 6
REGION_PRECISION = 6  # geohash characters: cells of about 1.2 km x 0.6 km
_BASE32 = "0123456789bcdefghjkmnpqrstuvwxyz"


class GameError(Exception):
    """A request the game refuses; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class NotServed(GameError):
    """This server does not hold the user: the client should ask the cloud's /config."""

    def __init__(self, message: str):
        super().__init__(message, 404)


# -- pure rules --------------------------------------------------------------------------


def region_code(lat: float, lng: float, precision: int = REGION_PRECISION) -> str:
    """The geohash of a location: the game's region code (only [0-9b-z], glob-safe)."""
    if not (-90 <= lat <= 90 and -180 <= lng <= 180):
        raise GameError("lat must be within -90..90 and lng within -180..180")
    lat_lo, lat_hi, lng_lo, lng_hi = -90.0, 90.0, -180.0, 180.0
    code, bits, ch, even = [], 0, 0, True
    while len(code) < precision:
        if even:
            mid = (lng_lo + lng_hi) / 2
            ch = ch * 2 + (lng >= mid)
            lng_lo, lng_hi = (mid, lng_hi) if lng >= mid else (lng_lo, mid)
        else:
            mid = (lat_lo + lat_hi) / 2
            ch = ch * 2 + (lat >= mid)
            lat_lo, lat_hi = (mid, lat_hi) if lat >= mid else (lat_lo, mid)
        even = not even
        bits += 1
        if bits == 5:
            code.append(_BASE32[ch])
            bits, ch = 0, 0
    return "".join(code)


def region_bounds(code: str) -> tuple[float, float, float, float]:
    """(lat_lo, lat_hi, lng_lo, lng_hi) of a region code."""
    lat_lo, lat_hi, lng_lo, lng_hi = -90.0, 90.0, -180.0, 180.0
    even = True
    for c in code:
        v = _BASE32.index(c)
        for shift in range(4, -1, -1):
            bit = (v >> shift) & 1
            if even:
                mid = (lng_lo + lng_hi) / 2
                lng_lo, lng_hi = (mid, lng_hi) if bit else (lng_lo, mid)
            else:
                mid = (lat_lo + lat_hi) / 2
                lat_lo, lat_hi = (mid, lat_hi) if bit else (lat_lo, mid)
            even = not even
    return lat_lo, lat_hi, lng_lo, lng_hi


def _rng(*parts: object) -> random.Random:
    seed = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(seed[:8], "big"))


def spawn_window(now: float) -> int:
    return int(now // SPAWN_WINDOW_S)


def wild_pokemon(code: str, now: float) -> list[dict]:
    """The wild Pokemon of a region in the spawn window of `now`: the same for every
    server and every user, so cloud and edge agree without sharing state."""
    window = spawn_window(now)
    rng = _rng("wild", code, window)
    lat_lo, lat_hi, lng_lo, lng_hi = region_bounds(code)
    out = []
    for i in range(SPAWNS_PER_REGION):
        species = 1 + int(rng.random() ** 2 * SPECIES)  # low numbers are common
        out.append(
            {
                "spawn": f"{code}-{window}-{i}",
                "species": min(species, SPECIES),
                "cp": 10 + rng.randrange(500),
                "lat": round(rng.uniform(lat_lo, lat_hi), 6),
                "lng": round(rng.uniform(lng_lo, lng_hi), 6),
                "expires": (window + 1) * SPAWN_WINDOW_S,
            }
        )
    return out


def find_spawn(spawn: str, now: float) -> dict | None:
    """The wild Pokemon named by a spawn id, if it is still out there."""
    try:
        code, window, _ = spawn.rsplit("-", 2)
    except ValueError:
        return None
    if window != str(spawn_window(now)):
        return None
    return next((w for w in wild_pokemon(code, now) if w["spawn"] == spawn), None)


def catch_chance(species: int) -> float:
    """Rarer (higher-numbered) species are harder to catch: 0.9 down to 0.3."""
    return 0.9 - 0.6 * (species - 1) / (SPECIES - 1)


def catch_roll(uid: str, spawn: str, attempt: int, species: int) -> bool:
    """Whether attempt number `attempt` of a user on a spawn succeeds (deterministic)."""
    return _rng("catch", uid, spawn, attempt).random() < catch_chance(species)


def level_for(xp: int) -> int:
    return 1 + int((xp / 100) ** 0.5)


# -- applied to Redis --------------------------------------------------------------------


def _text(v: bytes | str | None) -> str | None:
    return v.decode() if isinstance(v, bytes) else v


def _decode(h: dict) -> dict:
    return {_text(k): _text(v) for k, v in h.items()}


class Game:
    """The game's requests against one Redis (the cloud's, or the container's)."""

    def __init__(self, redis_client, clock=time.time):
        self.r = redis_client
        self.clock = clock

    # users
    def create_or_login(self, provider: str, ident: str, name: str = "") -> tuple[str, str, bool]:
        """(user id, token, created) for an identity at a provider (cloud only)."""
        if not provider or not ident:
            raise GameError("provider and identity are required")
        existing = _text(self.r.get(keys.identity(provider, ident)))
        if existing:
            return existing, _text(self.r.hget(keys.user(existing), "token")), False
        uid = str(self.r.incr(keys.NEXT_USER_ID))
        token = secrets.token_hex(16)
        if not self.r.set(keys.identity(provider, ident), uid, nx=True):
            return self.create_or_login(provider, ident, name)  # lost a race: log in
        self.r.hset(
            keys.user(uid),
            mapping={
                "id": uid,
                "name": name or f"trainer{uid}",
                "provider": provider,
                "token": token,
                "created": int(self.clock()),
                "xp": 0,
                "pm_seq": 0,
            },
        )
        return uid, token, True

    def authenticate(self, uid: str | None, token: str | None) -> str:
        """The user id if the token is the user's; 404 when this server lacks the user."""
        if not uid or not token or not keys.is_valid_user_id(uid):
            raise GameError("X-User and X-Token headers are required", 401)
        stored = self.r.hget(keys.user(uid), "token")
        if stored is None:
            raise NotServed(f"user {uid} is not served here")
        if not secrets.compare_digest(_text(stored), token):
            raise GameError("bad token", 401)
        return uid

    def profile(self, uid: str) -> dict:
        u = _decode(self.r.hgetall(keys.user(uid)))
        u.pop("token", None)
        xp = int(u.get("xp", 0))
        u.update(
            xp=xp,
            level=level_for(xp),
            pokedex=self.r.scard(keys.pokedex(uid)),
            pokemon=self.r.zcard(keys.pokemon_index(uid)),
            location=_decode(self.r.hgetall(keys.location(uid))) or None,
        )
        return u

    # location
    def update_location(self, uid: str, lat: float, lng: float) -> tuple[dict, bool]:
        """Store the user's location; (location, whether the region is new to this
        server's map). New regions get an annotation and go into the global map."""
        code = region_code(lat, lng)
        loc = {"lat": lat, "lng": lng, "region": code, "ts": round(self.clock(), 3)}
        pipe = self.r.pipeline(transaction=False)
        pipe.hset(keys.location(uid), mapping=loc)
        pipe.sadd(keys.REGIONS, code)
        pipe.sadd(keys.region(code), f"user:{uid}")
        _, new_region, _ = pipe.execute()
        return loc, bool(new_region)

    def current_region(self, uid: str) -> str:
        code = _text(self.r.hget(keys.location(uid), "region"))
        if not code:
            raise GameError("no location yet: POST /update first", 409)
        return code

    def wild(self, uid: str, region: str | None = None) -> dict:
        code = region or self.current_region(uid)
        now = self.clock()
        return {"region": code, "wild": wild_pokemon(code, now)}

    # Pokemon
    def catch(self, uid: str, spawn: str) -> dict:
        """Try to catch a wild Pokemon of the user's current region."""
        now = self.clock()
        wild = find_spawn(spawn, now)
        if wild is None or not spawn.startswith(self.current_region(uid) + "-"):
            raise GameError("no such wild Pokemon here (any more)", 404)
        if self.r.sismember(keys.caught(uid), spawn):
            raise GameError("already caught", 409)
        attempt = self.r.hincrby(keys.user(uid), "attempts", 1)
        if not catch_roll(uid, spawn, attempt, wild["species"]):
            return {"caught": False, "spawn": spawn, "attempt": attempt}
        if not self.r.sadd(keys.caught(uid), spawn):
            raise GameError("already caught", 409)
        pm_uid = self.r.hincrby(keys.user(uid), "pm_seq", 1)
        pm = {
            "uid": pm_uid,
            "species": wild["species"],
            "cp": wild["cp"],
            "caught_at": round(now, 3),
            "region": spawn.split("-", 1)[0],
        }
        pipe = self.r.pipeline(transaction=False)
        pipe.hset(keys.pokemon(uid, pm_uid), mapping=pm)
        pipe.zadd(keys.pokemon_index(uid), {str(pm_uid): now})
        pipe.sadd(keys.pokedex(uid), wild["species"])
        pipe.hincrby(keys.user(uid), "xp", 100)
        pipe.sadd(keys.region(pm["region"]), f"species:{wild['species']}")
        pipe.execute()
        return {"caught": True, "pokemon": pm}

    def pokemon(self, uid: str, pm_uid: str) -> dict:
        pm = _decode(self.r.hgetall(keys.pokemon(uid, pm_uid)))
        if not pm:
            raise GameError(f"no Pokemon {pm_uid}", 404)
        return pm

    def party(self, uid: str) -> list[dict]:
        """The six most recently caught Pokemon."""
        uids = [_text(u) for u in self.r.zrevrange(keys.pokemon_index(uid), 0, PARTY_SIZE - 1)]
        pipe = self.r.pipeline(transaction=False)
        for u in uids:
            pipe.hgetall(keys.pokemon(uid, u))
        return [_decode(h) for h in pipe.execute() if h]

    def pokedex(self, uid: str) -> list[int]:
        return sorted(int(s) for s in self.r.smembers(keys.pokedex(uid)))
