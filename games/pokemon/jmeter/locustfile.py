"""The same two plans for Locust, for runs larger than JMeter can offer on this machine.

The steps, requests and think times come from plans.py, so the load is the JMeter plan's:
each Locust user stands for one JMeter thread, plays the next player of the CSV at each
iteration and thinks `pause_ms + uniform(0, pause_jitter_ms)` before each request (mixed
only). Every request is written to a CSV .jtl with JMeter's columns, one file per
process, so that bench.jmeter.parse_jtl reads Locust's runs as it reads JMeter's.

Settings come from the environment (bench.jmeter.run_locust sets them): ENORM_PLAN,
ENORM_PLAYERS, ENORM_JTL (a prefix: `<prefix>.<pid>.jtl`), ENORM_PAUSE_MS,
ENORM_PAUSE_JITTER_MS.
"""

from __future__ import annotations

import csv
import itertools
import os
import random
import time

import gevent
from locust import FastHttpUser, constant, events, task

from games.pokemon.jmeter.plans import PLANS, REQUESTS

PLAN = os.environ.get("ENORM_PLAN", "aggressive")
PAUSE_MS = float(os.environ.get("ENORM_PAUSE_MS", "0"))
JITTER_MS = float(os.environ.get("ENORM_PAUSE_JITTER_MS", "0"))
JTL_COLUMNS = ["timeStamp", "elapsed", "label", "responseCode", "responseMessage",
               "threadName", "dataType", "success", "bytes"]  # fmt: skip


def _roster() -> itertools.cycle:
    path = os.environ.get("ENORM_PLAYERS")
    rows = []
    if path:  # absent when locust only imports the file to list its users
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f) if r]
        random.shuffle(rows)  # each process starts its turn at its own place
    return itertools.cycle(rows)


ROSTER = _roster()
_jtl: dict[str, object] = {}


def _writer():
    """This process's .jtl (opened after the fork, so each process has its own)."""
    if _jtl.get("pid") != os.getpid():
        f = open(f"{os.environ['ENORM_JTL']}.{os.getpid()}.jtl", "w", newline="")  # noqa: SIM115
        w = csv.writer(f)
        w.writerow(JTL_COLUMNS)
        _jtl.update(pid=os.getpid(), file=f, writer=w)
    return _jtl["writer"]


@events.request.add_listener
def _record(request_type, name, response_time, response_length, response=None,
            exception=None, start_time=None, **_kw):  # fmt: skip
    if "ENORM_JTL" not in os.environ:
        return
    code = getattr(response, "status_code", 0) or type(exception).__name__
    start = start_time if start_time is not None else time.time() - response_time / 1000
    _writer().writerow([int(start * 1000), round(response_time), name, code,
                        "" if exception is None else str(exception)[:200], f"locust-{os.getpid()}",
                        "text", "true" if exception is None else "false",
                        response_length or 0])  # fmt: skip


@events.quitting.add_listener
def _close(**_kw):
    f = _jtl.get("file")
    if f is not None:
        f.close()


class PlayerTurns(FastHttpUser):
    """One JMeter thread's worth of players, one player per iteration."""

    wait_time = constant(0)

    @task
    def iteration(self) -> None:
        uid, token, lat, lng = next(ROSTER)[:4]  # run() refuses source addresses here
        headers = {"X-User": uid, "X-Token": token, "Content-Type": "application/json"}
        for step in PLANS[PLAN]:
            if PLAN == "mixed":
                gevent.sleep((PAUSE_MS + random.uniform(0, JITTER_MS)) / 1000)
            method, path, body = REQUESTS[step]
            data = body.replace("${lat}", lat).replace("${lng}", lng) if body else None
            self.client.request(method, path, headers=headers, data=data, name=f"{step} {path}")
