"""One vocabulary of reasons (enorm.protocol), shared by the node and the cloud side: every
reason a node can send in an event is parsed and acted on by the cloud manager."""

from __future__ import annotations

import json
import time

import pytest
from flask import Flask
from test_cloud_manager import manager, setup_response, users

from cloud_manager.orchestrator import Deployment
from enorm.events import Events
from enorm.protocol import (
    EVENT_REASONS,
    Event,
    Resources,
    ScaleReason,
    TerminationReason,
)
from enorm.store import ServerRecord

REHOME = {"insufficient_resources", "evicted_for_higher_priority", "basic_service_pressure",
          "preempted", "node_shutdown"}


def record() -> ServerRecord:
    return ServerRecord(
        id="s1", app="game", owner="cloud-a", priority=5, state="running",
        container="enorm-x-s1", address="10.89.0.2", access_port=30001, ports={8080: 30002},
        limits=Resources(cores=1, memory_mb=200), users=2, latency_objective_ms=50,
        override=False, termination="single", created_at=0.0, redis_password="pw",
        ssh_public_key="")


def test_the_vocabularies_do_not_overlap():
    sets = [set(TerminationReason), set(ScaleReason), {"handshake", "changed_outside_enorm"}]
    assert sum(len(s) for s in sets) == len(set().union(*sets))
    assert set(EVENT_REASONS) == set(Event.model_fields["type"].annotation.__args__)


def test_which_reasons_send_users_to_another_node():
    assert {r for r in TerminationReason if r.rehome} == REHOME


def test_a_node_cannot_make_an_event_with_a_reason_outside_the_vocabulary():
    events = Events(store=None)  # type: ignore[arg-type]  (make() touches no store)
    with pytest.raises(ValueError, match="reason"):
        events.make("server.terminated", record(), "bored")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a reason of server.terminated"):
        events.make("server.terminated", record(), ScaleReason.OPERATOR)  # type: ignore[arg-type]


@pytest.mark.parametrize("type_, reason", sorted(
    (t, r) for t, reasons in EVENT_REASONS.items() for r in reasons))
def test_every_reason_a_node_can_send_is_known_to_the_cloud(type_, reason):
    """The node's event as its outbox posts it (`Events.make`, JSON), into the cloud
    manager's callback endpoint: parsed, acknowledged, and acted on by its reason."""
    ev = Events(store=None).make(type_, record(), reason, {"keys_migrated": 3})  # type: ignore[arg-type]
    body = json.dumps(ev.model_dump())  # what requests' json= sends
    m = manager()
    m.rehome = True
    dep = Deployment(edge=None, setup=setup_response(), users=users("1", "2"), url="http://e")
    m.deployments["s1"] = dep
    app = Flask("t")
    app.register_blueprint(m.blueprint())
    r = app.test_client().post("/edge-events", data=body, content_type="application/json")
    assert r.status_code == 200, r.json
    done = r.json["done"]
    if type_ == "server.terminated":
        assert dep.end_reason == reason and dep.ended.is_set()
        if reason in REHOME:  # offloaded again: here no node admits, so they stay home
            assert done == "users restored, offloading them to another node"
            deadline = time.monotonic() + 5
            while "s1" not in m.rehomed and time.monotonic() < deadline:
                time.sleep(0.01)
            assert isinstance(m.rehomed["s1"], Exception)
        else:
            assert done == "users restored"
    elif type_ == "server.migration_failed":
        assert done == "users restored, merge pending" and dep.end_reason == reason
    else:
        assert done == "noted" and not dep.ended.is_set()
    m.close()

