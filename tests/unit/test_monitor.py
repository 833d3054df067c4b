"""The Monitor: request-log reading, statistics, cgroup parsing, latency probes.

Probes talk only to 127.0.0.0/8, to sockets this test opens itself.
"""

from __future__ import annotations

import os
import socket
import time

import pytest

from enorm import monitor as m
from enorm import preflight, probes, requestlog, resources
from enorm.autoscaler import NodeSnapshot, Snapshot, plan
from enorm.control_loop import server_snapshot
from enorm.protocol import Resources, ServerInfo
from enorm.requestlog import Request, parse_line
from enorm.resources import Amount

# ----------------------------------------------------------------------------- log parsing


def test_parse_line():
    assert parse_line("1700000000.5 /api/user 12.5") == Request(1700000000.5, "/api/user", 12.5)
    assert parse_line("1 /a path with spaces 3") == Request(1.0, "/a path with spaces", 3.0)
    for bad in ["", "1 /x", "x /y 3", "1 /y z", "1 /y -3", "nan /y 3"]:
        assert requestlog.parse_line(bad) is None, bad


def test_parse_lines_counts_malformed():
    reqs, bad = requestlog.parse_lines(["1 /a 2", "garbage", "", "2 /b 4"])
    assert [r.path for r in reqs] == ["/a", "/b"] and bad == 1


def test_log_reader_reads_only_new_lines(tmp_path):
    log = tmp_path / "requests.log"
    r = requestlog.LogReader()
    assert r.read_new(log) == []  # not there yet
    log.write_text("1 /a 10\n2 /b 20\n")
    assert [q.path for q in r.read_new(log)] == ["/a", "/b"]
    assert r.read_new(log) == []  # nothing new
    with log.open("a") as f:
        f.write("3 /c 30\n4 /d 4")  # the last line is still being written
    assert [q.path for q in r.read_new(log)] == ["/c"]
    with log.open("a") as f:
        f.write("0\n")
    assert [(q.path, q.duration_ms) for q in r.read_new(log)] == [("/d", 40.0)]


def test_log_reader_truncation_restarts(tmp_path):
    log = tmp_path / "requests.log"
    r = requestlog.LogReader()
    log.write_text("1 /a 10\n2 /b 20\n3 /c 30\n")
    assert len(r.read_new(log)) == 3
    log.write_text("")  # `> requests.log`
    assert r.read_new(log) == []
    log.write_text("4 /d 40\n")
    assert [q.path for q in r.read_new(log)] == ["/d"]


def test_log_reader_rotation_restarts(tmp_path):
    log = tmp_path / "requests.log"
    r = requestlog.LogReader()
    log.write_text("1 /a 10\n2 /b 20\n3 /c 30\n")
    assert len(r.read_new(log)) == 3
    os.rename(log, tmp_path / "requests.log.1")
    # a longer new file: only the inode tells that it is another file
    log.write_text("4 /d 40\n5 /e 50\n6 /f 60\n7 /g 70\n")
    assert [q.path for q in r.read_new(log)] == ["/d", "/e", "/f", "/g"]
    assert r.read_new(log) == []


def test_log_reader_counts_malformed(tmp_path):
    log = tmp_path / "requests.log"
    log.write_text("1 /a 10\nnot a line\n")
    r = requestlog.LogReader()
    assert len(r.read_new(log)) == 1 and r.malformed == 1


# ----------------------------------------------------------------------------- aggregation


def test_percentile_nearest_rank():
    v = list(range(1, 101))
    assert m.percentile(v, 95) == 95
    assert m.percentile(v, 100) == 100
    assert m.percentile([7.0], 95) == 7.0
    with pytest.raises(ValueError):
        m.percentile([], 95)


def test_network_stats_penalises_loss():
    s = m.network_stats([10.0, 20.0, None, 30.0], loss_penalty_ms=1000.0)
    assert s.count == 4 and s.lost == 1
    assert s.mean_ms == pytest.approx(265.0)
    assert s.p95_ms == 1000.0
    assert m.network_stats([], 1000.0) is None


def test_computing_stats_and_idle():
    reqs = [requestlog.Request(100.0, "/a", 10.0), requestlog.Request(160.0, "/b", 30.0)]
    c = m.computing_stats(reqs)
    assert (c.count, c.mean_ms, c.p95_ms, c.last_request_at) == (2, 20.0, 30.0, 160.0)
    assert m.computing_stats([]) == m.ComputingStats(0, None, None, None)
    assert m.idle_for(now=200.0, last_request_at=160.0, since=50.0) == 40.0
    assert m.idle_for(now=200.0, last_request_at=None, since=50.0) == 150.0  # never used
    assert m.idle_for(now=200.0, last_request_at=10.0, since=50.0) == 150.0  # before launch


def test_a_servers_packets_are_its_activity_whether_or_not_it_logs():
    """Idle time from the node's own packet count: more packets since the round before
    (or a count first seen above zero) is activity now; the log adds its request times."""
    mon = m.Monitor(method="none")

    def idle(now: float, packets: int | None) -> float:
        inp = m.ServerInput("s1", created_at=0.0, latency_objective_ms=50, packets=packets)
        return mon.measure([inp], now)["s1"].idle_for_s

    assert idle(10.0, 0) == 10.0  # nothing yet: idle since the launch
    assert idle(20.0, 40) == 0.0  # users sent 40 packets since
    assert idle(30.0, 40) == 10.0  # none since
    assert idle(40.0, 41) == 0.0  # one more: a kept-alive connection's request
    assert idle(50.0, 3) == 0.0  # fewer: the rule was made anew (a restart), and used
    assert idle(60.0, None) == 10.0  # not counted this round: the last activity stands
    mon.measure([], 70.0)
    assert "s1" not in mon.packets and "s1" not in mon.last_request


def test_packet_counters_are_read_per_server_from_one_listing(monkeypatch):
    from enorm import firewall

    listing = """Chain ENORM-T1-A (2 references)
    pkts      bytes target     prot opt in     out     source               destination
  12  3400 RETURN  6  --  *  *  0.0.0.0/0  10.89.1.2  tcp dpt:8080 /* enorm:t1:aaaa */
  3  180 RETURN  6  --  *  *  0.0.0.0/0  10.89.1.2  tcp dpt:9090 /* enorm:t1:aaaa */
  0  0 RETURN  6  --  *  *  0.0.0.0/0  10.89.1.3  tcp dpt:8080 /* enorm:t1:bbbb */
  7  500 RETURN  6  --  *  *  0.0.0.0/0  10.89.1.4  tcp dpt:8080 /* enorm:t11:cccc */
"""
    calls = []
    monkeypatch.setattr(firewall, "_iptables", lambda *a: calls.append(a) or listing)
    fw = firewall.Firewall("t1", "10.89.1.0/24", "entb1")
    assert fw.counters() == {"aaaa": 15, "bbbb": 0}
    assert calls == [("-t", "filter", "-L", "ENORM-T1-A", "-v", "-x", "-n")]


def test_application_latency_and_improvable():
    assert m.application_latency(20.0, 30.0) == 50.0
    assert m.application_latency(None, 30.0) == 30.0
    assert m.application_latency(None, None) is None
    assert m.improvable(50.0, 100.0)
    assert not m.improvable(120.0, 100.0)
    assert m.improvable(None, 100.0)


# ----------------------------------------------------------------------------- cgroups


def test_cgroup_samples_give_cores_over_the_interval_and_memory_now():
    a = m.CgroupSample(10.0, 5_000_000_000, 100 << 20)
    b = m.CgroupSample(12.0, 8_000_000_000, 150 << 20)  # +3 s of CPU in 2 s of wall time
    assert m.cores_used(a, b) == pytest.approx(1.5)
    assert m.usage(a, b) == Amount(1.5, 150.0)
    assert m.usage(None, b) == Amount(0.0, 150.0)
    assert m.cores_used(b, a) == 0.0  # time going backwards: no nonsense


def test_cgroup_usage_many():
    prev = {"s1": m.CgroupSample(0.0, 0, 1 << 20)}
    cur = {"s1": m.CgroupSample(4.0, 2_000_000_000, 3 << 20),
           "s2": m.CgroupSample(4.0, 2_000_000_000, 3 << 20)}
    assert m.cgroup_usage(cur, prev) == {"s1": Amount(0.5, 3.0), "s2": Amount(0.0, 3.0)}


def test_basic_service_and_free():
    b = m.basic_service(1.75, 900.0, [Amount(1.0, 300.0), Amount(0.25, 200.0)])
    assert b == Resources(cores=0.5, memory_mb=400)
    assert m.basic_service(0.1, 10.0, [Amount(1.0, 300.0)]) == Resources(cores=0, memory_mb=0)
    free = resources.free(
        Resources(cores=4, memory_mb=2048),
        Resources(cores=0.25, memory_mb=512),
        b,
        resources.total([Resources(cores=1, memory_mb=200), Resources(cores=2, memory_mb=400)]),
    )
    assert free == Amount(0.5, 936.0)  # 4 - max(0.5, 0.25) - 3 ; 2048 - max(400, 512) - 600


def test_host_sampler():
    h = m.HostSampler()
    cores0, mem = h.sample()
    time.sleep(0.05)
    cores1, _ = h.sample()
    assert cores0 == 0.0 and cores1 >= 0.0 and mem > 0


# ----------------------------------------------------------------------------- probes


@pytest.fixture
def loopback_targets():
    """An open port, a closed one (RST) and a blackholed one (full backlog), 127/8 only."""
    opened = socket.socket()
    opened.bind(("127.0.0.1", 0))
    opened.listen(16)
    port = opened.getsockname()[1]
    hole = socket.socket()
    hole.bind(("127.0.0.2", port))
    hole.listen(0)  # accept queue of one, never accepted
    fillers = []
    for _ in range(3):
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(("127.0.0.2", port))
        fillers.append(c)
    time.sleep(0.2)
    try:
        yield {"open": "127.0.0.1", "closed": "127.0.0.3", "hole": "127.0.0.2", "port": port}
    finally:
        for s in [opened, hole, *fillers]:
            s.close()


def test_tcp_probe_open_closed_blackholed(loopback_targets):
    t = loopback_targets
    timeout = 0.3
    t0 = time.perf_counter()
    r = probes.probe([t["open"], t["closed"], t["hole"], t["open"]], "tcp", t["port"], timeout)
    elapsed = time.perf_counter() - t0
    assert set(r) == {t["open"], t["closed"], t["hole"]}  # deduplicated
    assert r[t["open"]] is not None and 0 <= r[t["open"]] < 50  # SYN-ACK
    assert r[t["closed"]] is not None and 0 <= r[t["closed"]] < 50  # RST is an answer
    assert r[t["hole"]] is None  # no answer: loss
    assert timeout <= elapsed < timeout + 0.5
    s = m.network_stats(r.values(), loss_penalty_ms=1000.0)
    assert s.lost == 1 and s.p95_ms == 1000.0 and s.mean_ms > 1000.0 / 3


def test_probes_leave_from_the_configured_source(loopback_targets):
    """`probe_source`: the node's own address is the probes' source (the listener sees
    it); an address the host does not have is refused, by the node's preflight first."""
    t = loopback_targets
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    try:
        r = probes.probe(["127.0.0.1"], "tcp", server.getsockname()[1], 1.0, source="127.0.0.7")
        assert r["127.0.0.1"] is not None
        conn, (peer, _) = server.accept()
        conn.close()
        assert peer == "127.0.0.7"
    finally:
        server.close()
    with pytest.raises(OSError):
        probes.probe([t["open"]], "tcp", t["port"], 0.3, source="192.0.2.1")
    ok, bad = preflight.check_probe_source("127.0.0.7"), preflight.check_probe_source("192.0.2.1")
    assert ok.ok and not bad.ok and "192.0.2.1" in bad.detail and "probe_source" in bad.fix


def test_tcp_probe_bounded_concurrency_many_addresses():
    # 2,000 loopback addresses without a listener (RST), 64 in flight at most.
    addrs = [f"127.9.{i // 250}.{i % 250 + 1}" for i in range(2000)]
    t0 = time.perf_counter()
    r = probes.probe(addrs, "tcp", 9, 0.5, concurrency=64)
    assert time.perf_counter() - t0 < 5
    assert len(r) == 2000 and all(v is not None for v in r.values())


def test_probe_none_and_empty():
    assert probes.probe(["127.0.0.1"], "none") == {"127.0.0.1": None}
    assert probes.probe([], "tcp") == {}
    with pytest.raises(ValueError):
        probes.probe(["127.0.0.1"], "udp")  # type: ignore[arg-type]


def test_icmp_probe_loopback():
    probes._icmp_socket()[0].close()  # root (as in CI) may always open a raw ICMP socket
    r = probes.probe(["127.0.0.1", "127.0.0.5"], "icmp", timeout=0.5)
    assert all(v is not None and 0 <= v < 50 for v in r.values())


# ----------------------------------------------------------------------------- monitor


def _info(id: str, **kw) -> ServerInfo:
    base = dict(
        id=id,
        app="game",
        owner="cloud",
        priority=10,
        state="running",
        container=f"enorm-t-{id}",
        address="10.88.0.2",
        access_port=20000,
        ports={},
        limits=Resources(cores=1, memory_mb=200),
        users=2,
        latency_objective_ms=100.0,
        override=False,
        termination="single",
        created_at=1000.0,
    )
    base.update(kw)
    return ServerInfo(**base)


def test_monitor_snapshot_end_to_end(tmp_path, loopback_targets):
    t = loopback_targets
    log = tmp_path / "requests.log"
    log.write_text("1990 /a 150\n1995 /b 250\n")  # computing latency 200 ms > objective
    mon = m.Monitor(method="tcp", probe_port=t["port"], probe_timeout_s=0.3)
    infos = [_info("busy"), _info("far", latency_objective_ms=500.0), _info("quiet", users=0)]
    inputs = [
        m.ServerInput(i.id, i.created_at, i.latency_objective_ms, addrs, path)
        for i, addrs, path in zip(infos, [[t["open"], t["closed"]], [t["hole"]], []],
                                  [log, None, tmp_path / "none.log"], strict=True)
    ]

    def snapshot(inputs, free, now):
        """What the control loop's Observer makes of the Monitor's reports."""
        reports = mon.measure(inputs, now)
        by_id = {i.id: i for i in infos}
        return Snapshot(NodeSnapshot(free), tuple(
            server_snapshot(by_id[x.server_id], reports[x.server_id]) for x in inputs), now)

    snap = snapshot(inputs, free=Amount(1.0, 200.0), now=2000.0)
    by = {s.id: s for s in snap.servers}
    busy, far, quiet = by["busy"], by["far"], by["quiet"]
    assert busy.computing_ms == 200.0 and busy.network_ms < 50
    assert busy.latency_ms == pytest.approx(busy.network_ms + 200.0)
    assert busy.idle_for_s == 5.0 and busy.improvable
    assert far.network_ms == 1000.0 and not far.improvable  # lost => penalty > 500 ms
    assert quiet.latency_ms is None and quiet.idle_for_s == 1000.0
    assert mon.last_reports["far"].network.lost == 1

    kinds = {(type(x).__name__, x.server_id) for x in plan(snap)}
    assert kinds == {("ScaleUp", "busy"), ("Terminate", "far"), ("Terminate", "quiet")}

    # the next round sees no new requests; idle time keeps counting from the last one
    snap2 = snapshot(inputs[:1], free=Amount(0, 0), now=2100.0)
    assert snap2.servers[0].computing_ms is None
    assert snap2.servers[0].idle_for_s == 105.0


def test_monitor_from_config():
    class Cfg:
        probe = "none"
        probe_port = 7
        probe_timeout_s = 0.2
        loss_penalty_ms = 800.0
        probe_source = "10.0.0.1"

    mon = m.Monitor.from_config(Cfg(), statistic="p95")
    assert (mon.method, mon.loss_penalty_ms, mon.statistic) == ("none", 800.0, "p95")
    assert mon.source == "10.0.0.1"


def test_log_beneath_the_tenants_layer_follows_no_link_and_reads_only_files(tmp_path):
    """The request log lies in the tenant's writable layer: every component below it is
    the tenant's, so links, FIFOs and devices are refused instead of read."""
    layer = tmp_path / "delta"
    logdir = layer / "var/log/enorm-app"
    logdir.mkdir(parents=True)
    log = logdir / "requests.log"
    secret = tmp_path / "host-secret"
    secret.write_text("1700000000.0 /stolen 5\n")
    r = requestlog.LogReader()
    log.symlink_to(secret)  # a link to a host file
    assert r.read_new(log, layer) == [] and r.refused == 1
    log.unlink()
    log.symlink_to("/dev/zero")  # would never end
    assert r.read_new(log, layer) == [] and r.refused == 2
    log.unlink()
    os.mkfifo(log)  # would block the round
    assert r.read_new(log, layer) == [] and r.refused == 3
    log.unlink()
    # A link higher up the path is refused too.
    (layer / "var/log").rename(tmp_path / "elsewhere")
    (layer / "var/log").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "elsewhere/enorm-app/requests.log").write_text("1700000000.0 /a 5\n")
    assert r.read_new(log, layer) == [] and r.refused == 4
    (layer / "var/log").unlink()
    (tmp_path / "elsewhere").rename(layer / "var/log")
    # The plain file is read, at most max_read bytes a call.
    r = requestlog.LogReader(max_read=64)
    log.write_text("".join(f"1700000000.0 /{i} 5\n" for i in range(10)))
    first = r.read_new(log, layer)
    assert 0 < len(first) < 10
    rest = []
    for _ in range(10):
        rest += r.read_new(log, layer)
    assert [q.path for q in first + rest] == [f"/{i}" for i in range(10)]
