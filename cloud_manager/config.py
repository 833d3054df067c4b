"""The cloud side's config file (TOML) for `enorm-cloud`: edge nodes, tokens, the app.

    cloud_redis = "redis://127.0.0.1:6379/0"    # the game's data and the ledger
    app = "games.pokemon.app:app"               # module:function(cloud_redis, **app_options)
    callback_url = "http://192.0.2.10:8000/edge-events"   # optional
    priority = 5
    latency_objective_ms = 50

    [app_options]
    cloud_url = "http://192.0.2.10:8000"

    placement = "scored"        # or "first" (the default): the configured order
    handover_path = "cloud"     # or "direct" (the default): node to node, where allowed
    [placement_weights]         # optional; cloud_manager/placement.py documents the cost
    latency = 1.0

    [[nodes]]
    name = "edge0"
    url = "http://192.0.2.20:8470"
    token_file = "/etc/enorm-cloud/edge0.token"   # or token = "..."

`app` names a function of a module that `enorm-cloud` imports: the module must be
importable by the Python that runs `enorm-cloud` (installed there, or on PYTHONPATH); it
is called with the cloud Redis client (bytes replies) and `app_options`, and returns the
`cloud_manager.App` (docs/apps.md).
"""

from __future__ import annotations

import importlib
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .ledger import LEASE_S
from .policy import Settings as PolicySettings

DEFAULT_PATH = Path("/etc/enorm-cloud/cloud.toml")


class ConfigError(Exception):
    """The config file is missing or wrong; the message names the field."""


class NodeEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    url: str = Field(pattern=r"^https?://")
    token: str | None = None
    token_file: Path | None = None

    @model_validator(mode="after")
    def _one_token(self) -> NodeEntry:
        if (self.token is None) == (self.token_file is None):
            raise ValueError("give exactly one of token and token_file")
        return self

    def bearer(self) -> str:
        if self.token is not None:
            return self.token
        assert self.token_file is not None
        try:
            return self.token_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"nodes.{self.name}.token_file: {exc}") from exc


class PlacementWeights(BaseModel):
    """The weights of `scored` placement's cost (cloud_manager/placement.py)."""

    model_config = ConfigDict(extra="forbid")

    latency: float = Field(default=1.0, ge=0)
    load: float = Field(default=0.2, ge=0)
    free: float = Field(default=0.2, ge=0)
    priority: float = Field(default=0.5, ge=0)
    unknown_latency_ms: float = Field(default=1000.0, ge=0)


class CloudConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cloud_redis: str = Field(pattern=r"^(redis|rediss|unix)://")
    cluster: bool = False
    # The cloud Redis as the edge nodes reach it, when that differs from `cloud_redis`.
    sink_url: str | None = Field(default=None, pattern=r"^(redis|rediss|unix)://")
    app: str = Field(pattern=r"^[\w.]+:\w+$")
    app_options: dict[str, Any] = Field(default_factory=dict)
    callback_url: str | None = None
    priority: int = Field(default=5, ge=0, le=1000)
    latency_objective_ms: float = Field(default=50.0, gt=0)
    nodes: list[NodeEntry] = Field(min_length=1)
    placement: Literal["first", "scored"] = "first"
    placement_weights: PlacementWeights = Field(default_factory=PlacementWeights)
    handover_path: Literal["direct", "cloud"] = "direct"
    # The registry (cloud Redis): each node is asked for its offer every
    # heartbeat_interval_s, stretched so that the fleet's heartbeats stay under
    # heartbeat_max_rate requests/s across the processes; a node without an offer for
    # down_after_s (at least two heartbeat periods and a timeout) is down.
    heartbeat_interval_s: float = Field(default=5.0, gt=0)
    heartbeat_max_rate: float = Field(default=200.0, gt=0)
    down_after_s: float = Field(default=15.0, gt=0)
    # `enorm-cloud policy` ends the app's servers no deployment in the ledger names once
    # they are orphans_grace_s old (a process killed between a handshake and its
    # record), each node asked for its servers every orphans_interval_s (stretched to
    # orphans_max_rate requests/s across the processes; cloud_manager/orphans.py).
    orphans_interval_s: float = Field(default=60.0, gt=0)
    orphans_grace_s: float = Field(default=300.0, ge=0)
    orphans_max_rate: float = Field(default=50.0, gt=0)
    # An offload in flight is leased to its process for offload_lease_s (renewed every
    # third of it): if the process dies, the orphans' reconcile of another completes or
    # ends it once the lease lapsed (cloud_manager/ledger.py, orphans.py).
    offload_lease_s: float = Field(default=LEASE_S, gt=0)
    # The cloud manager deciding by itself (`enorm-cloud policy`; cloud_manager/policy.py).
    policy: PolicySettings = Field(default_factory=PolicySettings)

    def node(self, name: str) -> NodeEntry:
        for n in self.nodes:
            if n.name == name:
                return n
        raise ConfigError(f"nodes: no node named {name!r} "
                          f"(known: {', '.join(n.name for n in self.nodes)})")

    def app_factory(self) -> Any:
        module, _, attr = self.app.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"app: cannot load {self.app}: {exc} (the module must be "
                              "importable by the Python that runs enorm-cloud: installed "
                              "there, or on PYTHONPATH)") from exc


def load(path: Path | None) -> CloudConfig:
    path = path or DEFAULT_PATH
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not TOML: {exc}") from exc
    try:
        return CloudConfig.model_validate(data)
    except ValidationError as exc:
        e = exc.errors()[0]
        field = ".".join(str(p) for p in e["loc"]) or "file"
        raise ConfigError(f"{path}: {field}: {e['msg']}") from exc
