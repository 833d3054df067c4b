"""Schemathesis against a live node's /v1/openapi.json: generated requests (valid and
invalid by the schema) to every operation, each checked for a clean answer.

Used by the suite (a short run) and by `make reliability` (ENORM_FUZZ_CASES=1000 or more).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode


@dataclass
class FuzzReport:
    cases: int = 0
    by_operation: Counter = field(default_factory=Counter)
    statuses: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)


def check(resp: requests.Response, label: str, report: FuzzReport) -> None:
    """No 5xx; every 4xx a JSON body with the error, the reason and (but for admission
    refusals) the field it is about."""
    report.statuses[resp.status_code] += 1
    if resp.status_code >= 500:
        report.failures.append(f"{label}: {resp.status_code} {resp.text[:200]}")
    elif resp.status_code >= 400 and resp.status_code != 431:  # 431: waitress, pre-app
        try:
            body = resp.json()
        except ValueError:
            report.failures.append(f"{label}: {resp.status_code} not JSON: {resp.text[:100]}")
            return
        named = body.get("field") or resp.status_code == 409
        if not (body.get("error") and body.get("detail") and named):
            report.failures.append(f"{label}: {resp.status_code} unclear: {body}")


def fuzz(base_url: str, token: str, total_cases: int) -> FuzzReport:
    """At least `total_cases` generated requests, spread over every operation and both
    generation modes; a wrong and a missing token are among the generated headers."""
    schema = schemathesis.openapi.from_url(base_url + "/v1/openapi.json")
    ops = [r.ok() for r in schema.get_all_operations()]
    per = math.ceil(total_cases / (len(ops) * 2))
    report = FuzzReport()
    session = requests.Session()
    auths = [{"Authorization": f"Bearer {token}"}] * 3 + [
        {"Authorization": "Bearer wrong"}, {}]
    # Operations without parameters give hypothesis little to vary: passes repeat until
    # the total is reached.
    while report.cases < total_cases:
        _one_pass(base_url, ops, per, session, auths, report)
    return report


def _one_pass(base_url: str, ops: list, per: int, session: requests.Session,
              auths: list[dict], report: FuzzReport) -> None:
    for op in ops:
        for mode in GenerationMode:
            _run_operation(base_url, op, mode, per, session, auths, report)


def _run_operation(base_url: str, op, mode: GenerationMode, per: int,
                   session: requests.Session, auths: list[dict], report: FuzzReport) -> None:
    label = f"{op.method.upper()} {op.path}"

    @settings(max_examples=per, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(generation_mode=mode))
    def run(case) -> None:
        auth = auths[report.cases % len(auths)]
        headers = {k: v for k, v in (case.headers or {}).items()
                   if k.lower() != "authorization"}
        case.headers = {**headers, **auth}
        resp = case.call(base_url=base_url, session=session, timeout=30)
        report.cases += 1
        report.by_operation[label] += 1
        check(resp, f"{mode.value} {label}", report)

    try:
        run()
    except Unsatisfiable:
        pass  # negative mode of an operation with nothing to make invalid
