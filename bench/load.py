"""A small load generator for the testbed, behind one function: `load(...) -> results`.
(The experiments drive the testbed with JMeter, `bench.latency.measure`; this one plays
the game client itself, so that a test sees users follow the redirection.)

Each virtual user is a thread with its own GameClient and its own source address, so the
edge node sees one address per user. Behaviours (the paper's JMeter plans):
- aggressive: data-intensive requests (location update + wild Pokemon) with no pauses;
- mixed: the same, with pauses, alternating with regular requests (own profile);
- paced: the aggressive request, one in every `PACE_S` period at a random moment of it,
  drawn anew for each request (users walking and playing: a steady sample of their
  latency over time, bench.mobility; see `pace`).

Run inside the users' namespace (`ip netns exec enbdu0 python -m bench.load ...`): it logs
every user in at the cloud, prints their ids as one JSON line, waits for a line on stdin
(the testbed offloads them meanwhile), runs the load and prints the results as JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests
from requests.adapters import HTTPAdapter

from games.pokemon.client import GameClient

PAUSE_S = 0.5  # mixed users' think time
PACE_S = 0.5  # paced users: one request every so often
BEHAVIOURS = ("aggressive", "mixed", "paced")


class SourceAdapter(HTTPAdapter):
    def __init__(self, source: str, **kw):
        self.source = source
        super().__init__(**kw)

    def init_poolmanager(self, *a, **kw):
        kw["source_address"] = (self.source, 0)
        super().init_poolmanager(*a, **kw)


def _client(cloud: str, i: int, source: str, prefix: str = "") -> GameClient:
    s = requests.Session()
    s.mount("http://", SourceAdapter(source))
    c = GameClient(cloud, "bench", f"{prefix}user{i}", name=f"{prefix}user{i}", session=s,
                   timeout=30)
    c.login()
    c.update(54.6 + i * 1e-3, -5.93)  # Belfast
    return c


def pace(start: float, now: float, period: int, u: float) -> tuple[float, int]:
    """A paced request's moment and the period of the one after it: in period `period`
    (from `start`, `PACE_S` long) at its fraction `u` (0..1, random), or in the current
    period if that one has passed (a slow request delays only itself and skips the
    periods it overran: at most one request a period, no catching up in a burst).

    The moment is drawn anew for each request, so that no user keeps a place in the
    period relative to the others. With fixed places (user i at i x the golden ratio),
    which users a set held decided what it collided with on this shared machine: in the
    mobility bench the policy's users 13 and 14 started 17 ms after the cloud set's users
    0 and 1, as their answers came back, and measured more a request than the pins on
    the same node (the set 1.3 ms), its user 12 on the same server not (`bench.mobility
    --counters`, session 7): the bins over 1.2x of the best node that session 6 took for
    a new server's first seconds."""
    period = max(period, int((now - start) / PACE_S))
    return start + PACE_S * (period + u), period + 1


def _run(c: GameClient, behaviour: str, until: float, out: list, errors: list,
         trace: list | None, i: int, who: bool = False, seed: str = "") -> None:  # fmt: skip
    # each user its own draws, different in each load process (`seed`: its prefix)
    rng, start, period, step = random.Random(f"{seed}/{i}"), time.monotonic(), 0, 0
    while time.monotonic() < until:
        if behaviour == "paced":
            due, period = pace(start, time.monotonic(), period, rng.random())
            time.sleep(max(0.0, due - time.monotonic()))
        t = time.perf_counter()
        try:
            if behaviour == "mixed" and step % 2:
                c.me()
            else:
                c.update(54.6 + (step % 50) * 1e-4, -5.93)
                c.wild()
            ms = (time.perf_counter() - t) * 1000
            out.append(ms)
        except Exception as exc:  # noqa: BLE001 (counted, the run goes on)
            ms = None
            errors.append(type(exc).__name__)
        if trace is not None:  # (wall clock at the end, ms or None for an error[, the
            # user's index and the server that answered last])
            trace.append((round(time.time(), 4), None if ms is None else round(ms, 2),
                          *((i, c.server) if who else ())))
        step += 1
        if behaviour == "mixed":
            time.sleep(PAUSE_S)


def serve(cloud: str, sources: list[str], duration: float, behaviour: str,
          trace: str = "", prefix: str = "") -> None:  # fmt: skip
    clients = [_client(cloud, i, src, prefix) for i, src in enumerate(sources)]
    print(json.dumps([c.user for c in clients]), flush=True)
    sys.stdin.readline()
    for c in clients:
        c.refresh()  # follow the redirection set meanwhile
    print(json.dumps({"running": time.time()}), flush=True)
    lat: list[float] = []
    errors: list[str] = []
    tr: list | None = [] if trace else None
    t0 = time.monotonic()
    threads = [threading.Thread(target=_run, args=(c, behaviour, t0 + duration, lat, errors, tr,
                                                   i, trace == "who", prefix))
               for i, c in enumerate(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.monotonic() - t0
    q = statistics.quantiles(lat, n=100) if len(lat) > 1 else lat * 99
    print(json.dumps({
        "users": len(clients), "behaviour": behaviour, "duration_s": wall,
        "requests": len(lat), "errors": len(errors), "throughput_rps": len(lat) / wall,
        "mean_ms": statistics.fmean(lat) if lat else None,
        "p50_ms": q[49] if lat else None, "p95_ms": q[94] if lat else None,
        "servers": sorted({c.server for c in clients if c.server}),
        **({"trace": sorted(tr)} if tr is not None else {}),
    }), flush=True)  # fmt: skip


class Load:
    """One load run from a users' namespace: `start()` logs the users in and returns their
    ids; `run()` releases the load and returns the results."""

    def __init__(self, netns: str, cloud: str, sources: list[str], duration: float,
                 behaviour: str, trace: bool | str = False, prefix: str = ""):  # fmt: skip
        """`trace`: every request's (end time, ms or None); "who": with the user's index
        (in `sources`) and the server that answered. `prefix`: of the users' identities
        (user<i> by default: two runs at once need two prefixes, else they share users)."""
        if behaviour not in BEHAVIOURS:
            raise ValueError(f"behaviour: one of {', '.join(BEHAVIOURS)}, not {behaviour!r}")
        mode = "who" if trace == "who" else "trace" if trace else ""
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, "-m", "bench.load", cloud,
             ",".join(sources), str(duration), behaviour, *([mode] if mode else []),
             *(["--prefix", prefix] if prefix else [])],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            cwd=Path(__file__).resolve().parents[1])  # fmt: skip
        self.started: float | None = None

    def start(self) -> list[str]:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(10)
            raise RuntimeError(f"load generator failed ({self.proc.returncode})")
        return json.loads(line)

    def go(self) -> float:
        """Release the load; returns (wall clock) when the users started playing."""
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(10)
            raise RuntimeError(f"load generator failed ({self.proc.returncode})")
        self.started = json.loads(line)["running"]
        return self.started

    def run(self) -> dict:
        """Release the load (unless `go` did) and return the results when it ends."""
        if self.started is None:
            self.go()
        out, _ = self.proc.communicate(timeout=600)
        return json.loads(out.strip().splitlines()[-1])


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("cloud")
    ap.add_argument("sources")
    ap.add_argument("duration", type=float)
    ap.add_argument("behaviour")
    ap.add_argument("trace", nargs="?", default="")
    ap.add_argument("--prefix", default="", help="of the users' identities")
    a = ap.parse_args()
    serve(a.cloud, a.sources.split(","), a.duration, a.behaviour, a.trace, a.prefix)
