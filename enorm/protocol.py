"""Messages between the cloud manager and the edge manager (protocol v1, JSON over HTTP).

One definition serves both sides: the edge API validates requests with these models and
the cloud manager builds them, so the two cannot drift apart. Field names follow the
paper: priority, latency objective, unit.
"""

from __future__ import annotations

import ipaddress
from enum import StrEnum
from typing import Annotated, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_serializer,
    field_validator,
    model_validator,
)

VERSION = "v1"

RejectReason = Literal["insufficient_resources", "priority", "ports_unavailable",
                       "migrations_pending"]
# Every 409 of the API: admission's reasons, and the other requests that are well formed
# but that the node's state refuses (the server is not running, has no interception, is
# busy; limits below what it needs or holds).
RefusalReason = RejectReason | Literal["not_running", "no_intercept", "below_needs",
                                       "memory_in_use"]
ServerState = Literal["launching", "running", "terminating", "migration_pending"]
TerminationMode = Literal["single", "multiple"]

# One key on one line: no control characters anywhere (a \r or \n would start a second
# authorized_keys line). Patterns are checked by pydantic's regex engine, where `$` is the
# end of the text (as in the document's ECMAScript patterns): a trailing newline fails.
SSH_KEY_PATTERN = (r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)) [A-Za-z0-9+/=]{40,}"
                   r"( [^\x00-\x1f\x7f]*)?$")
_PORT = r"(6553[0-5]|655[0-2]\d|65[0-4]\d\d|6[0-4]\d{3}|[1-5]\d{4}|[1-9]\d{0,3})"
_IPV4 = r"((25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_H = "[0-9A-Fa-f]{1,4}"
_IPV6 = "(" + "|".join([  # every way to write eight groups, "::" standing for one run of zeros
    f"({_H}:){{7}}{_H}", f"({_H}:){{1,7}}:", f"({_H}:){{1,6}}:{_H}",
    *[f"({_H}:){{1,{5 - i}}}(:{_H}){{1,{i + 2}}}" for i in range(4)],
    f"{_H}:(:{_H}){{1,6}}", f":((:{_H}){{1,7}}|:)"]) + ")"
_LABEL = "[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST = rf"({_IPV4}|\[{_IPV6}\]|{_LABEL}(\.{_LABEL})*)"
# http(s)://host[:port] and, for a callback, a path and query without spaces or controls.
NODE_URL_PATTERN = rf"^https?://{_HOST}(:{_PORT})?/?$"
CALLBACK_URL_PATTERN = rf"^https?://{_HOST}(:{_PORT})?(/[!-~]*)?$"
# A server id as the node makes them (`secrets.token_hex(4)`).
SERVER_ID_PATTERN = r"^[0-9a-f]{8}$"


def _integral(v: object) -> object:
    """JSON has one kind of number: 5.0 is the integer 5, as the document's JSON Schema
    says (`"5"`, `true` and 5.5 still are not)."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


# An integer field of a request, parsed strictly but for the above.
Int = Annotated[int, BeforeValidator(_integral)]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Resources(_Message):
    """An amount of cores (fractional: CFS quota) and memory."""

    cores: float = Field(ge=0)
    memory_mb: Int = Field(ge=0)


class Limits(Resources):
    """`PUT /v1/servers/{id}/limits`: a server's new limits. The kernel's least CFS quota
    is 1 ms per 100 ms period; above the node's free resources plus the server's own, or
    below what the base image needs to run, is a 409 naming the field."""

    cores: float = Field(ge=0.01, le=1024)
    memory_mb: Int = Field(ge=1, le=1 << 24)


class User(_Message):
    """A user device the edge server will serve, with its (static) address."""

    id: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    address: ipaddress.IPv4Address | ipaddress.IPv6Address


class DataSink(_Message):
    """Where the edge server's data goes back to on termination (the cloud's Redis).

    User keys carry the user id as a hash tag (`u:{42}`); they replace the cloud's copy.
    Keys matching `shared_patterns` are merged by their type's rule (docs/apps.md).
    """

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "not": {"description": "a Redis Cluster is never reached over a unix socket",
                "required": ["cluster", "url"],
                "properties": {"cluster": {"const": True}, "url": {"pattern": "^unix://"}}}})

    url: str = Field(pattern=r"^(redis|rediss|unix)://.+", max_length=512)
    cluster: bool = False
    shared_patterns: list[str] = Field(default_factory=list, max_length=64)
    # A served user's key that the cloud changed during the offload is a conflict; the
    # edge's value wins, except for keys matching one of these patterns.
    cloud_wins_patterns: list[str] = Field(default_factory=list, max_length=64)

    @model_validator(mode="after")
    def _reachable(self) -> DataSink:
        # Refused now rather than found out at termination, where it would block `down`.
        if self.cluster and self.url.startswith("unix://"):
            raise ValueError("cluster: a Redis Cluster is never reached over a unix socket")
        return self


class Intercept(_Message):
    """Transparent redirection, where this node is the users' router: the served users'
    new TCP connections to `address:port` (the cloud game server) go to the container's
    `to_port` instead; no change on the client, no redirection file. The operator must
    list `address:port` among the cloud manager's destinations."""

    address: ipaddress.IPv4Address
    port: Int = Field(ge=1, le=65535)
    to_port: Int = Field(ge=1, le=65535, description="must be one of the setup request's "
                         "`ports` (else 400 naming `intercept.<i>.to_port`)")


class RedirectState(_Message):
    """`PUT` / `DELETE /v1/servers/{id}/redirect`: the redirection now."""

    server_id: str
    redirecting: bool
    rules: int = Field(description="rules in place: served users x intercepted destinations")


class SetupRequest(_Message):
    """Procedure 2: what the cloud manager asks an edge node for.

    The edge parses it with `parse_setup` (strict: `true` is not a priority, `"7"` is not
    a number); the cloud builds it from Python values.
    """

    app: str = Field(pattern=r"^[a-z][a-z0-9-]{0,31}$")
    priority: Int = Field(ge=0, le=1000, description="higher is more important")
    ports: list[Annotated[int, Field(ge=1, le=65535, json_schema_extra={
        "not": {"const": 22, "description": "the access port, forwarded already"}}),
        BeforeValidator(_integral)]] = Field(
        default_factory=list, max_length=16, json_schema_extra={"uniqueItems": True},
        description="container ports the users need; unique, not 22")
    users: list[User] = Field(default_factory=list, max_length=100_000,
                              description="each user id at most once")
    latency_objective_ms: float = Field(gt=0, le=60_000)
    ssh_public_key: str = Field(max_length=16_384, pattern=SSH_KEY_PATTERN,
                                description="one OpenSSH public key line")
    data_sink: DataSink | None = None
    callback_url: str | None = Field(None, max_length=2048, pattern=CALLBACK_URL_PATTERN)
    # The cloud's override: the edge may not terminate this server for need reasons
    # (idle, no users, latency not improvable); only for resources or by the cloud.
    override: bool = False
    # On termination of this server, also terminate its siblings (same owner and app).
    termination: TerminationMode = "single"
    intercept: list[Intercept] = Field(
        default_factory=list, max_length=8,
        description="each address and port at most once; each to_port one of `ports`")
    # A handover between nodes: the secret with which the old server's node may bring
    # the users' data to this server (`POST /v1/servers/{id}/import`), once.
    handover_key: str | None = Field(None, min_length=32, max_length=128,
                                     pattern=r"^[A-Za-z0-9_-]+$")

    @model_validator(mode="after")
    def _intercept_to_a_port(self) -> SetupRequest:
        for i, x in enumerate(self.intercept):
            if x.to_port not in self.ports:
                raise ValueError(f"intercept.{i}.to_port {x.to_port} is not one of ports "
                                 f"{self.ports}")
        if len({(x.address, x.port) for x in self.intercept}) != len(self.intercept):
            raise ValueError("intercept: each address and port at most once")
        return self

    @field_validator("ports")
    @classmethod
    def _ports(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError("ports must be unique")
        if 22 in v:
            raise ValueError("port 22 is the access port; it is forwarded already")
        return v

    @field_validator("users")
    @classmethod
    def _users_unique(cls, v: list[User]) -> list[User]:
        if len({u.id for u in v}) != len(v):
            raise ValueError("user ids must be unique")
        return v


def parse_setup(body: bytes) -> SetupRequest:
    """A setup request from the wire, strictly typed (raises ValidationError).

    pydantic's JSON parser bounds nesting depth itself, so deep JSON is a 400, not a
    RecursionError.
    """
    return SetupRequest.model_validate_json(body, strict=True)


class Access(_Message):
    """How the cloud manager reaches the container's sshd."""

    host: str
    port: int
    user: str = "root"


class SetupResponse(_Message):
    server_id: str
    container: str
    address: str
    access: Access
    ports: dict[int, int] = Field(description="container port -> user-facing host port")
    limits: Resources
    redis_password: str = Field(description="the container's Redis (port 6379 inside)")


class ErrorBody(_Message):
    """Every 4xx and 5xx body but a 409's: what went wrong and the field it is about."""

    error: str
    detail: str
    field: str | None = None


class Rejection(_Message):
    """Every 409 body: a well-formed request the node's state refuses, with a
    machine-readable reason, the field where there is one and what the node had free.
    (Setup refusals name no field: the request as a whole did not fit.)"""

    error: RefusalReason
    detail: str
    field: str | None = None
    free: Resources | None = None


class Health(_Message):
    """`GET /healthz`: the daemon answers and its store too."""

    status: Literal["ok"]
    node: str


class NodeOffer(_Message):
    """`GET /v1/node`: what the node has and how it admits."""

    version: str = VERSION
    name: str
    capacity: Resources
    reserved: Resources
    basic_service: Resources
    allocated: Resources
    free: Resources
    unit: Resources
    servers: int
    admission: str
    ports_free: int
    autoscale_interval_s: float
    # For the cloud manager's placement: the 1-minute load average per core, and the
    # lowest priority the node admits.
    load: float = 0.0
    min_priority: int = 0


# What `ProbeRequest` refuses, as the canonical text of an address (the document's `not`).
_NOT_A_USER = ("^(127\\.|0\\.0\\.0\\.0$|2(2[4-9]|3\\d)\\.|169\\.254\\.|::1?$|[fF]{2}|"
               "[fF][eE][89aAbB])")


class ProbeRequest(_Message):
    """`POST /v1/probe`: how far these users are from this node, before any setup (the
    cloud manager's placement). Public unicast addresses only."""

    addresses: list[Annotated[ipaddress.IPv4Address | ipaddress.IPv6Address, WithJsonSchema({
        "type": "string", "anyOf": [{"format": "ipv4"}, {"format": "ipv6"}],
        "not": {"pattern": _NOT_A_USER, "description": "loopback, unspecified, multicast "
                "and link-local addresses are refused"}})]] = Field(min_length=1, max_length=256)

    @field_validator("addresses")
    @classmethod
    def _users_only(cls, v: list) -> list:
        for a in v:
            if a.is_loopback or a.is_unspecified or a.is_multicast or a.is_link_local:
                raise ValueError(f"{a} is not a user's address (loopback, unspecified, "
                                 "multicast and link-local addresses are refused)")
        return v


class ProbeResult(_Message):
    method: str
    rtt_ms: dict[str, float | None] = Field(description="address -> RTT; null: no answer")
    median_ms: float | None = Field(description="of the answers; null: nobody answered")


class ServerInfo(_Message):
    id: str
    app: str
    owner: str
    priority: int
    state: ServerState
    container: str
    address: str
    access_port: int
    ports: dict[int, int]
    limits: Resources
    users: int
    latency_objective_ms: float
    override: bool
    termination: TerminationMode
    created_at: float
    data_sink: DataSink | None = None
    callback_url: str | None = None
    intercept: list[Intercept] = Field(default_factory=list)

    @field_serializer("data_sink")
    def _no_password(self, sink: DataSink | None) -> dict | None:
        """The sink's password stays on the node: answers show `***` in its place."""
        if sink is None:
            return None
        return {**sink.model_dump(), "url": redact_url(sink.url)}


def redact_url(url: str) -> str:
    """`url` with the password of its userinfo (if any) replaced by `***`."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


class TerminationReason(StrEnum):
    """Why a server ended: the one set the node (its events, store and auto-scaler) and
    the cloud manager share. A new reason is one line here, with `rehome` decided:
    True where the node ended the server for want of resources, so that its users are
    better served by another node than by the cloud (`CloudManager(rehome=True)` offloads
    them again once their data is home), False where they stay on the cloud."""

    rehome: bool

    def __new__(cls, value: str, rehome: bool) -> TerminationReason:
        member = str.__new__(cls, value)
        member._value_ = value
        member.rehome = rehome
        return member

    # The auto-scaling round: Procedure 5 (resource and need checks) and 6 (evictions).
    INSUFFICIENT_RESOURCES = "insufficient_resources", True
    NO_USERS = "no_users", False
    IDLE = "idle", False
    LATENCY_NOT_IMPROVABLE = "latency_not_improvable", False
    EVICTED_FOR_HIGHER_PRIORITY = "evicted_for_higher_priority", True
    SIBLING_TERMINATED = "sibling_terminated", False
    # Admission (`preempt` policy) and the basic service's memory watch.
    PREEMPTED = "preempted", True
    BASIC_SERVICE_PRESSURE = "basic_service_pressure", True
    # The cloud manager and the operator.
    CLOUD_WITHDRAWAL = "cloud_withdrawal", False
    HANDOVER = "handover", False
    NODE_SHUTDOWN = "node_shutdown", True
    DISCARDED_BY_OPERATOR = "discarded_by_operator", False
    # The node itself: a container found gone, a termination a restart finished, a merge
    # retried (each only where the record kept no reason of its own).
    CONTAINER_LOST = "container_lost", False
    RECONCILE = "reconcile", False
    MIGRATION_RETRY = "migration_retry", False
    # The cloud manager's own, never sent by a node: a deployment withdrawn before its
    # users moved, a server found gone without an event.
    DEPLOYMENT_FAILED = "deployment_failed", False
    GONE_WITHOUT_EVENT = "gone_without_event", False


class ScaleReason(StrEnum):
    """Why a server's limits changed (`server.scaled`)."""

    LATENCY_ABOVE_OBJECTIVE = "latency_above_objective"  # Procedure 6, in the round
    LATENCY_BELOW_OBJECTIVE = "latency_below_objective"  # P5.9
    LATENCY_ABOVE_OBJECTIVE_FAST = "latency_above_objective_fast"  # the fast latency loop
    LATENCY_BELOW_OBJECTIVE_FAST = "latency_below_objective_fast"
    OPERATOR = "operator"  # by hand (`PUT /v1/servers/{id}/limits`)


EventReason = TerminationReason | ScaleReason | Literal["handshake", "changed_outside_enorm"]
EventType = Literal["server.launched", "server.scaled", "server.terminated",
                    "server.migration_failed", "server.limits_restored"]
# The reasons each type of event carries: all a node can send.
EVENT_REASONS: dict[str, frozenset[str]] = {
    "server.launched": frozenset({"handshake"}),
    "server.scaled": frozenset(ScaleReason),
    "server.terminated": frozenset(TerminationReason),
    "server.migration_failed": frozenset(TerminationReason),
    "server.limits_restored": frozenset({"changed_outside_enorm"}),
}


class Event(_Message):
    """Something the edge did, recorded and (when a callback is set) sent to the cloud."""

    id: str
    type: EventType
    server_id: str
    app: str
    owner: str = ""
    at: float
    reason: EventReason
    data: dict = Field(default_factory=dict)

    @model_validator(mode="after")
    def _reason_of_its_type(self) -> Event:
        if self.reason not in EVENT_REASONS[self.type]:
            raise ValueError(f"reason: {self.reason} is not a reason of {self.type}")
        return self


class TerminateQuery(BaseModel):
    """`DELETE /v1/servers/{id}?conflicts=`: how the merge settles a served user's key
    that the cloud changed since the copy (unknown parameters are ignored)."""

    conflicts: Literal["setup", "cloud"] = Field(
        "setup", description="setup: the edge's value wins except for the setup "
        "request's cloud_wins_patterns; cloud: the cloud's value wins for every key (a "
        "withdrawal whose users came home while this node was out of reach: what they "
        "wrote on the cloud since is newer). Counted as conflicts either way")


class EventsQuery(BaseModel):
    """`GET /v1/events?limit=&server=`: the newest events first (unknown parameters are
    ignored)."""

    limit: Int = Field(100, ge=1, le=10_000, description="how many, at most")
    server: str | None = Field(None, max_length=64, description="only this server's")

    @field_validator("limit", mode="before")
    @classmethod
    def _digits(cls, v: object) -> object:
        """A query's text: decimal digits (a JSON Schema integer may be written 5.0)."""
        if not isinstance(v, str):
            return v
        whole = v.removesuffix(".0")
        if not (whole.isascii() and whole.isdigit()):
            raise ValueError("must be an integer within 1-10000")
        return int(whole)


class MergeReport(_Message):
    """What merging one or more servers' data back did (termination result and event)."""

    keys_migrated: int = Field(0, description="served users' keys brought home (written "
                               "to the cloud, or `untouched`: the cloud's value stands), "
                               "and shared keys merged there (`shared_merged`)")
    shared_merged: int = Field(0, description="shared keys merged by their type's rule")
    shared_ttls: int = Field(0, description="shared keys whose expiry the merge set or "
                             "removed on the cloud (the type's TTL rule)")
    stream_renumbered: int = Field(0, description="entries of shared streams appended "
                                   "with a new ID (theirs was at or below the cloud's "
                                   "last; kept in their field `enorm:edge-id`)")
    not_merged: int = Field(0, description="shared keys of a type without a merge rule "
                            "(a module's): not merged")
    not_merged_sample: list[str] = Field(default_factory=list)
    keys_deleted: int = Field(0, description="served users' keys the edge deleted, "
                              "deleted on the cloud too (needs the copy's manifest)")
    conflicts: int = Field(0, description="served users' keys the cloud changed during "
                           "the offload (needs the manifest)")
    conflicts_cloud_won: int = Field(0, description="conflicts resolved for the cloud "
                                     "(cloud_wins_patterns); the others went to the edge")
    conflict_sample: list[str] = Field(default_factory=list)
    untouched: int = Field(0, description="served users' keys the edge left as they "
                           "were copied out (needs the manifest): not written, the "
                           "cloud's value stands whatever the cloud did meanwhile "
                           "(changed, deleted, nothing), and its TTL where the key went "
                           "out without one and the edge left it so; else the edge's "
                           "TTL set where the cloud's value is still the one copied out")
    not_owned: int = Field(0, description="keys on the edge that are not the server's to "
                           "give back (another user's, the library's `enorm:` namespace, "
                           "neither a served user's nor shared): never merged")
    not_owned_sample: list[str] = Field(default_factory=list)

    def add(self, other: MergeReport) -> None:
        for f in ("keys_migrated", "shared_merged", "shared_ttls", "stream_renumbered",
                  "not_merged", "keys_deleted", "conflicts", "conflicts_cloud_won",
                  "untouched", "not_owned"):
            setattr(self, f, getattr(self, f) + getattr(other, f))
        for f in ("conflict_sample", "not_owned_sample", "not_merged_sample"):
            setattr(self, f, (getattr(self, f) + getattr(other, f))[:10])


class HandoverRequest(_Message):
    """`POST /v1/servers/{id}/handover`: give this server's users, data included, to a
    server on another node, directly, then end this one (its shared keys merged home)."""

    to_url: str = Field(max_length=2048, pattern=NODE_URL_PATTERN, description="the other "
                        "node's API, e.g. http://10.0.0.2:8700 (among the destinations)")
    to_server: str = Field(pattern=r"^[A-Za-z0-9-]{1,64}$")
    key: str = Field(min_length=32, max_length=128, pattern=r"^[A-Za-z0-9_-]+$")

    @field_validator("to_url")
    @classmethod
    def _http(cls, v: str) -> str:
        return v.rstrip("/")


class HandoverData(_Message):
    """`POST /v1/servers/{id}/import` (node to node): users' keys as DUMP payloads, base64,
    with the TTL in ms for RESTORE (0: none); `final` ends the import."""

    keys: list[tuple[str, str, Int]] = Field(max_length=200_000)
    final: bool = False


class ImportResult(_Message):
    keys: int = Field(description="keys restored (RESTORE checked each payload)")
    refused: int = Field(0, description="keys not of this server's users: not written")


class HandoverResult(_Message):
    server_id: str
    to_server: str
    keys: int = Field(description="the users' keys now on the other server, verified there")
    bytes: int
    others: int = Field(0, description="keys of users this server did not serve: left out")
    seconds: float = Field(description="from the fence to the other node's last answer")


class TerminateResult(MergeReport):
    terminated: list[str]
    pending: list[str] = Field(default_factory=list, description="kept: migration pending")
