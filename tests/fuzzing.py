"""Schemathesis against a live node, as a third-party client runs it: the `schemathesis`
command on the node's /v1/openapi.json with every check of its own on (status codes,
content types, headers and bodies as documented, schema-valid data accepted and invalid
data refused, 405 with Allow, auth not ignored, resources there after their 201 and gone
after their DELETE, ...) and ours beside them. All phases: the schema's examples, the
coverage phase (boundaries, every undeclared method, missing headers), fuzzing and the
stateful phase, which follows the document's links from a 201 to the server it made.

This module is also the run's hooks module (`hooks = "fuzzing"` in its config):
- `enorm_error_bodies`, our check: no 5xx, and every 4xx a JSON body with the error,
  the reason and (but for a setup refusal) the field it is about;
- `before_call` makes the setup request's cross-field rules hold in schema-valid
  requests, rules that JSON Schema cannot say and the document states in words: user
  ids unique, each interception once, each `intercept.to_port` one of `ports`; and puts
  a real server's id in half of the schema-valid requests' paths (but in the stateful
  phase, which follows links): one the run made itself or was given (a withdrawal takes
  one, the run's own first, and leaves the last given one for the others; the room it
  frees admits the next setup request);
- `after_call` records every request (operation, generation mode, status) for the test,
  and the servers the run made.

Used by the suite (a few minutes) and by `make reliability` (ENORM_FUZZ_SECONDS).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import schemathesis

STATS_ENV = "ENORM_FUZZ_STATS"
SERVERS_ENV = "ENORM_FUZZ_SERVERS"
SETUP = "POST /v1/servers"
WITHDRAW = "DELETE /v1/servers/{sid}"
_given = [s for s in os.environ.get(SERVERS_ENV, "").split(",") if s]
_made: list[str] = []  # servers this run's setup requests made and have not withdrawn
# Our own generator: Hypothesis resets the `random` module's state for every example, so
# its draws would be the same for every case of an operation.
_rng = random.Random()


@schemathesis.check
def enorm_error_bodies(ctx, response, case) -> bool | None:
    """No 5xx; every 4xx a JSON body naming the error, the reason and the field."""
    status = response.status_code
    if status >= 500:
        raise AssertionError(f"{status}: {response.text[:200]}")
    if status < 400 or status == 431:  # 431: waitress's own answer, before the app
        return None
    try:
        body = json.loads(response.content)
    except ValueError:
        raise AssertionError(f"{status} is not JSON: {response.text[:100]}") from None
    named = isinstance(body, dict) and (body.get("field") or status == 409)
    if not (named and body.get("error") and body.get("detail")):
        raise AssertionError(f"{status} does not say what and why: {body}")
    return None


def _label(case) -> str:
    return f"{case.method.upper()} {case.operation.path}"


@schemathesis.hook
def before_call(context, case, kwargs) -> None:
    """The cross-field rules of a setup request (in the document's descriptions), made to
    hold in requests generated as schema-valid; invalid ones are left as they are."""
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return
    # Not in the stateful phase: its links give real ids, and a scenario's own server
    # must not go from under it.
    if ("sid" in (case.path_parameters or {}) and meta.phase.name != "stateful"
            and _rng.random() < 0.5):
        if _label(case) == WITHDRAW:
            pool = _made or (_given if len(_given) > 1 else [])
            if pool:
                case.path_parameters["sid"] = pool.pop(_rng.randrange(len(pool)))
        elif _given or _made:
            case.path_parameters["sid"] = _rng.choice(_given + _made)
    if _label(case) != SETUP or not isinstance(case.body, dict):
        return
    body = case.body
    if isinstance(body.get("users"), list):
        seen: set = set()
        body["users"] = [u for u in body["users"] if not (u["id"] in seen or seen.add(u["id"]))]
    if isinstance(body.get("intercept"), list):
        ports = body.get("ports") or []
        if not ports:
            body["intercept"] = []
        pairs: set = set()
        kept = []
        for i, x in enumerate(body["intercept"]):
            if (x["address"], x["port"]) not in pairs:
                pairs.add((x["address"], x["port"]))
                kept.append({**x, "to_port": ports[i % len(ports)]})
        body["intercept"] = kept


@schemathesis.hook
def after_call(context, case, response) -> None:
    if _label(case) == SETUP and response.status_code == 201:
        _made.append(response.json()["server_id"])
    path = os.environ.get(STATS_ENV)
    if not path:
        return
    mode = case.meta.generation.mode.value if case.meta is not None else "stateful"
    with open(path, "a") as f:
        f.write(json.dumps({"op": _label(case), "method": response.request.method,
                            "mode": mode, "status": response.status_code}) + "\n")


@dataclass
class FuzzReport:
    """What one run sent and got, from the hooks' records and the command's exit."""

    seconds: float = 0.0
    requests: int = 0
    by_operation: Counter = field(default_factory=Counter)
    statuses: Counter = field(default_factory=Counter)
    answers: Counter = field(default_factory=Counter)  # (operation, status)
    modes: Counter = field(default_factory=Counter)
    setups_valid: int = 0  # schema-valid setup requests
    setups_admitted: int = 0  # ... answered 201
    exit_code: int = 0
    output: str = ""

    def summary(self) -> str:
        share = self.setups_admitted / self.setups_valid if self.setups_valid else 0.0
        return (f"{self.requests} requests in {self.seconds:.0f} s, modes {dict(self.modes)}, "
                f"statuses {dict(sorted(self.statuses.items()))}, valid setup requests "
                f"{self.setups_valid} of which 201: {self.setups_admitted} ({share:.0%}), "
                f"{len(self.by_operation)} operations")


def fuzz(base_url: str, token: str, workdir: Path, seconds: int,
         server_ids: list[str] | None = None, seed: int | None = None) -> FuzzReport:
    """One `schemathesis run` with `token` for about `seconds`. `server_ids`: real servers
    for the paths (see `before_call`); a cloud manager's run makes its own through the
    stateful phase's links."""
    workdir.mkdir(parents=True, exist_ok=True)
    stats = workdir / "requests.jsonl"
    stats.unlink(missing_ok=True)
    config = [
        'hooks = "fuzzing"',
        'max-failures = 50',
        "[headers]", f'Authorization = "Bearer {token}"',
        "[generation]", 'database = "none"',
        "[checks]", "enabled = true",
        "[phases.coverage]", 'unexpected-methods = ["get", "put", "post", "delete", '
        '"options", "patch", "trace"]',
    ]
    (workdir / "schemathesis.toml").write_text("\n".join(config) + "\n")
    cmd = [str(Path(sys.executable).parent / "schemathesis"), "--config-file",
           str(workdir / "schemathesis.toml"), "--no-color", "run",
           f"{base_url}/v1/openapi.json", "--url", base_url, "--checks", "all",
           "--phases", "examples,coverage,fuzzing,stateful", "--max-time", str(seconds),
           "--workers", "1", "--request-timeout", "60", "--output-truncate", "true"]
    if seed is not None:
        cmd += ["--seed", str(seed)]
    env = {**os.environ, STATS_ENV: str(stats), SERVERS_ENV: ",".join(server_ids or []),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent),
                                          os.environ.get("PYTHONPATH", "")])}
    t0 = time.monotonic()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True,
                          timeout=seconds * 3 + 300, cwd=workdir)
    report = FuzzReport(seconds=time.monotonic() - t0, exit_code=done.returncode,
                        output=done.stdout + done.stderr)
    (workdir / "schemathesis.out").write_text(report.output)
    for line in stats.read_text().splitlines() if stats.exists() else []:
        r = json.loads(line)
        report.requests += 1
        report.by_operation[r["op"]] += 1
        report.statuses[r["status"]] += 1
        report.answers[r["op"], r["status"]] += 1
        report.modes[r["mode"]] += 1
        if r["op"] == SETUP and r["method"] == "POST" and r["mode"] == "positive":
            report.setups_valid += 1
            report.setups_admitted += r["status"] == 201
    return report
