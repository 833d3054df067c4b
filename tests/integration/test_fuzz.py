"""Schemathesis over every operation of a real daemon, with every check of its own and
ours (tests/fuzzing.py), once with a cloud manager's token and once with the operator's:
nothing found against the document, schema-valid setup requests admitted (201) among
those it generates, and afterwards the daemon alive, every answer it gave listed in its
route's entry, and every server it holds whole.

The suite runs each for ENORM_FUZZ_SECONDS (45 s); `make reliability` runs them longer
and asks for ENORM_FUZZ_MIN_REQUESTS in all."""

from __future__ import annotations

import os
from collections.abc import Iterator

import lxc
import pytest
import requests
from fuzzing import SETUP, WITHDRAW, fuzz
from nodes import EdgeNode, make_node
from prometheus_client.parser import text_string_to_metric_families
from test_edge_node import handshake

pytestmark = pytest.mark.system
SECONDS = int(os.environ.get("ENORM_FUZZ_SECONDS", "45"))
MIN_REQUESTS = int(os.environ.get("ENORM_FUZZ_MIN_REQUESTS", "1500"))


@pytest.fixture
def node(tmp_path) -> Iterator[EdgeNode]:
    # No probe leaves the node (generated users are anyone's addresses), and no callback
    # or data sink is allowed: a setup request naming one is refused (403), so that no
    # generated request makes the node connect anywhere.
    n = make_node(tmp_path / "fuzz", probe="none", destinations={})
    n.start()
    yield n
    n.down()


def test_schemathesis_finds_nothing_against_the_document(node: EdgeNode, tmp_path) -> None:
    op = {"Authorization": f"Bearer {node.settings['operator_token']}"}
    # Servers of another cloud manager: the operator's run works on them; to cloud-a's
    # run they do not exist. Two of cloud-a's own for its run (the node holds eight).
    theirs = [handshake(node, "cloud-b").json()["server_id"] for _ in range(3)]
    ours = [handshake(node, "cloud-a").json()["server_id"] for _ in range(2)]
    token_a = next(t for t, o in node.tokens.items() if o == "cloud-a")
    runs = {"cloud-a": fuzz(node.url, token_a, tmp_path / "cloud-a", SECONDS, server_ids=ours),
            "operator": fuzz(node.url, node.settings["operator_token"], tmp_path / "operator",
                             SECONDS, server_ids=theirs)}
    for who, report in runs.items():
        print(f"schemathesis as {who}: {report.summary()}")
        assert report.exit_code == 0, report.output[-6000:]
    spec = requests.get(node.url + "/v1/openapi.json", timeout=5).json()
    documented = {f"{m.upper()} {p}" for p, item in spec["paths"].items() for m in item}
    for report in runs.values():  # every operation but the document's own
        assert documented - set(report.by_operation) == {"GET /v1/openapi.json"}
        assert report.statuses[405] > 0 and report.statuses[401] > 0
    assert sum(r.requests for r in runs.values()) >= MIN_REQUESTS
    a = runs["cloud-a"]
    # Schema-valid setup requests are admitted while the node has room, refused (409)
    # once it is full, admitted again after a withdrawal.
    assert a.setups_valid > 20 and a.setups_admitted >= 3, a.summary()
    assert a.by_operation[SETUP] > a.setups_valid  # and invalid ones
    # Real servers reached: withdrawn (cloud-a's), resized (by the operator, cloud-b's).
    assert a.answers[WITHDRAW, 200] > 0 and a.answers["GET /v1/servers/{sid}", 200] > 0
    assert runs["operator"].answers["PUT /v1/servers/{sid}/limits", 200] > 0
    # Every answer the daemon gave is one its route's entry lists (counted as it left).
    text = requests.get(node.url + "/metrics", headers=op, timeout=10).text
    undocumented = [s for f in text_string_to_metric_families(text)
                    if f.name == "enorm_api_undocumented_answers" for s in f.samples]
    assert undocumented == []
    assert requests.get(node.url + "/healthz", timeout=5).ok
    servers = requests.get(node.url + "/v1/servers", headers=op, timeout=10).json()
    node.released()  # terminations' releases run after their answers
    containers = set(lxc.list_containers())
    for s in servers:  # whatever the runs left is whole: running, its container there
        assert s["state"] == "running" and s["container"] in containers, s
    mine = {s["container"] for s in servers}
    assert not [c for c in containers if c.startswith(f"enorm-{node.name}-") and c not in mine]
