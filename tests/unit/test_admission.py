"""Admission (Procedure 2's checks) and the Resource Allocator, as pure functions."""

from __future__ import annotations

import pytest

from enorm.protocol import Resources
from enorm.resources import Allocator, Amount, Tenant, admit, total

UNIT = Resources(cores=1.0, memory_mb=200)


def R(c: float, m: int) -> Resources:
    return Resources(cores=c, memory_mb=m)


def decide(free, priority=5, min_priority=0, ports_needed=2, ports_free=10, tenants=(),
           policy="paper"):
    return admit(unit=UNIT, free=free, priority=priority, min_priority=min_priority,
                 ports_needed=ports_needed, ports_free=ports_free, tenants=list(tenants),
                 policy=policy)


@pytest.mark.parametrize(
    ("free", "kw", "admitted", "reason"),
    [
        (R(1.0, 200), {}, True, None),
        (R(0.99, 200), {}, False, "insufficient_resources"),
        (R(4.0, 199), {}, False, "insufficient_resources"),
        (R(4.0, 800), {"priority": 2, "min_priority": 3}, False, "priority"),
        (R(4.0, 800), {"ports_needed": 3, "ports_free": 2}, False, "ports_unavailable"),
        # The paper's order: resources are checked before priority and ports.
        (R(0.5, 100), {"priority": 0, "min_priority": 3, "ports_free": 0}, False,
         "insufficient_resources"),
        (R(4.0, 800), {"priority": 0, "min_priority": 3, "ports_free": 0}, False, "priority"),
    ],
)
def test_paper_policy(free, kw, admitted, reason):
    d = decide(free, **kw)
    assert d.admit is admitted
    assert d.reason == reason
    assert d.evict == ()


def test_preempt_evicts_lowest_priority_newest_first_until_the_unit_fits():
    tenants = [
        Tenant("old-low", 1, R(0.5, 100), created_at=1),
        Tenant("new-low", 1, R(0.5, 100), created_at=2),
        Tenant("mid", 3, R(1.0, 200), created_at=0),
        Tenant("high", 9, R(1.0, 200), created_at=0),
    ]
    d = decide(R(0.0, 0), priority=5, tenants=tenants, policy="preempt")
    assert d.admit and d.evict == ("new-low", "old-low")


def test_preempt_refuses_for_priority_when_lower_tenants_are_not_enough():
    tenants = [Tenant("low", 1, R(0.5, 100)), Tenant("high", 9, R(4.0, 800))]
    d = decide(R(0.0, 0), priority=5, tenants=tenants, policy="preempt")
    assert not d.admit and d.reason == "priority" and d.evict == ()


def test_preempt_never_evicts_equal_priority():
    d = decide(R(0.0, 0), priority=5, tenants=[Tenant("same", 5, R(2.0, 400))],
               policy="preempt")
    assert not d.admit and d.reason == "insufficient_resources"


def test_preempt_evicts_nobody_when_there_is_room():
    d = decide(R(2.0, 400), tenants=[Tenant("low", 1, UNIT)], policy="preempt")
    assert d.admit and d.evict == ()


def test_allocator_holds_back_the_larger_of_reserve_and_basic_service():
    a = Allocator(capacity=R(4.0, 2048), reserve=R(0.5, 256))
    assert a.free(R(1.0, 200)) == Amount(2.5, 1592)
    a.basic = R(1.5, 100)  # the board's own processes got busier on CPU
    assert a.free(R(1.0, 200)) == Amount(1.5, 1592)
    a.basic = R(8.0, 4096)  # over-committed: the shortfall shows, the wire form stops at 0
    assert a.free(R(1.0, 200)) == Amount(-5.0, -2248)
    assert a.free(R(1.0, 200)).resources() == R(0.0, 0)


def test_total_sums_fractional_cores_exactly():
    assert total([R(0.1, 1)] * 10) == Amount(1.0, 10)
