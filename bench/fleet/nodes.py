"""Simulated edge nodes: many per process, on one loopback port, one path prefix each
(`http://127.0.0.1:<port>/n/<name>`), speaking the node's protocol with its own models
(`enorm.protocol`: offer, probe, setup request and answer, rejection, termination, the
list of servers), no container behind them.

Timings and failures: every answer after 5-100 ms (uniform), 1% of them slow (1-3 s);
a node that is down resets every connection (its host port closed) until it comes back.
`/ctl/down` and `/ctl/up` take nodes down and up on the bench's order, `churn` takes a
random share down and back now and then, `/ctl/stats` counts what was asked.

    python -m bench.fleet.nodes --port P --first 0 --count 2500 [--churn 0.01]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field

from aiohttp import web
from pydantic import ValidationError

from enorm.protocol import (
    Access,
    NodeOffer,
    ProbeRequest,
    ProbeResult,
    Rejection,
    Resources,
    ServerInfo,
    SetupResponse,
    TerminateResult,
    parse_setup,
)

UNIT = Resources(cores=1, memory_mb=200)
CAPACITY = Resources(cores=4, memory_mb=4096)
SLOW_SHARE = 0.01


@dataclass
class SimNode:
    """One simulated node: its resources and servers, as a board of 4 cores would have."""

    name: str
    servers: dict[str, ServerInfo] = field(default_factory=dict)
    down: bool = False

    def free_units(self) -> int:
        return int(CAPACITY.cores // UNIT.cores) - len(self.servers)

    def offer(self) -> NodeOffer:
        used = len(self.servers)
        alloc = Resources(cores=used * UNIT.cores, memory_mb=used * UNIT.memory_mb)
        free = Resources(cores=max(0.0, CAPACITY.cores - alloc.cores),
                         memory_mb=max(0, CAPACITY.memory_mb - alloc.memory_mb))
        zero = Resources(cores=0, memory_mb=0)
        return NodeOffer(name=self.name, capacity=CAPACITY, reserved=zero,
                         basic_service=zero, allocated=alloc, free=free,
                         unit=UNIT, servers=used, admission="paper", ports_free=1000,
                         autoscale_interval_s=300, load=random.uniform(0, 1.5))


def names(first: int, count: int) -> list[str]:
    """The simulated nodes' names, the same in every process of the bench."""
    return [f"f{i:07d}" for i in range(first, first + count)]


class Fleet:
    def __init__(self, names: list[str], seed: int = 0) -> None:
        self.nodes = {n: SimNode(n) for n in names}
        self.asked: Counter[str] = Counter()
        self.rng = random.Random(seed)
        # the bench's app's redirects, as its users would see them: (group, by, when)
        self.redirects: list[tuple[str, str, float]] = []

    async def delay(self) -> None:
        slow = self.rng.random() < SLOW_SHARE
        await asyncio.sleep(self.rng.uniform(1.0, 3.0) if slow else self.rng.uniform(0.005, 0.1))

    def node(self, request: web.Request) -> SimNode:
        n = self.nodes.get(request.match_info["node"])
        if n is None:
            raise web.HTTPNotFound(text='{"error":"not_found","detail":"no such node"}',
                                   content_type="application/json")
        if n.down:  # as a node whose port is closed: the connection is reset
            self.asked["refused"] += 1
            request.transport.close()
            raise web.HTTPServiceUnavailable()
        return n

    async def get_offer(self, request: web.Request) -> web.Response:
        n = self.node(request)
        self.asked["offer"] += 1
        await self.delay()
        self.node(request)  # a node that went down meanwhile does not answer either
        return web.json_response(n.offer().model_dump(mode="json"))

    async def probe(self, request: web.Request) -> web.Response:
        self.node(request)
        self.asked["probe"] += 1
        try:
            req = ProbeRequest.model_validate_json(await request.read())
        except ValidationError as exc:
            return web.json_response({"error": "invalid", "detail": str(exc)}, status=400)
        await self.delay()
        rtt = {str(a): round(self.rng.uniform(2, 80), 3) for a in req.addresses}
        vals = sorted(rtt.values())
        return web.json_response(ProbeResult(method="tcp", rtt_ms=rtt,
                                             median_ms=vals[len(vals) // 2]).model_dump())

    async def setup(self, request: web.Request) -> web.Response:
        n = self.node(request)
        self.asked["setup"] += 1
        try:
            req = parse_setup(await request.read())
        except ValidationError as exc:
            return web.json_response({"error": "invalid", "detail": str(exc)}, status=400)
        await self.delay()
        if n.free_units() < 1:
            return web.json_response(Rejection(
                error="insufficient_resources", detail="no free unit",
                free=n.offer().free).model_dump(mode="json"), status=409)
        sid = secrets.token_hex(4)
        port = 20001 + len(n.servers)
        ports = {p: port + 1 for p in req.ports}
        n.servers[sid] = ServerInfo(
            id=sid, app=req.app, owner="fleet", priority=req.priority, state="running",
            container=f"sim-{sid}", address="10.0.3.2", access_port=port, ports=ports,
            limits=UNIT, users=len(req.users), latency_objective_ms=req.latency_objective_ms,
            override=req.override, termination="single", created_at=time.time())
        return web.json_response(SetupResponse(
            server_id=sid, container=f"sim-{sid}", address="10.0.3.2",
            access=Access(host="127.0.0.1", port=port), ports=ports,
            limits=UNIT, redis_password="x").model_dump(mode="json"), status=201)

    async def list_servers(self, request: web.Request) -> web.Response:
        n = self.node(request)
        self.asked["servers"] += 1
        await self.delay()
        self.node(request)
        return web.json_response([s.model_dump(mode="json") for s in n.servers.values()])

    async def terminate(self, request: web.Request) -> web.Response:
        n = self.node(request)
        self.asked["terminate"] += 1
        await self.delay()
        sid = request.match_info["sid"]
        if n.servers.pop(sid, None) is None:
            return web.json_response({"error": "not_found", "detail": sid}, status=404)
        return web.json_response(TerminateResult(terminated=[sid]).model_dump(mode="json"))

    async def ctl(self, request: web.Request) -> web.Response:
        names = (await request.json())["nodes"]
        down = request.match_info["what"] == "down"
        for name in names:
            self.nodes[name].down = down
        return web.json_response({"at": time.time(), "nodes": names})

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response({"asked": dict(self.asked), "at": time.time(),
                                  "servers": sum(len(n.servers) for n in self.nodes.values()),
                                  "down": [n.name for n in self.nodes.values() if n.down]})

    async def churn(self, share_per_min: float, down_s: tuple[float, float]) -> None:
        """Nodes going down and coming back: `share_per_min` of them per minute."""
        names = list(self.nodes)
        while True:
            await asyncio.sleep(1.0)
            for name in self.rng.sample(names, k=min(len(names), int(
                    share_per_min * len(names) / 60 + self.rng.random()))):
                self.nodes[name].down = True
                asyncio.get_running_loop().call_later(
                    self.rng.uniform(*down_s), setattr, self.nodes[name], "down", False)

    async def servers(self, request: web.Request) -> web.Response:
        return web.json_response([sid for n in self.nodes.values() for sid in n.servers])

    async def redirect(self, request: web.Request) -> web.Response:
        """A group's users sent to their edge server (by a cloud-manager process): kept
        outside the cluster, so that a process cut off from it could still redirect."""
        body = await request.json()
        self.redirects.append((body["group"], body["by"], time.time()))
        return web.json_response({})

    async def redirected(self, request: web.Request) -> web.Response:
        return web.json_response(self.redirects)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=16 << 20)
        app.add_routes([
            web.get("/n/{node}/v1/node", self.get_offer),
            web.post("/n/{node}/v1/probe", self.probe),
            web.post("/n/{node}/v1/servers", self.setup),
            web.get("/n/{node}/v1/servers", self.list_servers),
            web.delete("/n/{node}/v1/servers/{sid}", self.terminate),
            web.post("/ctl/{what:down|up}", self.ctl),
            web.get("/ctl/stats", self.stats),
            web.get("/ctl/servers", self.servers),
            web.post("/ctl/redirect", self.redirect),
            web.get("/ctl/redirect", self.redirected),
        ])
        return app


async def serve(port: int, names: list[str], churn: float, seed: int,
                host: str = "127.0.0.1") -> None:
    fleet = Fleet(names, seed)
    runner = web.AppRunner(fleet.app(), access_log=None)
    await runner.setup()
    for h in sorted({"127.0.0.1", host}):  # (`host`: for a process in a namespace)
        await web.TCPSite(runner, h, port, backlog=1024).start()
    print(f"ready {port} {len(names)}", flush=True)
    if churn > 0:
        await fleet.churn(churn, (5.0, 30.0))
    await asyncio.Event().wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--churn", type=float, default=0.0, help="share of nodes down per minute")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--host", default="127.0.0.1", help="an address to listen on as well")
    a = ap.parse_args()
    asyncio.run(serve(a.port, names(a.first, a.count), a.churn, a.seed, a.host))


if __name__ == "__main__":
    main()
