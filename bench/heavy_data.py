"""The heavy data set of the deployment bench, and the floor it is measured against.

Heavy: on top of the game's own keys (about 5 per user, 180 bytes), every Redis type and
some large values, as a richer game would keep: an inbox per user (a stream for even
users, a list for odd ones), a session string with a TTL, the location with a TTL, an
8 KB avatar (incompressible) for every 8th user, and a Pokedex of 200 names (a hash-table
set, whose DUMP order is the table's) for every 16th. At 16,384 users: about 7.2 keys
per user, 117,500 keys, 29 MB, 36,900 keys with a TTL.

Floor: the same keys moved by a bare pipeline (DUMP + PTTL on one side, RESTORE on the
other, one after the other, no script, no verification), on a raw socket with the
hiredis parser, so the client costs as little as a Python client can.
"""

from __future__ import annotations

import glob
import os
import random
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path
from urllib.parse import unquote, urlparse

import hiredis
import redis

from enorm.datasync import KeySchema

EXTRA_FIXED = ("inbox:{<user>}", "session:{<user>}", "avatar:{<user>}")
AVATAR_BYTES = 8192
BIG_POKEDEX = 200


def schema(base: KeySchema) -> KeySchema:
    """The game's key schema with the heavy set's extra keys."""
    return replace(base, fixed=(*base.fixed, *EXTRA_FIXED))


def add(client: redis.Redis, users: list[str], seed: int = 7) -> None:
    """Add the heavy keys to the game's users on `client`."""
    rng = random.Random(seed)
    pipe = client.pipeline(transaction=False)
    for i, u in enumerate(users):
        inbox = f"inbox:{{{u}}}"
        if i % 2 == 0:
            for m in range(4):
                pipe.xadd(inbox, {"from": f"player{rng.randrange(99999)}", "kind": "trade",
                                  "body": "x" * rng.randrange(40, 160), "n": m})  # fmt: skip
            if i % 4 == 0:
                pipe.expire(inbox, 86_400)
        else:
            pipe.rpush(inbox, *(f"gift:{rng.randrange(151)}:{'y' * 60}" for _ in range(6)))
        pipe.set(f"session:{{{u}}}", os.urandom(24).hex(), ex=3600)
        pipe.expire(f"loc:{{{u}}}", 7200)
        if i % 8 == 0:
            pipe.set(f"avatar:{{{u}}}", os.urandom(AVATAR_BYTES))
        if i % 16 == 0:
            pipe.sadd(f"pokedex:{{{u}}}", *(f"species-{s}" for s in range(BIG_POKEDEX)))
        if len(pipe) > 5000:
            pipe.execute()
    pipe.execute()


def play(edge: redis.Redis, users: list[str], every: int = 4) -> int:
    """A session's play on the edge: every `every`-th user's hash, location and inbox
    change. Returns how many keys were written."""
    pipe = edge.pipeline(transaction=False)
    for i, u in enumerate(users):
        if i % every:
            continue
        pipe.hincrby(f"u:{{{u}}}", "xp", 10)
        pipe.hset(f"loc:{{{u}}}", "ts", str(1_800_000_000 + i))
        if i % 2 == 0:  # as `add` made the inbox: a stream for even users, else a list
            pipe.xadd(f"inbox:{{{u}}}", {"from": "edge", "kind": "gift", "n": i})
        else:
            pipe.rpush(f"inbox:{{{u}}}", f"gift:edge:{i}")
    return len(pipe.execute())


def _connect(url: str) -> socket.socket:
    u = urlparse(url)
    s = socket.create_connection((u.hostname, u.port or 6379), timeout=30)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if u.password:
        s.sendall(hiredis.pack_command(("AUTH", unquote(u.password))))
        reader = hiredis.Reader()
        reply = False
        while reply is False:
            reader.feed(s.recv(4096))
            reply = reader.gets()
    return s


def _pipeline(s: socket.socket, commands: list[bytes], n: int) -> list:
    """Send the packed commands, read `n` replies."""
    reader = hiredis.Reader()
    s.sendall(b"".join(commands))
    out: list = []
    while len(out) < n:
        reader.feed(s.recv(1 << 20))
        while (r := reader.gets()) is not False:
            out.append(r)
    return out


def bare_copy(src_url: str, dst_url: str, keys: list[bytes], chunk: int = 10_000) -> dict:
    """The floor: DUMP + PTTL every key on `src`, then RESTORE ... REPLACE them on `dst`,
    `chunk` keys per round trip. Returns seconds, keys and payload bytes moved."""
    pack = hiredis.pack_command
    src, dst = _connect(src_url), _connect(dst_url)
    try:
        t = time.perf_counter()
        dumped: list[tuple[bytes, bytes, int]] = []
        for i in range(0, len(keys), chunk):
            part = keys[i : i + chunk]
            replies = _pipeline(src, [c for k in part for c in (pack(("DUMP", k)),
                                                                 pack(("PTTL", k)))],
                                2 * len(part))  # fmt: skip
            dumped += [(k, p, max(ttl, 0)) for k, p, ttl in
                       zip(part, replies[::2], replies[1::2], strict=True) if p is not None]
        for i in range(0, len(dumped), chunk):
            part = dumped[i : i + chunk]
            _pipeline(dst, [pack(("RESTORE", k, ttl, p, "REPLACE")) for k, p, ttl in part],
                      len(part))
        seconds = time.perf_counter() - t
    finally:
        src.close()
        dst.close()
    return {"seconds": seconds, "keys": len(dumped),
            "bytes": sum(len(p) for _, p, _ in dumped)}  # fmt: skip


# -- where a data move's time goes ------------------------------------------------------
def _redis_cpu(client: redis.Redis) -> tuple[float, dict[str, int]]:
    """A Redis's CPU seconds (all its threads) and microseconds per command (calls from
    scripts counted under their own command, and inside the EVAL's too)."""
    info = client.info("cpu", "commandstats")
    by_cmd = {k[len("cmdstat_"):]: v["usec"] for k, v in info.items() if k.startswith("cmdstat_")}
    return info["used_cpu_sys"] + info["used_cpu_user"], by_cmd


def _proc_cpu(pid: int) -> float:
    """A process's CPU seconds, all its threads (/proc/<pid>/stat: utime, stime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cgroup_cpu(name_glob: str) -> dict[str, float] | None:
    """A container's CPU seconds and CFS throttling (cgroup v1), None if it has none."""
    usage = glob.glob(f"/sys/fs/cgroup/cpuacct/lxc.payload.{name_glob}/cpuacct.usage")
    stat = glob.glob(f"/sys/fs/cgroup/cpu/lxc.payload.{name_glob}/cpu.stat")
    if len(usage) != 1 or len(stat) != 1:
        return None
    try:
        st = dict(line.split() for line in Path(stat[0]).read_text().splitlines())
        return {"cpu_s": int(Path(usage[0]).read_text()) / 1e9,
                "throttled_s": int(st["throttled_time"]) / 1e9,
                "nr_throttled": int(st["nr_throttled"])}
    except OSError:
        return None


class Meter:
    """The CPU each part of a data move spends, from `start()` to `stop()`: the two Redis
    servers (process CPU, and per command after CONFIG RESETSTAT), the client processes
    (/proc) and the container's cgroup (CPU, CFS throttling). A part that goes away
    before the end (a terminated container: its Redis and cgroup) is sampled every
    `every` s and counted until its last sample."""

    def __init__(self, cloud: redis.Redis, edge: redis.Redis, container_glob: str,
                 pids: dict[str, int], every: float = 0.05):
        self.cloud, self.edge, self.glob, self.pids, self.every = (
            cloud, edge, container_glob, pids, every)

    def _edge_sample(self) -> None:
        try:
            self.edge_last = _redis_cpu(self.edge)
            self.cg_last = _cgroup_cpu(self.glob) or self.cg_last
        except (redis.RedisError, OSError):
            self.done.set()  # gone (the container was killed): its last sample stands

    def start(self) -> Meter:
        self.cloud.config_resetstat()
        self.edge.config_resetstat()
        self.cloud0 = _redis_cpu(self.cloud)[0]
        self.edge0 = _redis_cpu(self.edge)[0]
        self.cg0 = self.cg_last = _cgroup_cpu(self.glob)
        self.procs0 = {n: _proc_cpu(p) for n, p in self.pids.items()}
        self.done = threading.Event()
        self.t0 = time.perf_counter()

        def poll() -> None:
            while not self.done.wait(self.every):
                self._edge_sample()

        self.edge_last = _redis_cpu(self.edge)
        self.poller = threading.Thread(target=poll, daemon=True)
        self.poller.start()
        return self

    def stop(self) -> dict:
        wall = time.perf_counter() - self.t0
        if not self.done.is_set():
            self._edge_sample()
        self.done.set()
        self.poller.join()
        cloud_cpu, cloud_cmd = _redis_cpu(self.cloud)
        edge_cpu, edge_cmd = self.edge_last
        out: dict = {
            "wall_s": round(wall, 4),
            "cloud_redis_cpu_s": round(cloud_cpu - self.cloud0, 4),
            "edge_redis_cpu_s": round(edge_cpu - self.edge0, 4),
            "cloud_cmd_ms": {k: round(v / 1000, 1) for k, v in sorted(cloud_cmd.items())},
            "edge_cmd_ms": {k: round(v / 1000, 1) for k, v in sorted(edge_cmd.items())},
        } | {f"{n}_cpu_s": round(_proc_cpu(p) - self.procs0[n], 4)
             for n, p in self.pids.items()}  # fmt: skip
        if self.cg0 and self.cg_last:
            out["container"] = {k: round(self.cg_last[k] - self.cg0[k], 4) for k in self.cg0}
        return out
