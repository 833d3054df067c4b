"""Run the game's JMeter plans non-GUI and turn the .jtl into latency percentiles,
throughput and errors.

    python -m bench.jmeter --plan mixed --host 10.0.3.20 --port 50100 --players users.csv \
        --users 100 --duration 300
    python -m bench.jmeter --local --plan aggressive --users 8 --duration 20

The first form loads a server someone else deployed; the players CSV (`uid,token,lat,lng`)
names users that server holds. `--local` starts its own cloud and edge game server on
loopback (each with a throw-away redis-server), creates the players in the cloud's Redis
with the game's own logic, copies them to the edge and redirects them there, as a
deployment does, and loads the edge.
Both print the Result as JSON (and write it with --out).

JMeter is Debian's 2.13, started with bullseye's xstream 1.4.15 first on the class path
(scripts/setup.sh installs both; ../shared/ENVIRONMENT.md says why). Hosts must be IP
literals: JMeter must not look up names.

Virtual users are multiplexed onto at most `max_threads` JMeter threads: each iteration
plays the next user of the CSV, and in the mixed plan the think time per thread shrinks
by threads/users, so the offered rate is that of `users` users each thinking the full
time. Result.target_rate is that offered rate (None for aggressive users, who send as
fast as they can), Result.achieved_rate what JMeter actually sent: when the threads or
the machine cannot keep up, the second is lower, and the report says so.
"""

from __future__ import annotations

import argparse
import csv
import ipaddress
import json
import logging
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import requests

from games.pokemon.jmeter import plans as game_plans
from games.pokemon.logic import Game

JMETER_HOME = Path(os.environ.get("ENORM_JMETER_HOME", "/usr/share/jmeter"))
XSTREAM_JAR = Path(
    os.environ.get("ENORM_JMETER_XSTREAM", "/var/cache/enorm/jmeter/xstream-1.4.15.jar")
)
PLAN_DIR = game_plans.HERE
PLANS = tuple(game_plans.PLANS)
ENGINES = ("jmeter", "locust", "wrk")
MAX_THREADS = 200
# The .jtl as CSV with a header, start time stamps in ms, and the fields parse_jtl reads.
JTL_PROPERTIES = {
    "jmeter.save.saveservice.output_format": "csv",
    "jmeter.save.saveservice.print_field_names": "true",
    "jmeter.save.saveservice.timestamp_format": "ms",
    "jmeter.save.saveservice.default_delimiter": ",",
    "jmeter.save.saveservice.response_code": "true",
    "jmeter.save.saveservice.successful": "true",
    "jmeter.save.saveservice.latency": "true",
    "jmeter.save.saveservice.bytes": "true",
    "jmeter.save.saveservice.label": "true",
    "jmeter.save.saveservice.thread_counts": "true",
    "sampleresult.timestamp.start": "true",
}


class JMeterError(RuntimeError):
    """JMeter is missing, failed, or wrote no usable .jtl."""


@dataclass(frozen=True)
class Player:
    """One game user as the plans see it: id, token, where the user stands, and
    optionally the source address its requests leave from (JMeter only; an IP literal
    assigned where JMeter runs, e.g. one per user from 198.18.0.0/15)."""

    uid: str
    token: str
    lat: float
    lng: float
    src: str = ""


@dataclass
class Result:
    """One run. Latencies in ms over all samples (errors included), rates in requests/s
    over the span from the first request's start to the last one's end."""

    plan: str
    users: int
    threads: int
    duration_s: float  # the span the rates are measured over
    requests: int
    errors: int
    p50: float
    p95: float
    p99: float
    mean: float
    max: float
    throughput: float  # successful responses per second
    achieved_rate: float  # requests sent per second
    target_rate: float | None = None  # the offered rate of `users` users (None: unpaced)
    bytes: int = 0
    client_cpu_s: float | None = None  # the load generator's CPU time (user + sys)
    engine: str = "jmeter"
    error_codes: dict[str, int] = field(default_factory=dict)
    by_label: dict[str, dict] = field(default_factory=dict)
    jtl: str = ""

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def to_json(self) -> dict:
        return {**asdict(self), "error_rate": self.error_rate}


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The nearest-rank percentile (q in 0..100) of an ascending list."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return float(sorted_values[rank - 1])


def parse_jtl(path: str | Path, *, plan: str = "", users: int = 0, threads: int = 0,
              target_rate: float | None = None, warmup_s: float = 0.0) -> Result:  # fmt: skip
    """Read a CSV .jtl (with its header line) into a Result. Samples that start within
    `warmup_s` of the first one are left out."""
    path = Path(path)
    with path.open(newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.DictReader(f)
        need = {"timeStamp", "elapsed", "label", "responseCode", "success"}
        missing = need - set(reader.fieldnames or ())
        if missing:
            raise JMeterError(f"{path}: not a CSV .jtl with a header (missing {sorted(missing)})")
        rows = []
        for n, row in enumerate(reader, start=2):
            try:
                rows.append((int(row["timeStamp"]), int(row["elapsed"]), row["label"],
                             row["responseCode"], row["success"].strip().lower() == "true",
                             int(row.get("bytes") or 0)))  # fmt: skip
            except (TypeError, ValueError) as exc:
                raise JMeterError(f"{path}:{n}: bad sample line ({exc})") from None
    if rows and warmup_s > 0:
        cut = min(r[0] for r in rows) + warmup_s * 1000
        rows = [r for r in rows if r[0] >= cut]
    if not rows:
        raise JMeterError(f"{path}: no samples")
    start = min(r[0] for r in rows)
    end = max(r[0] + r[1] for r in rows)
    span = max(end - start, 1) / 1000
    errors = [r for r in rows if not r[4]]
    by_label: dict[str, dict] = {}
    for label in sorted({r[2] for r in rows}):
        sel = [r for r in rows if r[2] == label]
        lat = sorted(r[1] for r in sel)
        by_label[label] = {"requests": len(sel), "errors": sum(not r[4] for r in sel),
                           "p50": percentile(lat, 50), "p95": percentile(lat, 95),
                           "mean": sum(lat) / len(lat)}  # fmt: skip
    lat = sorted(r[1] for r in rows)
    return Result(
        plan=plan, users=users, threads=threads, duration_s=round(span, 3),
        requests=len(rows), errors=len(errors),
        p50=percentile(lat, 50), p95=percentile(lat, 95), p99=percentile(lat, 99),
        mean=round(sum(lat) / len(lat), 3), max=float(lat[-1]),
        throughput=round((len(rows) - len(errors)) / span, 3),
        achieved_rate=round(len(rows) / span, 3), target_rate=target_rate,
        bytes=sum(r[5] for r in rows), error_codes=dict(Counter(r[3] for r in errors)),
        by_label=by_label, jtl=str(path),
    )  # fmt: skip


def join_jtl(jtls: list[Path], out: Path, warmup_s: float) -> Path:
    """The .jtl files of engines run side by side as one (one header), each without the
    samples that started within `warmup_s` of its own first one (the engines start at
    slightly different times, each with a cold JIT and its own ramp-up)."""
    with out.open("w") as f:
        for i, jtl in enumerate(jtls):
            with jtl.open(newline="") as src:
                rows = list(csv.reader(src))
            head, body = rows[0], rows[1:]
            at = head.index("timeStamp")
            cut = min((int(r[at]) for r in body), default=0) + warmup_s * 1000
            w = csv.writer(f)
            if i == 0:
                w.writerow(head)
            w.writerows(r for r in body if int(r[at]) >= cut)
    return out


def write_players(path: str | Path, players: Iterable[Player]) -> Path:
    """The CSV the plans read (no header: JMeter's CSVDataSet names the columns). Always
    five columns: a missing one would reach JMeter as the literal `${src}`, a name."""
    path = Path(path)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        for p in players:
            w.writerow([p.uid, p.token, f"{p.lat:.6f}", f"{p.lng:.6f}", p.src])
    return path


def read_players(path: str | Path) -> list[Player]:
    players = []
    with Path(path).open(newline="") as f:
        for n, r in enumerate(csv.reader(f), start=1):
            if not r:
                continue
            try:
                uid, token, lat, lng, *src = r
                if len(src) > 1:
                    raise ValueError
                if src and src[0]:
                    ipaddress.ip_address(src[0])
                players.append(Player(uid, token, float(lat), float(lng), *src))
            except ValueError:
                raise ValueError(
                    f"players: {path}:{n}: expected uid,token,lat,lng[,source IP]"
                ) from None
    return players


def spot(i: int) -> tuple[float, float]:
    """A distinct place in London for user i (a grid of about 100 m steps)."""
    return round(51.45 + (i // 200) * 0.001, 6), round(-0.25 + (i % 200) * 0.0015, 6)


def create_players(cloud_redis, n: int, *, prefix: str = "jmeter") -> list[Player]:
    """n users in the cloud's Redis, made by the game's own logic (log in, then stand at
    their own spot, so that the data-intensive requests have a region to answer for).
    Logging in again with the same prefix returns the same users."""
    game = Game(cloud_redis)
    players = []
    for i in range(n):
        uid, token, _ = game.create_or_login("jmeter", f"{prefix}-{i}")
        lat, lng = spot(i)
        game.update_location(uid, lat, lng)
        players.append(Player(uid, token, lat, lng))
    return players


def check_installed() -> None:
    for path, what in ((JMETER_HOME / "bin" / "ApacheJMeter.jar", "JMeter"),
                       (XSTREAM_JAR, "xstream 1.4.15")):  # fmt: skip
        if not path.is_file():
            raise JMeterError(f"{what} not found at {path}: run scripts/setup.sh (as root)")


def command(plan: Path, jtl: Path, log: Path, props: dict[str, object],
            heap: str = "512m") -> list[str]:  # fmt: skip
    """The java command line that runs `plan` non-GUI."""
    jars = f"{XSTREAM_JAR}:{JMETER_HOME / 'bin' / 'ApacheJMeter.jar'}"
    return [
        "java", f"-Xmx{heap}", "-Djava.awt.headless=true", "-cp", jars,
        f"-Djmeter.home={JMETER_HOME}", "org.apache.jmeter.NewDriver",
        "-n", "-t", str(plan), "-l", str(jtl), "-j", str(log),
        *(f"-J{k}={v}" for k, v in {**JTL_PROPERTIES, **props}.items()),
    ]  # fmt: skip


def run(plan: str, host: str, port: int, users: int, duration: float, *,
        players: Sequence[Player] | str | Path, engine: str = "jmeter",
        max_threads: int = MAX_THREADS, think_ms: int | None = None,
        rampup: float | None = None, warmup_s: float = 0.0,
        out_dir: str | Path | None = None, heap: str = "512m",
        netns: str | None = None, launcher: Sequence[str] = ()) -> Result:  # fmt: skip
    """Run `plan` ("aggressive" or "mixed") with `users` virtual users for `duration`
    seconds against the game server at host:port (an IP literal) and parse its .jtl.

    players: the users the server holds (a list, or the path of a players CSV); the
    first `users` of them play. engine: "jmeter", "locust" (the same load from
    locustfile.py; max_threads is then the number of Locust users) or "wrk" (the same
    load from wrk.lua: one keep-alive connection per thread, for rates JMeter cannot
    offer next to the servers on this machine). think_ms: the mean think time of one mixed user
    (default: the recorded session's). The .jtl, the engine's log and the players CSV
    stay in out_dir (a temporary directory, removed afterwards, when None). netns: run
    the engine inside that network namespace (`ip netns exec`), e.g. the users' one.
    launcher: a command prefix for the engine (e.g. a cost group's, testbed/cost.py).
    """
    if plan not in PLANS:
        raise ValueError(f"plan: {plan!r} is not one of {', '.join(PLANS)}")
    if engine not in ENGINES:
        raise ValueError(f"engine: {engine!r} is not one of {', '.join(ENGINES)}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"host: {host!r} is not an IP literal (JMeter must not look up names)"
        ) from None
    if not 0 < port < 65536:
        raise ValueError(f"port: {port} is out of range")
    for name, value in (("users", users), ("duration", duration), ("max_threads", max_threads)):
        if value <= 0:
            raise ValueError(f"{name}: must be positive, not {value}")
    roster = read_players(players) if isinstance(players, (str, Path)) else list(players)
    if len(roster) < users:
        raise ValueError(f"players: {len(roster)} given, {users} users asked for")
    for p in roster[:users]:
        if p.src:
            try:
                ipaddress.ip_address(p.src)
            except ValueError:
                raise ValueError(f"players: source {p.src!r} is not an IP literal") from None
            if engine != "jmeter":
                raise ValueError(f"players: source addresses need engine jmeter, not {engine}")
    wrap = [*launcher, *(["ip", "netns", "exec", netns] if netns else [])]
    if engine == "jmeter":
        check_installed()
    threads = min(users, max_threads)
    think = game_plans.session_think_ms() if think_ms is None else think_ms
    props: dict[str, object] = {
        "host": host, "port": port, "threads": threads, "duration": math.ceil(duration),
        "rampup": math.ceil(rampup if rampup is not None else min(5.0, duration / 10)),
        "pause_ms": 0, "pause_jitter_ms": 0,
    }  # fmt: skip
    target = None
    if plan == "mixed":
        # One thread stands for users/threads users: its think time shrinks as much.
        per_thread = think * threads / users
        props["pause_ms"] = round(per_thread / 2)
        props["pause_jitter_ms"] = round(per_thread)
        target = round(users * 1000 / think, 3) if think > 0 else None
    with _workdir(out_dir) as work:
        props["users_csv"] = write_players(work / "players.csv", roster[:users])
        jtl = work / f"{plan}.jtl"
        jtl.unlink(missing_ok=True)
        cpu = _children_cpu()
        if engine == "jmeter":
            _run_jmeter(plan, jtl, props, duration, heap, wrap)
        elif engine == "wrk":
            failed = _run_wrk(plan, jtl, props, duration, wrap)
        else:
            _run_locust(plan, jtl, props, duration, wrap)
        cpu = round(_children_cpu() - cpu, 3)
        result = parse_jtl(jtl, plan=plan, users=users, threads=threads,
                           target_rate=target, warmup_s=warmup_s)  # fmt: skip
        if engine == "wrk" and failed:  # connections that failed before any request
            result.requests += failed
            result.errors += failed
            result.error_codes["connect"] = result.error_codes.get("connect", 0) + failed
        result.client_cpu_s = cpu
        result.engine = engine
        if out_dir is None:
            result.jtl = ""
        return result


def _run_jmeter(plan: str, jtl: Path, props: dict, duration: float, heap: str,
                wrap: list[str]) -> None:  # fmt: skip
    log = jtl.with_suffix(".log")
    cmd = wrap + command(PLAN_DIR / f"{plan}.jmx", jtl, log, props, heap)
    proc = _bounded(cmd, duration, cwd=jtl.parent)
    if proc.returncode != 0 or not jtl.is_file():
        tail = (log.read_text()[-2000:] if log.is_file() else "") or proc.stderr[-2000:]
        raise JMeterError(f"jmeter exited with {proc.returncode}: {tail}")
    errors = [x for x in log.read_text().splitlines() if " ERROR - " in x]
    if errors:  # e.g. a CSV it could not read: the plan ran, but not as asked
        raise JMeterError("jmeter logged errors: " + " | ".join(errors[:5]))


def _run_locust(plan: str, jtl: Path, props: dict, duration: float, wrap: list[str]) -> None:
    """locustfile.py headless, one process per core; its per-process .jtl files are
    joined into `jtl`."""
    prefix = jtl.with_suffix("")
    log = jtl.with_suffix(".log")
    threads = int(props["threads"])
    processes = max(1, min(os.cpu_count() or 1, threads))
    cmd = [
        *wrap, sys.executable, "-m", "locust", "-f", str(PLAN_DIR / "locustfile.py"), "--headless",
        "--host", f"http://{props['host']}:{props['port']}", "-u", str(threads),
        "-r", str(max(1, math.ceil(threads / max(1, int(props["rampup"]))))),
        "-t", f"{math.ceil(duration)}s", "--stop-timeout", "0", "--only-summary",
        "--loglevel", "WARNING", "--logfile", str(log),
        *(["--processes", str(processes)] if processes > 1 else []),
    ]  # fmt: skip
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "ENORM_PLAN": plan,
           "ENORM_PLAYERS": str(props["users_csv"]), "ENORM_JTL": str(prefix),
           "ENORM_PAUSE_MS": str(props["pause_ms"]),
           "ENORM_PAUSE_JITTER_MS": str(props["pause_jitter_ms"])}  # fmt: skip
    proc = _bounded(cmd, duration, cwd=jtl.parent, env=env)
    parts = sorted(jtl.parent.glob(f"{prefix.name}.*.jtl"))
    # exit code 1 only says that some requests failed: the .jtl counts them
    if proc.returncode not in (0, 1) or not parts:
        raise JMeterError(f"locust exited with {proc.returncode}: {proc.stderr[-2000:]}")
    with jtl.open("w") as out:
        for i, part in enumerate(parts):
            lines = part.read_text().splitlines(keepends=True)
            out.writelines(lines if i == 0 else lines[1:])
            part.unlink()


def _run_wrk(plan: str, jtl: Path, props: dict, duration: float, wrap: list[str]) -> int:
    """wrk with wrk.lua, one thread and connection per JMeter thread; its per-thread
    .jtl files are joined into `jtl`. Returns the connect errors (no sample of theirs)."""
    if shutil.which("wrk") is None:
        raise JMeterError("wrk not found: run scripts/setup.sh (as root)")
    prefix = jtl.with_suffix("")
    steps = jtl.with_name("steps.tsv")
    steps.write_text("".join(
        "\t".join((f"{name} {path}", method, path, body or "")) + "\n"
        for name in game_plans.PLANS[plan]
        for method, path, body in [game_plans.REQUESTS[name]]))  # fmt: skip
    threads = str(props["threads"])
    cmd = [*wrap, "wrk", "-t", threads, "-c", threads, "-d", f"{math.ceil(duration)}s",
           "--timeout", "10s",  # the plans' response timeout
           "-s", str(PLAN_DIR / "wrk.lua"), f"http://{props['host']}:{props['port']}/"]
    env = {**os.environ, "ENORM_PLAYERS": str(props["users_csv"]), "ENORM_STEPS": str(steps),
           "ENORM_JTL": str(prefix), "ENORM_THREADS": threads,
           "ENORM_PAUSE_MS": str(props["pause_ms"]),
           "ENORM_PAUSE_JITTER_MS": str(props["pause_jitter_ms"])}  # fmt: skip
    proc = _bounded(cmd, duration, cwd=jtl.parent, env=env)
    parts = sorted(jtl.parent.glob(f"{prefix.name}.*.jtl"))
    summary = re.search(r"wrk-summary .*connect=(\d+)", proc.stderr)
    if proc.returncode != 0 or not parts or summary is None:
        raise JMeterError(f"wrk exited with {proc.returncode}: "
                          f"{(proc.stdout + proc.stderr)[-2000:]}")
    with jtl.open("w") as out:
        for i, part in enumerate(parts):
            lines = part.read_text().splitlines(keepends=True)
            out.writelines(lines if i == 0 else lines[1:])
            part.unlink()
    return int(summary.group(1))


def _bounded(cmd: list[str], duration: float, **kw) -> subprocess.CompletedProcess:
    """Run the engine; one that outlives its duration by two minutes is killed."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 120, **kw)
    except subprocess.TimeoutExpired:
        raise JMeterError(f"{cmd[0]} still running {duration + 120:.0f} s after start") from None


def _children_cpu() -> float:
    """CPU seconds of the waited-for child processes so far (JMeter, once it has ended)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@contextmanager
def _workdir(out_dir: str | Path | None) -> Iterator[Path]:
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        yield Path(out_dir)
        return
    with tempfile.TemporaryDirectory(prefix="enorm-jmeter-") as tmp:
        yield Path(tmp)


@contextmanager
def local_edge(users: int, *, prefix: str = "jmeter") -> Iterator[tuple[str, int, list[Player]]]:
    """A cloud and an edge game server on loopback, each with its own redis-server, and
    `users` players logged in at the cloud, copied to the edge and redirected there:
    yields (edge host, edge port, players). Everything stops on exit, also on failure."""
    import redis

    from enorm import datasync
    from games.local import CloudServer, LocalRedis, _stop, _wait, free_port
    from games.pokemon import cloud as game_cloud

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    root = Path(__file__).resolve().parents[1]
    stack: list = []
    try:
        cloud_redis = LocalRedis()
        stack.append(cloud_redis.close)
        edge_redis = LocalRedis()
        stack.append(edge_redis.close)
        cloud_client = redis.Redis.from_url(cloud_redis.url)
        cloud = CloudServer(game_cloud.create_app(cloud_client), host="127.0.0.1")
        stack.append(cloud.close)
        port = free_port()
        out = tempfile.NamedTemporaryFile(prefix="enorm-jmeter-edge-", suffix=".log",  # noqa: SIM115
                                          delete=False)  # fmt: skip
        stack.append(lambda: os.unlink(out.name))
        edge = subprocess.Popen(
            [sys.executable, "-m", "games.pokemon.edge", "--host", "127.0.0.1", "--port", str(port),
             "--cloud", cloud.url, "--redis", edge_redis.url, "--log", ""],
            cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        out.close()  # the server holds its own descriptor
        stack.append(lambda: _stop(edge))
        players = create_players(cloud_client, users, prefix=prefix)
        edge_client = redis.Redis.from_url(edge_redis.url)
        report = datasync.copy_users(cloud_client, edge_client, [p.uid for p in players])
        if not report.verified:
            raise RuntimeError("copying the players to the edge Redis did not verify")
        edge_url = f"http://127.0.0.1:{port}"
        game_cloud.redirect(cloud_client, [p.uid for p in players], edge_url)
        _wait(lambda: requests.get(edge_url + "/stats", timeout=2).ok, 20, "edge server", edge)
        yield "127.0.0.1", port, players
    finally:
        for close in reversed(stack):
            close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plan", choices=PLANS, required=True)
    p.add_argument("--users", type=int, default=1)
    p.add_argument("--duration", type=float, default=300, help="seconds (the paper: 300)")
    p.add_argument("--host", help="the game server's IP address")
    p.add_argument("--port", type=int)
    p.add_argument("--players", type=Path, help="CSV uid,token,lat,lng of users the server holds")
    p.add_argument("--local", action="store_true", help="start a cloud and edge server on loopback")
    p.add_argument("--engine", choices=ENGINES, default="jmeter")
    p.add_argument("--netns", default=None, help="run the engine in this network namespace")
    p.add_argument("--max-threads", type=int, default=MAX_THREADS)
    p.add_argument("--think-ms", type=int, default=None, help="mean think time of a mixed user")
    p.add_argument("--warmup", type=float, default=0.0, help="seconds of samples to leave out")
    p.add_argument("--jtl-dir", type=Path, default=None, help="keep the .jtl and logs here")
    p.add_argument("--out", type=Path, default=None, help="write the Result as JSON here")
    a = p.parse_args(argv)
    kw = dict(engine=a.engine, netns=a.netns, max_threads=a.max_threads,
              think_ms=a.think_ms, warmup_s=a.warmup, out_dir=a.jtl_dir)  # fmt: skip
    try:
        if a.local:
            with local_edge(a.users) as (host, port, players):
                result = run(a.plan, host, port, a.users, a.duration, players=players, **kw)
        else:
            if not (a.host and a.port and a.players):
                p.error("--host, --port and --players are needed (or --local)")
            result = run(a.plan, a.host, a.port, a.users, a.duration, players=a.players, **kw)
    except (ValueError, JMeterError, OSError) as exc:
        print(f"bench.jmeter: {exc}", file=sys.stderr)
        return 2
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    doc = json.dumps({**result.to_json(), "measured_at": stamp}, indent=2)
    if a.out:
        a.out.write_text(doc + "\n")
    print(doc)
    if result.target_rate and result.achieved_rate < 0.9 * result.target_rate:
        print(f"bench.jmeter: offered {result.target_rate} req/s, achieved only "
              f"{result.achieved_rate} req/s", file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
