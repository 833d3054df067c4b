"""The node's live dashboard: a static page that polls one read-only JSON view.

The page (index.html, its script and the vendored uPlot) carries no data and needs no
build step on a board; everything it shows comes from `GET /v1/dashboard` under the same
bearer tokens as the rest of the API, so a cloud manager sees only its own servers.
"""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flask import Blueprint, abort, send_from_directory

from enorm.metrics import units
from enorm.openapi import Answer, PathParameter, declare
from enorm.protocol import ErrorBody

if TYPE_CHECKING:
    from flask import Response

    from enorm.metrics import NodeMetrics
    from enorm.node import Node

STATIC = Path(__file__).parent
HISTORY_POINTS = 720  # one hour at the page's 5 s sampling
SAMPLE_EVERY_S = 2.0

page = Blueprint("dashboard", __name__)


@page.get("/dashboard")
@declare("The dashboard's page (open it as /dashboard#token=<token>)",
         {200: Answer("the page", media_types=("text/html",))}, security=None)
def index() -> Response:
    return send_from_directory(STATIC, "index.html", max_age=0)


@page.get("/dashboard/<path:name>")
@declare("The page's script and styles",
         {200: Answer("the file", media_types=("text/javascript", "text/css")),
          404: Answer("no such file", ErrorBody)},
         path={"name": PathParameter("a script or style sheet of the page", {
             "type": "string", "pattern": r"^[A-Za-z0-9._/-]+\.(js|css)$"})},
         security=None)
def asset(name: str) -> Response:
    """Only the page's scripts and style sheets: nothing else of the package."""
    if not name.endswith((".js", ".css")):
        abort(404)
    return send_from_directory(STATIC, name, max_age=3600)


class History:
    """The node's resources over time, sampled when someone looks (and each round)."""

    def __init__(self) -> None:
        self.points: deque[dict[str, Any]] = deque(maxlen=HISTORY_POINTS)

    def sample(self, node: Node, force: bool = False) -> None:
        now = time.time()
        if not force and self.points and now - self.points[-1]["t"] < SAMPLE_EVERY_S:
            return
        alloc = node.allocator
        allocated = node.allocated()
        free = alloc.free(allocated)
        self.points.append({
            "t": now,
            "cores": {"basic_service": alloc.basic.cores, "reserve": alloc.reserve.cores,
                      "allocated": allocated.cores, "free": free.cores},
            "memory_mb": {"basic_service": alloc.basic.memory_mb,
                          "reserve": alloc.reserve.memory_mb,
                          "allocated": allocated.memory_mb, "free": free.memory_mb},
        })


def view(node: Node, metrics: NodeMetrics, history: History,
         owner: str | None) -> dict[str, Any]:
    """Everything the page shows, for one caller (`owner` None: the operator)."""
    history.sample(node)
    offer = node.offer()
    measured = metrics.last_measured
    servers = []
    for s in node.servers(owner):
        m = measured.get(s.id, {})
        servers.append({
            "id": s.id, "app": s.app, "owner": s.owner, "priority": s.priority,
            "state": s.state, "units": units(s.limits, node.unit),
            "limits": s.limits.model_dump(), "users": s.users,
            "latency_ms": m.get("application"), "network_ms": m.get("network"),
            "computing_ms": m.get("computing"),
            "objective_ms": s.latency_objective_ms,
        })
    events = node.store.events(limit=50, owner=owner)
    return {
        "node": offer.model_dump(mode="json"),
        "history": list(history.points),
        "servers": servers,
        "decisions": [e.model_dump(mode="json") for e in events],
        "rounds": list(metrics.recent_rounds) if owner is None else [],
        "now": time.time(),
    }
