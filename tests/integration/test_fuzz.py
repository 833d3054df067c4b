"""Schemathesis over every operation of a real daemon: zero 5xx, every 4xx says what and
why, and the daemon is alive with the same allocations afterwards.

The suite runs a short version; `make reliability` sets ENORM_FUZZ_CASES=1000 or more."""

from __future__ import annotations

import os
from collections.abc import Iterator

import lxc
import pytest
import requests
from fuzzing import fuzz
from nodes import EdgeNode, make_node

pytestmark = pytest.mark.system
CASES = int(os.environ.get("ENORM_FUZZ_CASES", "150"))


@pytest.fixture
def node(tmp_path) -> Iterator[EdgeNode]:
    n = make_node(tmp_path / "fuzz")
    n.start()
    yield n
    n.down()


def test_generated_requests_get_clean_answers(node: EdgeNode) -> None:
    op = node.settings["operator_token"]
    view = lambda: requests.get(node.url + "/v1/node", timeout=5,  # noqa: E731
                                headers={"Authorization": f"Bearer {op}"}).json()
    before = view()
    report = fuzz(node.url, next(iter(node.tokens)), CASES)
    print(f"fuzz: {report.cases} cases, statuses {dict(report.statuses)}, "
          f"per operation {dict(report.by_operation)}")
    assert not report.failures, report.failures[:10]
    assert report.cases >= CASES
    spec = requests.get(node.url + "/v1/openapi.json", timeout=5).json()
    methods = {"get", "put", "post", "delete", "patch"}
    operations = sum(1 for item in spec["paths"].values() for m in item if m in methods)
    assert operations >= 11
    assert len(report.by_operation) == operations  # every method of every path in the spec
    assert requests.get(node.url + "/healthz", timeout=5).ok
    after = view()
    for k in ("allocated", "servers", "ports_free"):
        assert after[k] == before[k], k
    assert not [c for c in lxc.list_containers() if c.startswith(f"enorm-{node.name}-")]
