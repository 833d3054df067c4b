"""Talking to Redis in bulk: clients with short timeouts, keys grouped per master (and per
slot in a cluster), and scripts run over batches of keys, pipelined, a round trip per
FLUSH keys rather than per batch (over an SSH port forward a round trip costs tens of
milliseconds). A batch's command is packed in one call of hiredis (C), not argument by
argument in Python: a chunk of keys is tens of thousands of arguments (names, payloads)."""

from __future__ import annotations

import inspect
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Union

import redis
from redis.backoff import ExponentialBackoff
from redis.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import ClusterDownError, TryAgainError
from redis.retry import Retry

from .report import DestinationUnreachable, SourceUnreachable, SyncError

try:  # hiredis 2.1+ (setup.cfg); without it redis-py packs (the same bytes, more slowly)
    from hiredis import pack_command as _hiredis_pack
except ImportError:
    _hiredis_pack = None

Client = Union[redis.Redis, RedisCluster]  # noqa: UP007 (kept readable in signatures)

BATCH = 1000  # keys per script call
FLUSH = 50_000  # keys per pipeline flush (one round trip)
# No CLIENT SETINFO on connect: two round trips per connection that a far cloud pays in
# tenths of a second (redis-py 8 takes driver_info=None, 5-7 lib_name/lib_version=None).
_NO_SETINFO: dict[str, Any] = (
    {"driver_info": None}
    if "driver_info" in inspect.signature(redis.Redis.__init__).parameters
    else {"lib_name": None, "lib_version": None}
)


# Nor CLIENT MAINT_NOTIFICATIONS (redis-py 8 asks every new connection whether the server
# will announce maintenance moves, for managed clouds): one more round trip per connect.
try:
    from redis.maint_notifications import MaintNotificationsConfig

    _NO_MAINT: dict[str, Any] = {"maint_notifications_config":
                                 MaintNotificationsConfig(enabled=False)}
except ImportError:  # redis-py before 7
    _NO_MAINT = {}


def connect(url: str, cluster: bool = False, timeout: float = 5.0) -> Client:
    """A client for `url` with short timeouts, so an unreachable peer fails fast."""
    opts: dict[str, Any] = dict(
        socket_timeout=timeout,
        socket_connect_timeout=min(timeout, 2.0),
        decode_responses=False,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 1),
        **_NO_SETINFO,
    )
    if not cluster:
        opts.update(_NO_MAINT)
    if cluster:
        try:
            return RedisCluster.from_url(url, **opts)
        except (redis.ConnectionError, redis.TimeoutError, redis.RedisClusterException) as exc:
            raise SyncError(f"cluster {url} is unreachable: {exc}") from exc
    return redis.Redis.from_url(url, **opts)


# What a twin of an application's client keeps of its connection settings: where and
# who it is, TLS, timeouts; the rest (decoding above all) is datasync's own.
_KEPT = ("host", "port", "path", "db", "username", "password", "credential_provider",
         "socket_timeout", "socket_connect_timeout", "socket_keepalive",
         "socket_keepalive_options", "client_name", "protocol")


def binary(client: Client) -> Client:
    """`client`, or, if it decodes replies (`decode_responses=True`, as a Flask app's
    client often does), a client of the same server(s) that does not: DUMP payloads and
    the scripts' packed replies are bytes. The caller closes a twin it asked for
    (`binary(c) is not c`)."""
    encoder = getattr(client, "get_encoder", None)  # a stand-in of a test has none
    if encoder is None or not encoder().decode_responses:
        return client
    if is_cluster(client):
        from redis.cluster import ClusterNode

        kw = client.nodes_manager.connection_kwargs
        opts = {k: kw[k] for k in _KEPT if k in kw and k not in ("host", "port", "db")}
        opts.update((k, v) for k, v in kw.items() if k.startswith("ssl"))
        nodes = [ClusterNode(n.host, n.port) for n in client.get_nodes()]
        return RedisCluster(startup_nodes=nodes, decode_responses=False, **_NO_SETINFO,
                            **opts)
    pool = client.connection_pool
    kw = pool.connection_kwargs
    opts = {k: kw[k] for k in _KEPT if k in kw}
    opts.update((k, v) for k, v in kw.items() if k.startswith("ssl"))
    return redis.Redis(connection_pool=redis.ConnectionPool(
        connection_class=pool.connection_class, decode_responses=False, **_NO_SETINFO,
        **_NO_MAINT, **opts))


def is_cluster(client: Client) -> bool:
    return isinstance(client, RedisCluster)


# What a cluster raises while a master fails over (its replica takes over within seconds).
FAILING_OVER: tuple[type[Exception], ...] = (
    redis.ConnectionError, redis.TimeoutError, ClusterDownError, TryAgainError)


def through_failover(call: Callable[[], Any], within_s: float = 15.0) -> Any:
    """`call()`, tried again for `within_s` while the cluster cannot answer (a master
    failing over: its replica takes over within seconds); for calls that may repeat."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return call()
        except FAILING_OVER:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.25)


def mget(client: Client, keys: Sequence[str | bytes]) -> list[Any]:
    """GET of many keys in one round trip per master (a cluster splits it by slot)."""
    if not keys:
        return []
    return client.mget_nonatomic(keys) if is_cluster(client) else client.mget(keys)


def masters(client: Client) -> list[redis.Redis]:
    """Plain clients for every master: SCAN must visit each of them in a cluster."""
    if not is_cluster(client):
        return [client]
    return [client.get_redis_connection(n) for n in client.get_primaries()]


def by_node(client: Client, keys: Iterable[bytes]) -> dict[redis.Redis, list[bytes]]:
    """Keys grouped by the master that owns their slot (one group when not a cluster)."""
    if not is_cluster(client):
        return {client: list(keys)}
    nodes: dict[str, redis.Redis] = {}
    out: dict[str, list[bytes]] = defaultdict(list)
    for key in keys:
        node = client.nodes_manager.get_node_from_slot(key_slot(key))
        nodes.setdefault(node.name, client.get_redis_connection(node))
        out[node.name].append(key)
    return {nodes[name]: ks for name, ks in out.items()}


def slot_batches(client: Client, keys: list[bytes], size: int) -> dict[redis.Redis, list[list]]:
    """Batches of at most `size` keys per master; in a cluster a batch holds one slot,
    because a script may only touch keys of one slot."""
    out: dict[redis.Redis, list[list[bytes]]] = {}
    for node, ks in by_node(client, keys).items():
        if is_cluster(client):
            slots: dict[int, list[bytes]] = defaultdict(list)
            for k in ks:
                slots[key_slot(k)].append(k)
            groups = list(slots.values())
        else:
            groups = [ks]
        out[node] = [g[i : i + size] for g in groups for i in range(0, len(g), size)]
    return out


class Guard:
    """Turns connection errors into the SyncError subclass naming the side that failed."""

    def __init__(self, side: str):
        self.side = side

    def __enter__(self) -> None:
        return None

    def __exit__(self, typ: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is None or isinstance(exc, SyncError):
            return False
        if isinstance(exc, (redis.ConnectionError, redis.TimeoutError, OSError)):
            cls = DestinationUnreachable if self.side == "destination" else SourceUnreachable
            raise cls(f"{self.side} Redis is unreachable: {exc}") from exc
        if isinstance(exc, redis.RedisError):
            raise SyncError(f"{self.side} Redis refused: {exc}") from exc
        return False


def ping(client: Client, side: str = "destination") -> None:
    """Raise the matching SyncError unless every master of `client` answers."""
    with Guard(side):
        for node in masters(client):
            node.ping()


@dataclass
class Job:
    """A command run over `keys` in batches of at most `size` (one slot per batch in a
    cluster); `command` makes a batch's command words."""

    keys: list[bytes]
    command: Callable[[list[bytes]], list[Any]]
    size: int = BATCH


def eval_command(
    script: str,
    args: Callable[[list[bytes]], list[Any]] | None = None,
    keys_of: Callable[[list[bytes]], list[bytes]] | None = None,
) -> Callable[[list[bytes]], list[Any]]:
    """EVAL of `script` with the batch (or `keys_of(batch)`) as KEYS, `args(batch)` as
    ARGV. EVAL rather than EVALSHA: a pipeline of registered scripts first asks SCRIPT
    EXISTS, one more round trip each time; Redis caches the compiled body either way."""

    def command(batch: list[bytes]) -> list[Any]:
        keys = batch if keys_of is None else keys_of(batch)
        return ["EVAL", script, len(keys), *keys, *(args(batch) if args else ())]

    return command


def _pack(conn: redis.connection.AbstractConnection, args: list[Any]) -> bytes:
    if _hiredis_pack is not None:
        try:
            return _hiredis_pack(tuple(args))
        except TypeError:  # a type hiredis does not take: redis-py's packer names it
            pass
    return b"".join(conn.pack_command(*args))


def roundtrip(node: redis.Redis, commands: list[list[Any]]) -> list[Any]:
    """A pipeline of `commands` on one of `node`'s connections: one write, then every
    reply read (a command's error is raised once all are read, so the connection stays
    in step); sent again once on a new connection after a connection error, as redis-py's
    pipeline does."""
    pool = node.connection_pool
    try:
        conn = pool.get_connection()
    except TypeError:  # redis-py before 5.3 wants a command name
        conn = pool.get_connection("EVAL")
    try:
        wire = b"".join(_pack(conn, c) for c in commands)

        def send() -> list[Any]:
            conn.send_packed_command([wire])
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(conn.read_response())
                except redis.ResponseError as exc:
                    replies.append(exc)
            return replies

        out = conn.retry.call_with_retry(send, lambda _exc: conn.disconnect())
    except BaseException:
        conn.disconnect()
        raise
    finally:
        pool.release(conn)
    for reply in out:
        if isinstance(reply, redis.ResponseError):
            raise reply
    return out


def run_jobs(client: Client, jobs: list[Job], side: str,
          flush: int = FLUSH) -> list[list[tuple[list[bytes], Any]]]:  # fmt: skip
    """Run the jobs' batches pipelined per master, in the jobs' order, a round trip per
    `flush` keys rather than per batch (over an SSH port forward a round trip costs tens
    of milliseconds); the (batch, reply) pairs of each job."""
    out: list[list[tuple[list[bytes], Any]]] = [[] for _ in jobs]
    with Guard(side):
        work: dict[redis.Redis, list[tuple[int, list[bytes]]]] = defaultdict(list)
        for j, job in enumerate(jobs):
            for node, batches in slot_batches(client, job.keys, job.size).items():
                work[node] += [(j, b) for b in batches]
        for node, items in work.items():
            pending: list[tuple[int, list[bytes]]] = []
            queued = 0
            for i, (j, batch) in enumerate(items):
                pending.append((j, batch))
                queued += len(batch)
                if queued >= flush or i == len(items) - 1:
                    replies = roundtrip(node, [jobs[jj].command(b) for jj, b in pending])
                    for (jj, b), reply in zip(pending, replies, strict=True):
                        out[jj].append((b, reply))
                    pending, queued = [], 0
    return out


def run_script(
    client: Client,
    keys: list[bytes],
    script: str,
    args: Callable[[list[bytes]], list[Any]],
    side: str,
    size: int = BATCH,
) -> list[tuple[list[bytes], Any]]:
    """Run `script` over `keys` in batches, pipelined per master; (batch, reply) pairs."""
    return run_jobs(client, [Job(keys, eval_command(script, args), size)], side)[0]


def no_args(batch: list[bytes]) -> list[Any]:
    return []
