"""The orphans' reconcile's judgement (cloud_manager/orphans.py), from a table."""

from __future__ import annotations

import pytest

from cloud_manager.orphans import Verdict, judge


@pytest.mark.parametrize(("recorded", "age_s", "expected"), [
    (True, 5.0, Verdict.FINISH),        # young: its record may have been cut half-way
    (True, 400.0, Verdict.KNOWN),       # visited since: nothing to do
    (False, 5.0, Verdict.IN_FLIGHT),    # between its handshake and its record
    (False, 59.9, Verdict.IN_FLIGHT),
    (False, 60.0, Verdict.ORPHAN),      # the grace is over: nobody will record it
    (False, 1e6, Verdict.ORPHAN),
    (False, -30.0, Verdict.IN_FLIGHT),  # a node's clock ahead of the cloud's
])
def test_judge(recorded, age_s, expected):
    assert judge(recorded, age_s, grace_s=60.0, window_s=180.0) is expected
