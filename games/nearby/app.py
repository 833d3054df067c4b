"""Nearby, declared to the cloud manager: what runs on an edge node, how users are
redirected, and its data. Only `cloud_manager`'s public names are used (docs/apps.md)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cloud_manager import APP_DIR, App, KeySchema, files_of

from . import cloud, keys

PORT = 8090  # the edge server's port in its container


def key_schema() -> KeySchema:
    """Every key of a user, by name: the fixed ones and the drafts listed in the user's
    draft index."""
    return KeySchema(fixed=tuple(f(keys.U) for f in keys.FIXED),
                     families=((keys.drafts(keys.U), keys.draft(keys.U, "<member>")),))


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def app(cloud_redis) -> App:
    """`cloud_redis`: the cloud's Redis client (any decode setting), for the redirection
    hooks and for finding the cells the offloaded users are in."""
    pkg = Path(__file__).resolve().parent

    def shared_keys(users: Sequence[str]) -> list[str]:
        """The map around the users: per cell within one of theirs, its board, presence,
        card, latest message and recent posters, and the cells' ranking."""
        pipe = cloud_redis.pipeline(transaction=False)
        for u in users:
            pipe.hget(keys.profile(u), "cell")
        cells = {c for cell in pipe.execute() if cell for c in keys.around(_text(cell))}
        return [f(c) for c in sorted(cells) for f in keys.PER_CELL] + [keys.CELLS]

    return App(
        name="nearby",
        port=PORT,
        files={f"{APP_DIR}/games/__init__.py": pkg.parent / "__init__.py",
               **files_of(pkg, f"{APP_DIR}/games/nearby")},
        command=["python3", "-m", "games.nearby.edge"],
        env=lambda ctx: {"NEARBY_PORT": str(ctx.port), "NEARBY_REDIS": ctx.redis_url,
                         "PYTHONDONTWRITEBYTECODE": "1"},
        redirect=lambda users, url: cloud.redirect(cloud_redis, users, url),
        restore=lambda users: cloud.restore(cloud_redis, users),
        shared_patterns=list(keys.SHARED_PATTERNS),
        key_schema=key_schema(),
        shared_keys=shared_keys,
        user_key=keys.profile,
    )


