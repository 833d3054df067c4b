"""The game's declaration for the cloud manager: what to upload and run on an edge
node, how to redirect its users, and its data (shared keys, merge rules)."""

from __future__ import annotations

from pathlib import Path

import games
from cloud_manager import App, EdgeContext
from cloud_manager.deployer import APP_DIR, files_of
from enorm.datasync import KeySchema
from games.pokemon import cloud as game_cloud
from games.pokemon import keys


def key_schema() -> KeySchema:
    """Where a user's keys are, built from the game's own key names: the fixed keys, and
    one Pokemon hash per member of the user's Pokemon index (a sorted set)."""
    u = "<user>"
    return KeySchema(
        fixed=(keys.user(u), keys.pokedex(u), keys.pokemon_index(u), keys.location(u),
               keys.caught(u)),
        families=((keys.pokemon_index(u), keys.pokemon(u, "<member>")),),
    )


def app(cloud_redis, *, cloud_port: int | None = None, cloud_url: str | None = None,
        push_interval: float = 1.0) -> App:  # fmt: skip
    """The iPokeMon-style game: `games/` uploaded, `games.pokemon.edge` on port 8080.

    The edge server pushes region codes to the cloud at `cloud_url` (as the container sees
    it), or, given only `cloud_port`, at the edge node's gateway address on that port (a
    cloud on the same machine as the node).
    """
    pkg = Path(games.__file__).resolve().parent

    def env(ctx: EdgeContext) -> dict[str, str]:
        cloud = cloud_url or (f"http://{ctx.gateway}:{cloud_port}" if cloud_port else "")
        return {"ENORM_APP_HOST": "0.0.0.0", "ENORM_APP_PORT": str(ctx.port),
                "ENORM_APP_CLOUD": cloud, "ENORM_APP_REDIS": ctx.redis_url,
                "ENORM_APP_PUSH_INTERVAL": str(push_interval),
                "PYTHONDONTWRITEBYTECODE": "1"}  # fmt: skip

    return App(
        name="pokemon",
        port=8080,
        files=files_of(pkg, f"{APP_DIR}/games"),
        command=["python3", "-m", "games.pokemon.edge"],
        env=env,
        redirect=lambda users, url: game_cloud.redirect(cloud_redis, users, url),
        restore=lambda users: game_cloud.restore(cloud_redis, users),
        shared_patterns=list(keys.SHARED_PATTERNS),
        user_key=keys.user,
        key_schema=key_schema(),
    )
