"""The orphans' reconcile's judgement (cloud_manager/orphans.py), from tables: the
servers found on the nodes, and the offloads whose owner died."""

from __future__ import annotations

import time

import pytest
import redis

from cloud_manager.ledger import CloudUnreachable, Entry, Intent, Intents, Lapsed
from cloud_manager.orphans import Verdict, carry_on, judge
from enorm.protocol import User


@pytest.mark.parametrize(("recorded", "age_s", "leased", "expected"), [
    (True, 5.0, False, Verdict.FINISH),      # young: its record may have been cut half-way
    (True, 5.0, True, Verdict.KNOWN),        # its owner is alive and finishes it
    (True, 400.0, False, Verdict.KNOWN),     # visited since: nothing to do
    (False, 5.0, False, Verdict.IN_FLIGHT),  # between its handshake and its record
    (False, 59.9, False, Verdict.IN_FLIGHT),
    (False, 60.0, False, Verdict.ORPHAN),    # the grace is over: nobody will record it
    (False, 1e6, False, Verdict.ORPHAN),
    (False, 1e6, True, Verdict.IN_FLIGHT),   # a long offload (a standby) whose owner lives
    (False, -30.0, False, Verdict.IN_FLIGHT),  # a node's clock ahead of the cloud's
])
def test_judge(recorded, age_s, leased, expected):
    assert judge(recorded, age_s, grace_s=60.0, window_s=180.0, leased=leased) is expected


def test_an_offload_whose_owner_died_is_completed_if_recorded_else_ended():
    assert carry_on(recorded=True) is Verdict.COMPLETED
    assert carry_on(recorded=False) is Verdict.ENDED


def test_an_intent_keeps_what_the_record_and_the_redirect_need():
    e = Entry(server_id="s1", node="n1", app="game", url="http://10.0.0.2:20001",
              users=[User(id="u1", address="198.18.0.1")], created_at=12.5)
    for intent in (Intent(e), Intent(e, handed_over_from="s0", intercepted=True)):
        back = Intent.from_json(intent.to_json())
        assert back == intent and back.entry.users[0].address == e.users[0].address


class FakeLedger:
    """What `Intents` asks of the ledger; `taken`: leases another process holds now."""

    def __init__(self):
        self.calls, self.taken = [], set()

    def intend(self, intent, owner, lease_s):
        self.calls.append(("intend", intent.entry.server_id))

    def renew(self, sids, owner, lease_s):
        self.calls.append(("renew", tuple(sids)))
        return [s for s in sids if s in self.taken]

    def release(self, sid):
        self.calls.append(("release", sid))


def entry(sid: str) -> Entry:
    return Entry(server_id=sid, node="n1", app="game", url="http://10.0.0.2:20001",
                 users=[User(id="u1", address="198.18.0.1")])


def test_an_offload_in_flight_is_renewed_until_it_ends_and_never_sent_once_taken_over():
    led = FakeLedger()
    intents = Intents(led, lease_s=3.0)
    intents.begin(Intent(entry("s1")))
    intents.begin(Intent(entry("s2")))
    intents.keep("s1")  # still its own: renewed right before the redirect
    intents.end("s1")
    intents.renew()
    assert led.calls == [("intend", "s1"), ("intend", "s2"), ("renew", ("s1",)),
                         ("release", "s1"), ("renew", ("s2",))]
    led.taken.add("s2")  # this process stalled a lease; another took s2 over
    intents.renew()
    assert "s2" not in intents.held and "s2" in intents.lost
    with pytest.raises(Lapsed, match="s2"):
        intents.keep("s2")  # its users are the taker's to send: not sent from here
    intents.end("s2")  # nor is its intent released from here
    assert ("release", "s2") not in led.calls
    intents.keep("s9")  # not in flight here (a taker's own completion): nothing asked
    intents.begin(Intent(entry("s3")))
    intents.drop("s3")  # its redirect failed here: left to lapse, for another process
    intents.renew()
    assert led.calls[-1] == ("renew", ()) and ("release", "s3") not in led.calls


class Outage(FakeLedger):
    """A ledger whose cloud Redis does not answer `down` more calls of a kind, or answers
    after `slow_s` (a partition healing)."""

    def __init__(self, down: dict[str, int] | None = None, slow_s: float = 0.0):
        super().__init__()
        self.down, self.slow_s = down or {}, slow_s
        self.at: list[float] = []  # when each renewal was asked

    def _maybe_fail(self, kind: str) -> None:
        if self.down.get(kind, 0) > 0:
            self.down[kind] -= 1
            raise redis.ConnectionError("Timeout connecting to server")

    def renew(self, sids, owner, lease_s):
        self.at.append(time.monotonic())
        time.sleep(self.slow_s)
        self._maybe_fail("renew")
        return super().renew(sids, owner, lease_s)

    def release(self, sid):
        self._maybe_fail("release")
        super().release(sid)


def test_a_renewal_that_failed_is_tried_again_within_the_lease_not_a_third_later():
    led = Outage(down={"renew": 2})
    intents = Intents(led, lease_s=3.0)  # renewed every 1 s
    intents.begin(Intent(entry("s1")))
    t0 = time.monotonic()
    intents.start()
    try:
        deadline = t0 + 4.0
        while len(led.at) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        intents.stop()
    # two failures (a failover), tried again RENEW_RETRY_S apart: the third renewal
    # (the first that is answered) comes well within the lease, not at 2 lease/3
    assert len(led.at) >= 3, led.at
    assert led.at[2] - led.at[0] < 0.9 and led.at[2] - t0 < 2.5, (t0, led.at)
    assert "s1" in intents.held


def test_a_renewal_answered_late_is_not_trusted_for_the_redirect():
    led = Outage(slow_s=0.2)
    intents = Intents(led, lease_s=0.3)  # less than 2/3 of it may be left: not trusted
    intents.begin(Intent(entry("s1")))
    with pytest.raises(Lapsed):
        intents.keep("s1")
    assert "s1" not in intents.held and "s1" in intents.lost  # left to lapse: the taker's
    led = Outage(down={"renew": 1})
    intents = Intents(led, lease_s=3.0)
    intents.begin(Intent(entry("s2")))
    with pytest.raises(CloudUnreachable, match="did not answer"):
        intents.keep("s2")  # cut off: not sent from here, left to lapse
    assert "s2" not in intents.held


def test_a_release_not_answered_is_renewed_until_it_is():
    led = Outage(down={"release": 1})
    intents = Intents(led, lease_s=3.0)
    intents.begin(Intent(entry("s1")))
    intents.end("s1")  # its users sent; the release not answered: still held, renewed
    assert "s1" in intents.held and "s1" in intents.over
    intents.renew()
    assert led.calls[-2:] == [("renew", ("s1",)), ("release", "s1")]
    assert "s1" not in intents.held and not intents.over
