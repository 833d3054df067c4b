"""The orphans' reconcile's judgement (cloud_manager/orphans.py), from tables: the
servers found on the nodes, and the offloads whose owner died."""

from __future__ import annotations

import pytest

from cloud_manager.ledger import Entry, Intent, Intents, Lapsed
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
