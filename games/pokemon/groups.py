"""The game's say in the cloud manager's policy (cloud_manager/policy_loop.py): its
groups of players and where each group is.

A group is a party of players who play together (the game's operator names them, or
the game forms them); where it is, is the mean of its players' last locations, read
where each player's data is now (the cloud's Redis, or their edge server's), and it has
been idle since its players' last move.

    [policy]
    population = "games.pokemon.groups:population"
    [policy.population_options.parties]
    north = ["7=203.0.113.7", "8=203.0.113.8"]     # user id = address
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

from cloud_manager.policy import centroid
from cloud_manager.policy_loop import DataOf, Group
from enorm.protocol import User
from games.pokemon import keys


def _user(spec: str | User) -> User:
    if isinstance(spec, User):
        return spec
    uid, _, addr = spec.partition("=")
    return User(id=uid, address=addr or "127.0.0.1")


def population(cloud_redis, parties: Mapping[str, Sequence[str | User]],
               clock: Callable[[], float] = time.time) -> Callable[[DataOf], list[Group]]:
    """The hook: `parties` (name -> players, as `User`s or "id=address") as groups."""
    teams = {name: [_user(u) for u in users] for name, users in parties.items()}

    def groups(data_of: DataOf) -> list[Group]:
        out = []
        for name, users in teams.items():
            points, last = [], []
            for u in users:
                loc = data_of(u.id).hgetall(keys.location(u.id))
                if b"lat" in loc and b"lng" in loc:
                    points.append((float(loc[b"lat"]), float(loc[b"lng"])))
                    last.append(float(loc.get(b"ts", 0)))
            out.append(Group(name, users, centroid(points),
                             idle_for_s=clock() - max(last) if last else None))
        return out

    return groups
