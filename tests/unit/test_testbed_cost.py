"""The testbed's cost arithmetic (bench/testbed/cost.py): per part, per request, per
packet and as a share of the machine, from two samples."""

from __future__ import annotations

import pytest

from bench.testbed import cost


def sample(t: float, *, gen: float, delay: float, cloud: float, node: float, machine: float,
           edge: dict[str, tuple[float, float]], packets: int) -> cost.Sample:  # fmt: skip
    return cost.Sample(
        t=t, cpu_s={"generator": gen, "delayers": delay, "cloud": cloud, "node": node,
                    "machine": machine},
        user_s={"generator": gen / 2, "delayers": delay / 10, "cloud": cloud},
        containers=edge, packets=packets, loadavg=(1.0, 1.0, 1.0))  # fmt: skip


def test_between_splits_the_run_by_part_per_request_and_share(monkeypatch):
    monkeypatch.setattr(cost.os, "cpu_count", lambda: 2)
    a = sample(10.0, gen=1.0, delay=2.0, cloud=0.5, node=0.1, machine=100.0,
               edge={"lxc.payload.enorm-bed0-a": (3.0, 2.0)}, packets=1000)
    b = sample(20.0, gen=3.0, delay=3.0, cloud=0.5, node=0.2, machine=110.0,
               edge={"lxc.payload.enorm-bed0-a": (6.0, 4.0),  # 3 s in the run
                     "lxc.payload.enorm-bed0-b": (1.0, 0.5)},  # started within it: 1 s
               packets=6000)
    c = cost.between(a, b, requests=1000)
    assert c["wall_s"] == 10.0 and c["cores"] == 2 and c["packets"] == 5000
    assert c["cpu_s"] == pytest.approx({"generator": 2.0, "delayers": 1.0, "cloud": 0.0,
                                        "node": 0.1, "machine": 10.0, "edge": 4.0,
                                        "other": 2.9})  # fmt: skip
    assert c["user_s"]["generator"] == 1.0 and c["user_s"]["edge"] == 2.5
    assert c["ms_per_request"]["generator"] == 2.0 and c["ms_per_request"]["edge"] == 4.0
    assert c["delayer_us_per_packet"] == 200.0
    assert c["share"]["machine"] == 0.5
    assert c["testbed_share"] == 0.15  # (2 + 1) / (10 s x 2 cores)
    assert "testbed (generator + delayers) 15% of the machine" in cost.summary(c)


def test_a_run_without_requests_or_packets_has_no_per_request_figures():
    a = sample(0.0, gen=0, delay=0, cloud=0, node=0, machine=0, edge={}, packets=0)
    b = sample(1.0, gen=0, delay=0, cloud=0, node=0, machine=0.5, edge={}, packets=0)
    c = cost.between(a, b, requests=0)
    assert c["ms_per_request"]["generator"] is None and c["delayer_us_per_packet"] is None
    cost.summary(c)  # still prints
