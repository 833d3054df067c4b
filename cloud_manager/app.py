"""The contract between the cloud manager and an application (the one a game developer
reads; the whole of it, with what the container offers and what each error means, is
docs/apps.md): what is deployed on an edge node and how it runs there, how its users are
redirected, and its data. The game in `games/pokemon/app.py` and the nearby-messages
service in `games/nearby/app.py` are two such Apps; the library knows no app.

The application's duties:
- its edge server runs from `files` with `command` and the environment `env` gives
  (`EdgeContext`: the node's gateway as the container sees it, the container's own
  Redis, the port to listen on), listens on 0.0.0.0 at that port and answers
  `health_path` there once ready;
- `redirect(user_ids, url)` points those users' clients at the edge server, and
  `restore(user_ids)` back at the cloud (the cloud manager calls them; clients follow);
- every key of a user carries the user id as its hash tag (`u:{42}`); keys without one
  that the edge server also writes are `shared_patterns` (merged back by their type's
  rule), users' keys whose cloud value wins a conflict are `cloud_wins_patterns`,
  `key_schema` names where a user's keys are, so that an offload reads them by name, and
  `shared_keys` names the shared keys the edge server needs for a group of users (copied
  with their keys). No key of the app starts with `enorm:`: the library's namespace.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from enorm import datasync
from enorm.protocol import DataSink


@dataclass
class EdgeContext:
    """What an application needs to know to run in one container."""

    gateway: str  # the edge node's host as the container sees it
    redis_url: str  # the container's own Redis, from inside the container
    port: int  # the container port the server listens on


@dataclass
class App:
    """What the cloud manager deploys: the application's side of the contract."""

    name: str
    port: int  # container port the users reach (forwarded to a host port)
    files: dict[str, Path]  # remote path -> local file
    command: list[str]
    env: Callable[[EdgeContext], dict[str, str]]
    redirect: Callable[[Sequence[str], str], object]  # user ids -> edge URL
    restore: Callable[[Sequence[str]], object]  # user ids -> back to the cloud
    # The app's data, declared once: keys without a user's hash tag that the edge also
    # writes (merged back by union), and the users' keys whose cloud value wins a
    # conflict. The cloud manager's DataSink takes them from here.
    shared_patterns: list[str] = field(default_factory=list)
    cloud_wins_patterns: list[str] = field(default_factory=list)
    # Where a user's keys are (fixed names, families listed in index keys): the offload
    # reads them by name, so its cost does not grow with the cloud's other users. None:
    # a scan of the cloud's keyspace finds them (fine for small clouds).
    key_schema: datasync.KeySchema | None = None
    # A key every user has: checked on the cloud after termination.
    user_key: Callable[[str], str] | None = None
    health_path: str = "/healthz"
    # The shared keys the edge server needs to serve these users (e.g. the message boards
    # of the cells around them), by name: copied cloud -> edge with the users' keys, with
    # their TTLs; each must match one of `shared_patterns`, so that it comes back. None:
    # the edge starts with no shared key and writes its own.
    shared_keys: Callable[[Sequence[str]], Iterable[str]] | None = None

    def shared_keys_for(self, user_ids: Sequence[str]) -> list[str]:
        """`shared_keys(user_ids)`, each checked to come back at termination."""
        if self.shared_keys is None:
            return []
        out = []
        for k in self.shared_keys(user_ids):
            k = k.decode() if isinstance(k, bytes) else str(k)
            if datasync.is_library(k.encode()) or datasync.hash_tag(k.encode()) is not None \
                    or not datasync.matches(k.encode(), self.shared_patterns):
                raise ValueError(f"shared_keys: {k!r} matches none of the app's "
                                 f"shared_patterns {self.shared_patterns} (or has a hash tag, "
                                 "or the library's prefix enorm:): it would not come back")
            out.append(k)
        return out


def sink_for(app: App, sink: DataSink) -> DataSink:
    """The sink with the app's data declaration; the App is the one place that declares
    it, so a sink that says otherwise is an error, not a silent drop."""
    update = {}
    for name in ("shared_patterns", "cloud_wins_patterns"):
        declared, given = getattr(app, name), getattr(sink, name)
        if given and declared and sorted(given) != sorted(declared):
            raise ValueError(f"{name}: the app {app.name} declares {declared}, the DataSink "
                             f"says {given}; declare them once, on the App")
        for p in declared or given:
            if "{" in p or "}" in p:
                raise ValueError(f"{name}: {p!r} names a user's hash tag; users' keys are "
                                 "found by their tag, not declared shared")
            if datasync.is_library(p.encode()):
                raise ValueError(f"{name}: {p!r} is in the library's namespace "
                                 f"({datasync.LIBRARY_PREFIX.decode()}*): never an app's key")
        update[name] = list(declared or given)
    return sink.model_copy(update=update)
