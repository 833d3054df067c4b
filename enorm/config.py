"""Node settings: one validated object, read from a TOML file and ENORM_* variables.

Everything a board operator may tune lives here so that the rest of the code never reads
the environment or a file itself. Several edge nodes can share one machine (tests, the
testbed): each gets its own name, state directory, bridge, subnet, port range and slice
of cores and memory.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

import psutil
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from enorm import images
from enorm.destinations import Allowed
from enorm.firewall import Egress
from enorm.idmap import IdRange
from enorm.protocol import Resources

NAME_PATTERN = r"^[a-z][a-z0-9]{0,11}$"
TOKEN_HASH_PREFIX = "sha256:"


class ConfigError(ValueError):
    """A setting is missing or wrong; the message names the field and the reason."""


class Unit(Resources):
    """The paper's unit of resources: what a server starts with and scales by (a
    `Resources` with a unit's bounds)."""

    cores: float = Field(1.0, gt=0, le=256)
    memory_mb: int = Field(200, ge=16)


class NodeConfig(BaseSettings):
    """Settings of one edge node."""

    model_config = SettingsConfigDict(
        env_prefix="ENORM_", env_nested_delimiter="__", extra="forbid"
    )

    name: str = Field("edge0", pattern=NAME_PATTERN)
    listen_host: str = "127.0.0.1"
    listen_port: int = Field(8470, ge=1, le=65535)
    # Address the cloud and the users use to reach this node's host ports.
    public_host: str = "127.0.0.1"
    state_dir: Path | None = None
    # None: the node starts and keeps its own Redis (AOF) under state_dir.
    store_url: str | None = None

    # Capacity of the node (None: the whole machine) and the basic-service reserve.
    cores: float | None = Field(None, gt=0)
    memory_mb: int | None = Field(None, gt=0)
    reserve_cores: float = Field(0.5, ge=0)
    reserve_memory_mb: int = Field(256, ge=0)
    unit: Unit = Unit()

    port_range: tuple[int, int] = (20000, 20999)
    bridge: str = Field("enorm0", pattern=r"^[a-zA-Z0-9_.-]{1,15}$")
    subnet: ipaddress.IPv4Network = ipaddress.IPv4Network("10.88.0.0/24")
    # TCP destinations (`ADDR[/N]:PORT`) containers may open connections to, e.g. the
    # tenants' cloud servers; nothing else on the host or beyond answers them.
    container_egress: list[str] = []

    # The base image: a recipe of images/ for this machine's architecture ("debian": base
    # container enorm-base-debian) or RECIPE-ARCH for another ("debian-arm64":
    # enorm-base-debian-arm64, run under qemu-user), as `enorm image build` names them.
    image: str = Field("debian", pattern=r"^[a-z0-9-]+$")
    lxc_path: Path = Path("/var/lib/lxc")
    # Unprivileged containers (enorm/idmap.py): root inside each container is a range of
    # 65,536 host ids of its own, taken from `idmap_start` (registered for root in
    # /etc/subuid and /etc/subgid); `idmap_count` / 65,536 containers at most per
    # machine. False: privileged containers, root inside is root on the board.
    unprivileged: bool = True
    idmap_start: int = Field(1_200_000_000, ge=65536, le=4_000_000_000)
    idmap_count: int = Field(256 * 65536, ge=65536)

    # Admission: the paper's rule, or also pre-empt lower-priority tenants.
    admission: Literal["paper", "preempt"] = "paper"
    # Setup requests below this priority are refused (409 `priority`).
    min_priority: int = Field(0, ge=0, le=1000)
    # The operator's token (CLI on the board); None: made at first start, kept in state_dir.
    operator_token: str | None = None
    # Bearer token -> name of the cloud manager that owns it. A key is the token itself or
    # `sha256:<hex digest of the token>` (`printf %s TOKEN | sha256sum`), so that the file
    # need not hold the token; the daemon keeps only digests either way.
    tokens: dict[str, str] = {}
    # Cloud manager -> where its callback_url, data_sink and a direct handover's to_url
    # (another node's API) may point (enorm.destinations; "*" for every cloud manager).
    # Nothing listed: a request naming one is refused.
    destinations: dict[str, list[str]] = {}
    # A callback that keeps failing is given up after this long (the event stays listed).
    callback_give_up_s: float = Field(3600.0, gt=0)

    # Auto-scaler (Procedures 5 and 6).
    autoscale_interval_s: float = Field(300.0, gt=0)
    # "paper": the round every `autoscale_interval_s` scales on latency (P5.7-P5.9).
    # "fast": a latency loop every `slo_interval_s` steps each server by one unit against
    # its objective (hysteresis band, cool-down after each change, a step down only
    # `slo_down_after_s` after the last change); the round keeps its resource and need
    # checks (enorm/autoscaler.py `slo_plan`).
    policy: Literal["paper", "fast"] = "paper"
    slo_interval_s: float = Field(5.0, gt=0)
    slo_hysteresis: float = Field(0.3, ge=0, lt=1)
    slo_cooldown_s: float = Field(10.0, ge=0)
    slo_down_after_s: float = Field(60.0, ge=0)
    idle_after_s: float = Field(600.0, gt=0)
    # Beyond the paper, off by default: scale down only below objective * (1 - band);
    # CPU and memory steps apart from the unit; no evictions that cannot make room.
    hysteresis: float = Field(0.0, ge=0, lt=1)
    cpu_step: float | None = Field(None, gt=0)
    memory_step_mb: int | None = Field(None, gt=0)
    skip_futile_evictions: bool = False
    # Dynamic priorities (enorm/priorities.py), off by default: each round ranks servers by
    # a priority that follows their workload (+1 above the latency objective, +1 with at
    # least `priority_users_step` users, -1 unused), within one of the declared priority.
    dynamic_priorities: bool = False
    priority_users_step: int = Field(1000, ge=1)
    # "measured": the basic service is what the board's own processes use (at least the
    # reserve); "reserve": only the reserve (nodes that share a machine, as in tests).
    basic_service: Literal["measured", "reserve"] = "measured"
    statistic: Literal["mean", "p95"] = "mean"
    probe: Literal["tcp", "icmp", "none"] = "tcp"
    probe_timeout_s: float = Field(0.5, gt=0)
    # How long a new container's sshd may take to accept connections before the handshake
    # answers 503 container_start_failed (a quarter-core unit on a busy board needs more
    # than a whole core on an idle one).
    launch_timeout_s: float = Field(20.0, gt=0)
    # Processes (and threads) one container may have: the tenant's fork storm hits this
    # wall inside its own cgroup instead of the board's process table.
    pids_max: int = Field(512, ge=16)
    # Each container's writable layer is an ext4 image of this size (sparse: the disk
    # holds what was written); writes beyond it fail inside with ENOSPC. 0: no limit.
    disk_mb: int = Field(1024, ge=0)
    # That many writable layers are kept made and mounted ahead of the handshakes (made
    # in the background; a handshake that finds none makes its own). 0: none ahead.
    layer_pool: int = Field(2, ge=0, le=64)
    # Fast protection of the basic service (enorm/pressure.py): every this many seconds
    # (0: off, only the auto-scaling round protects it) the node measures the basic
    # service's memory and evicts the lowest-priority tenants when less than
    # `pressure_headroom_mb` is left for it.
    pressure_interval_s: float = Field(0.0, ge=0)
    pressure_headroom_mb: int = Field(0, ge=0)
    probe_port: int = Field(7, ge=1, le=65535)
    # The local address the node's probes leave from (its uplink, where a board has
    # several); unset: whatever the route picks.
    probe_source: ipaddress.IPv4Address | None = None
    loss_penalty_ms: float = Field(1000.0, ge=0)
    # A cloud manager with this many servers waiting for their sink gets 409
    # `migrations_pending` for new ones (each keeps a stopped container and its data).
    max_pending_per_owner: int = Field(4, ge=1)
    # How often a migration that failed (sink unreachable) is tried again.
    migration_retry_s: float = Field(30.0, gt=0)
    # A termination that merges fences the server's ports first (TCP resets), then waits
    # this long for requests it had already received to write before the merge reads.
    merge_drain_s: float = Field(0.1, ge=0, le=10)
    # Events to the cloud's callback.
    callback_timeout_s: float = Field(2.0, gt=0)

    @classmethod
    def settings_customise_sources(  # type: ignore[override]
        cls, settings_cls: type, init_settings: Any, env_settings: Any, **_: Any
    ) -> tuple[Any, ...]:
        """The environment wins over the file, so an operator can override one setting."""
        return (env_settings, init_settings)

    @field_validator("name")
    @classmethod
    def _not_base(cls, v: str) -> str:
        # Its containers would be named like the base containers (enorm-base-*).
        if v == "base":
            raise ValueError("'base' is taken by the base containers (enorm-base-*)")
        return v

    @field_validator("port_range")
    @classmethod
    def _ports_ordered(cls, v: tuple[int, int]) -> tuple[int, int]:
        lo, hi = v
        if not 1024 <= lo <= hi <= 65535:
            raise ValueError("must be two ports, low <= high, within 1024-65535")
        return v

    @field_validator("image")
    @classmethod
    def _image_known(cls, v: str) -> str:
        try:
            images.resolve(v)
        except images.ImageError as exc:
            raise ValueError(str(exc)) from None
        return v

    @field_validator("container_egress")
    @classmethod
    def _egress(cls, v: list[str]) -> list[str]:
        for item in v:
            Egress.parse(item)
        return v

    @field_validator("tokens")
    @classmethod
    def _token_keys(cls, v: dict[str, str]) -> dict[str, str]:
        for key in v:
            digest = key.removeprefix(TOKEN_HASH_PREFIX)
            if digest != key and not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ValueError(f"{TOKEN_HASH_PREFIX} must be followed by 64 hex digits")
            if not key:
                raise ValueError("a token may not be empty")
        return v

    @field_validator("destinations")
    @classmethod
    def _destinations(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for entries in v.values():
            for entry in entries:
                Allowed.parse(entry)  # a ValueError names the entry and what is wrong
        return v

    @field_validator("subnet")
    @classmethod
    def _subnet_size(cls, v: ipaddress.IPv4Network) -> ipaddress.IPv4Network:
        if v.prefixlen > 29:
            raise ValueError("needs at least a /29 (gateway plus containers)")
        return v

    @model_validator(mode="after")
    def _pressure_needs_measuring(self) -> NodeConfig:
        if self.pressure_interval_s > 0 and self.basic_service != "measured":
            raise ValueError("pressure_interval_s needs basic_service = \"measured\" (the "
                             "watcher protects the measured basic service)")
        return self

    @model_validator(mode="after")
    def _fill_defaults(self) -> NodeConfig:
        if self.state_dir is None:
            self.state_dir = Path("/var/lib/enorm") / self.name
        if self.cores is None:
            self.cores = float(psutil.cpu_count() or 1)
        if self.memory_mb is None:
            self.memory_mb = psutil.virtual_memory().total // (1 << 20)
        return self

    # Names derived from the node's name, built in one place.
    @property
    def container_prefix(self) -> str:
        return f"enorm-{self.name}-"

    @property
    def id_range(self) -> IdRange | None:
        """Where unprivileged containers' ids live (None: privileged containers)."""
        return IdRange(self.idmap_start, self.idmap_count) if self.unprivileged else None

    @property
    def base_container(self) -> str:
        return images.resolve(self.image).container

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return next(self.subnet.hosts())

    @property
    def url(self) -> str:
        return f"http://{self.listen_host}:{self.listen_port}"


def _format_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "config"
        parts.append(f"{field}: {err['msg']}")
    return "; ".join(parts)


def load(path: str | os.PathLike[str] | None = None, **overrides: Any) -> NodeConfig:
    """Read the node config from `path` (TOML), ENORM_* variables and overrides.

    Precedence: environment > overrides > file > embedded defaults.
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config: file {p} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config: {p} is not valid TOML: {exc}") from None
    try:
        return NodeConfig(**{**data, **overrides})
    except ValidationError as exc:
        raise ConfigError(_format_error(exc)) from None
