"""The OpenAPI document is derived from the routes: a route without its entry cannot
exist, and each entry carries what the common layers answer."""

from __future__ import annotations

import pytest
from flask import Flask
from pydantic import BaseModel

from enorm import api, dashboard, openapi, protocol
from enorm.openapi import Answer, PathParameter, Undeclared, declare


def _app() -> Flask:
    app = Flask("t", static_folder=None)
    app.register_blueprint(api.bp, url_prefix="/v1")
    app.register_blueprint(dashboard.page)
    return app


def test_every_route_of_the_api_is_in_the_document() -> None:
    app = _app()
    doc = api.document(app)
    rules = {(r.rule, m) for r in app.url_map.iter_rules()
             for m in (r.methods or set()) - openapi.IMPLICIT}
    documented = {(p.replace("{", "<").replace("}", ">"), m.upper())
                  for p, item in doc["paths"].items() for m in item}
    # werkzeug writes `<path:name>`, the document `{name}`.
    assert {(r.replace("<path:", "<"), m) for r, m in rules} == documented
    limits = doc["paths"]["/v1/servers/{sid}/limits"]["put"]
    assert set(limits["responses"]) == {"200", "400", "401", "403", "404", "409", "413", "415"}
    assert limits["responses"]["401"]["headers"]["WWW-Authenticate"]["required"]
    assert limits["responses"]["409"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Rejection"}
    schemas = doc["components"]["schemas"]
    assert schemas["Limits"]["properties"]["cores"]["minimum"] == 0.01
    key = schemas["SetupRequest"]["properties"]["ssh_public_key"]
    assert key["pattern"] == protocol.SSH_KEY_PATTERN
    events = {p["name"]: p for p in doc["paths"]["/v1/events"]["get"]["parameters"]}
    assert (events["limit"]["schema"]["minimum"], events["limit"]["schema"]["maximum"]) == (
        1, 10_000)
    # A 409's body is a Rejection (with `free`), every other error an ErrorBody.
    assert "free" in schemas["Rejection"]["properties"]
    assert schemas["ErrorBody"]["additionalProperties"] is False


def test_a_route_without_its_entry_is_refused() -> None:
    app = _app()

    @app.get("/v1/extra")
    def extra() -> str:
        return "x"

    with pytest.raises(Undeclared, match="/v1/extra"):
        openapi.operations(app, protocol.ErrorBody)


def test_a_path_argument_must_be_described() -> None:
    app = Flask("t", static_folder=None)

    @app.get("/things/<tid>/<part>")
    @declare("a thing", {200: Answer("it")},
             path={"tid": PathParameter("its id", {"type": "string"})})
    def thing(tid: str, part: str) -> str:
        return tid

    with pytest.raises(Undeclared, match="part"):
        openapi.operations(app, protocol.ErrorBody)


def test_common_answers_follow_from_the_declaration() -> None:
    class Body(BaseModel):
        n: int

    app = Flask("t", static_folder=None)

    @app.post("/open")
    @declare("open", {200: Answer("ok")}, body=Body, security=None)
    def open_() -> str:
        return "x"

    (entry,) = openapi.operations(app, protocol.ErrorBody)
    assert set(entry.op.answers) == {200, 400, 413, 415}  # no token: no 401
