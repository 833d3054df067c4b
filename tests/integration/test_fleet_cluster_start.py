"""The fleet's Redis cluster starts when a port it picked is taken before its server
binds it (another process's connection got there first): that server is started again
on another port, not waited for until a timeout."""

from __future__ import annotations

import socket

import redis

from bench.fleet import cluster as fleet_cluster


def test_a_port_taken_after_the_check_is_replaced(monkeypatch):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    real = fleet_cluster._ports
    calls = []

    def ports(n, avoid=frozenset()):  # the first pick: a port bound since the check
        calls.append(n)
        got = real(n, avoid)
        return [port, *got[1:]] if len(calls) == 1 else got

    monkeypatch.setattr(fleet_cluster, "_ports", ports)
    c = fleet_cluster.Cluster(masters=3, replicas=0)
    try:
        c.start()
        assert port not in c.procs and len(c.alive()) == 3
        assert calls == [3, 1]  # one more port asked for, once
        assert redis.Redis(port=c.alive()[0]).cluster("info").get("cluster_state") == "ok"
    finally:
        c.stop()
        taken.close()
