"""Which edge server serves which users, kept in the cloud Redis.

The library's `CloudManager` holds its deployments in memory; the ledger is what outlives
a process, so that `enorm-cloud withdraw` or `where` in one process sees an offload made
by another. Two hashes under one hash tag, so they live on one slot of a Redis Cluster.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from enorm import datasync
from enorm.protocol import User

PREFIX = "enorm:{cloud}"


@dataclass
class Entry:
    server_id: str
    node: str
    app: str
    url: str  # the user-facing base URL of the edge server
    users: list[User]  # with the addresses they were offloaded with
    created_at: float = field(default_factory=time.time)

    @property
    def user_ids(self) -> list[str]:
        return [u.id for u in self.users]

    def deployment(self, edge: Any) -> Any:
        """This entry as a `Deployment` on `edge` (its `EdgeClient`), enough to withdraw
        or hand over from another process: ids, node, users and URL, no session."""
        from enorm.protocol import Access, Resources, SetupResponse

        from .orchestrator import Deployment

        setup = SetupResponse(server_id=self.server_id, container="", address="",
                              access=Access(host="", port=0), ports={},
                              limits=Resources(cores=0, memory_mb=0), redis_password="")
        return Deployment(edge=edge, setup=setup, users=self.users, url=self.url)

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "users": [u.model_dump(mode="json")
                                                     for u in self.users]})

    @classmethod
    def from_json(cls, raw: bytes | str) -> Entry:
        d = json.loads(raw)
        # An entry written before the ledger kept addresses names its users by id.
        d["users"] = [User(id=u, address="127.0.0.1") if isinstance(u, str)
                      else User.model_validate(u) for u in d["users"]]
        return cls(**d)


class Ledger:
    def __init__(self, redis: datasync.Client, prefix: str = PREFIX) -> None:
        self.r = redis
        self.deployments = f"{prefix}:deployments"
        self.users = f"{prefix}:users"

    def record(self, e: Entry) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self.deployments, e.server_id, e.to_json())
        if e.users:
            pipe.hset(self.users, mapping=dict.fromkeys(e.user_ids, e.server_id))
        pipe.execute()

    def get(self, server_id: str) -> Entry | None:
        raw = self.r.hget(self.deployments, server_id)
        return None if raw is None else Entry.from_json(raw)

    def all(self) -> list[Entry]:
        return sorted((Entry.from_json(v) for v in self.r.hvals(self.deployments)),
                      key=lambda e: e.created_at)

    def where(self, user: str) -> Entry | None:
        sid = self.r.hget(self.users, user)
        return None if sid is None else self.get(sid.decode())

    def forget(self, server_id: str) -> None:
        """Drop a deployment, and its users' entries unless they moved on meanwhile."""
        e = self.get(server_id)
        users = e.user_ids if e is not None else []
        now = self.r.hmget(self.users, users) if users else []
        mine = [u for u, sid in zip(users, now, strict=True)
                if sid is not None and sid.decode() == server_id]
        pipe = self.r.pipeline(transaction=True)
        pipe.hdel(self.deployments, server_id)
        if mine:
            pipe.hdel(self.users, *mine)
        pipe.execute()
