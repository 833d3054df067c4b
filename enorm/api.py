"""The edge node's HTTP API (protocol v1): a Flask app factory and one blueprint.

Every answer is JSON but the Prometheus text and the dashboard's page. Bad input is a 400
that names the field, a well-formed request the node's state refuses is a 409
(`Rejection`: a machine-readable reason), and nothing raises a traceback at the client.
Each view declares beside it what it takes and every status it answers (`declare`); the
OpenAPI document is built from those declarations (`enorm.openapi`), and an answer whose
status the view's entry does not list is logged and counted.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from flask import Blueprint, Flask, Response, current_app, g, jsonify, request
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from werkzeug.exceptions import HTTPException, UnsupportedMediaType

from enorm import dashboard, destinations, handover, memory, openapi, probes, protocol, store
from enorm.config import TOKEN_HASH_PREFIX, NodeConfig
from enorm.events import decide
from enorm.manager import AdmissionRefused, CannotRedirect, EdgeManager, LaunchFailed
from enorm.metrics import NodeMetrics
from enorm.node import Forbidden, Node, NotFound
from enorm.openapi import Answer, Link, PathParameter, declare

log = logging.getLogger(__name__)

OPERATOR = "operator"
# What a 401 asks for (RFC 9110: a 401 MUST name its scheme).
CHALLENGE = 'Bearer realm="enorm"'

bp = Blueprint("v1", __name__)


def _error(status: int, error: str, detail: str, field: str | None = None) -> Response:
    body = protocol.ErrorBody(error=error, detail=detail, field=field)
    resp = jsonify(body.model_dump(exclude_none=True))
    resp.status_code = status
    if status == 401:
        resp.headers["WWW-Authenticate"] = CHALLENGE
    return resp


def _refused(error: protocol.RefusalReason, detail: str, field: str | None = None,
             free: protocol.Resources | None = None) -> Response:
    """409: well formed, but the node's state says no."""
    body = protocol.Rejection(error=error, detail=detail, field=field, free=free)
    resp = jsonify(body.model_dump(mode="json", exclude_none=True))
    resp.status_code = 409
    return resp


# -- the vocabulary of the routes' entries -------------------------------------------------
def _err(description: str, **headers: str) -> Answer:
    return Answer(description, protocol.ErrorBody,
                  headers={k.replace("_", "-"): v for k, v in headers.items()})


SID = {"sid": PathParameter("the server's id", {"type": "string",
                                                "pattern": protocol.SERVER_ID_PATTERN})}
NOT_FOUND = _err("no such server (or another cloud manager's)")
REFUSED = Answer("the node's state refuses it: `error` says why", protocol.Rejection)
OPERATOR_ONLY = _err("not the operator's token")


def _server_links(expr: str, withdraw: bool = True) -> dict[str, Link]:
    """Where a server's id leads, from the answer that holds it (a listing's first id
    leads to what leaves the server in place)."""
    targets = [("get", "GET", "/v1/servers/{sid}"), ("limits", "PUT", "/v1/servers/{sid}/limits"),
               ("redirect_on", "PUT", "/v1/servers/{sid}/redirect"),
               ("redirect_off", "DELETE", "/v1/servers/{sid}/redirect"),
               ("handover", "POST", "/v1/servers/{sid}/handover")]
    if withdraw:
        targets.append(("withdraw", "DELETE", "/v1/servers/{sid}"))
    return {name: Link(openapi.operation_id(method, path), {"sid": expr})
            for name, method, path in targets}


def _json(model: BaseModel | list, status: int = 200) -> Response:
    if isinstance(model, list):
        data: Any = [m.model_dump(mode="json") for m in model]
    else:
        data = model.model_dump(mode="json")
    resp = jsonify(data)
    resp.status_code = status
    return resp


def _manager() -> EdgeManager:
    return current_app.extensions["enorm"]


def _node() -> Node:
    return _manager().node


def _handovers() -> handover.Handovers:
    return current_app.extensions["enorm.handovers"]


def _metrics_of() -> NodeMetrics:
    return current_app.extensions["enorm.metrics"]


def _owner_filter() -> str | None:
    """The operator sees every server; a cloud manager only its own."""
    return None if g.owner == OPERATOR else g.owner


def _bearer() -> str:
    """The request's bearer token, or ""."""
    header = request.headers.get("Authorization", "")
    return header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""


@bp.before_request
def _authenticate() -> Response | None:
    """Find the caller's owner by the SHA-256 of its bearer token (constant time).

    Comparing digests of the raw header bytes means any header a client can send (non-ASCII,
    any length) is an ordinary miss, and the node keeps no plain token to compare with.
    """
    digests: dict[bytes, str] = current_app.config["ENORM_TOKEN_DIGESTS"]
    token = _bearer()
    if request.endpoint == "v1.import_data":
        return None  # another node, with the server's one-time handover key: checked there
    if token:
        seen = token_digest(token)
        for known, owner in digests.items():
            if hmac.compare_digest(known, seen):
                g.owner = owner
                return None
    return _error(401, "unauthorized", "missing or unknown bearer token", "Authorization")


@bp.get("/node")
@declare("The node's offer", {200: Answer("the offer", protocol.NodeOffer)})
def node() -> Response:
    return _json(_node().offer())


# One probe at a time per node: a placement question costs at most 256 connects.
_PROBING = threading.Lock()


@bp.post("/probe")
@declare("RTT from the node to the given users (placement before any setup)",
         {200: Answer("the RTTs", protocol.ProbeResult),
          429: _err("another probe is running", Retry_After="seconds to wait")},
         body=protocol.ProbeRequest)
def probe_users() -> Response:
    """How far the given users are from this node, by the Monitor's own probe."""
    req = protocol.ProbeRequest.model_validate_json(_json_body(), strict=True)
    if not _PROBING.acquire(blocking=False):
        resp = _error(429, "busy", "another probe is running; try again", "addresses")
        resp.headers["Retry-After"] = "1"
        return resp
    try:
        cfg = _node().config
        rtts = probes.probe([str(a) for a in req.addresses], cfg.probe, cfg.probe_port,
                            cfg.probe_timeout_s, source=str(cfg.probe_source or ""))
    finally:
        _PROBING.release()
    answered = [v for v in rtts.values() if v is not None]
    return _json(protocol.ProbeResult(method=cfg.probe, rtt_ms=rtts,
                                      median_ms=statistics.median(answered) if answered else None))


@bp.post("/servers")
@declare("Setup request (handshake, Procedure 2)",
         {201: Answer("admitted and launched", protocol.SetupResponse,
                      links=_server_links("$response.body#/server_id")),
          403: _err("the operator's token (it owns no servers), or a destination the "
                    "operator does not allow (`destination_not_allowed`, field named)"),
          409: REFUSED,
          503: _err("admitted, but its container did not come up (everything undone)",
                    Retry_After="seconds to wait")},
         body=protocol.SetupRequest)
def create_server() -> Response:
    """Admission by free resources and priority, then the container, its forwards and
    its sshd."""
    if g.owner == OPERATOR:
        return _error(403, "forbidden", "the operator token cannot own servers",
                      "Authorization")
    req = protocol.parse_setup(_json_body())
    policy: destinations.Policy = current_app.extensions["enorm.destinations"]
    if req.callback_url is not None:
        policy.check_url(g.owner, "callback_url", str(req.callback_url))
    if req.data_sink is not None:
        policy.check_url(g.owner, "data_sink.url", req.data_sink.url)
    for i, x in enumerate(req.intercept):
        policy.check_url(g.owner, f"intercept.{i}", f"tcp://{x.address}:{x.port}")
    t0 = time.perf_counter()
    try:
        resp = _manager().handshake(req, g.owner)
    except AdmissionRefused as r:
        _metrics_of().handshake(False, r.reason)
        decide("rejected", r.reason, owner=g.owner, app=req.app, priority=req.priority,
               detail=r.detail)
        return _refused(r.reason, r.detail, r.field, r.free)
    except LaunchFailed as f:
        _metrics_of().handshake(False, "container_start_failed")
        decide("launch_failed", "container_start_failed", owner=g.owner, app=req.app,
               detail=f.detail)
        resp = _error(503, "container_start_failed", f.detail)
        resp.headers["Retry-After"] = "5"
        return resp
    _metrics_of().handshake(True, "", time.perf_counter() - t0)
    return _json(resp, 201)


@bp.get("/servers")
@declare("The caller's servers (the operator's: all)",
         {200: Answer("the servers", list[protocol.ServerInfo],
                      links=_server_links("$response.body#/0/id", withdraw=False))})
def list_servers() -> Response:
    return _json(_node().servers(_owner_filter()))


@bp.get("/servers/<sid>")
@declare("One server", {200: Answer("the server", protocol.ServerInfo), 404: NOT_FOUND},
         path=SID)
def get_server(sid: str) -> Response:
    return _json(_node().get(sid, _owner_filter()).info())


@bp.delete("/servers/<sid>")
@declare("Withdraw a server (data merged back first, Procedure 4)",
         {200: Answer("terminated", protocol.TerminateResult),
          202: Answer("its sink did not answer: kept stopped, the merge retried "
                      "(`pending`). A 200 comes once the data is merged and the container "
                      "killed; its removal follows (retried until it succeeds, its address "
                      "and ports held until then)", protocol.TerminateResult),
          404: NOT_FOUND}, path=SID, query=protocol.TerminateQuery)
def delete_server(sid: str) -> Response:
    """The cloud's override: withdraw a server (its data is merged back first)."""
    q = protocol.TerminateQuery.model_validate(request.args.to_dict())
    t0 = time.perf_counter()
    result = _manager().terminate(sid, protocol.TerminationReason.CLOUD_WITHDRAWAL,
                                  owner=_owner_filter(), cloud_wins=q.conflicts == "cloud")
    _metrics_of().termination_seconds.observe(time.perf_counter() - t0)
    return _json(result, 202 if result.pending else 200)


@bp.post("/servers/<sid>/handover")
@declare("Give the server's users and their data to a server on another node, then end it",
         {200: Answer("handed over", protocol.HandoverResult),
          403: _err("the operator's token, or a `to_url` the operator does not allow"),
          404: NOT_FOUND, 409: REFUSED,
          502: _err("the other node did not take the data (nothing moved)"),
          503: _err("the server's Redis did not answer (nothing moved)")},
         body=protocol.HandoverRequest, path=SID)
def handover_server(sid: str) -> Response:
    """Give the server's users and their data to a server on another node (whose setup
    request carried `key`), then end this one; answers once the other node holds it all."""
    if g.owner == OPERATOR:
        return _error(403, "forbidden", "the operator token owns no servers", "Authorization")
    req = protocol.HandoverRequest.model_validate_json(_json_body(), strict=True)
    policy: destinations.Policy = current_app.extensions["enorm.destinations"]
    policy.check_url(g.owner, "to_url", req.to_url)
    try:
        result = _handovers().hand_over(sid, req, g.owner)
    except handover.HandoverError as exc:
        return _handover_error(exc, "to_url" if exc.status == 502 else "id")
    return _json(result)


def _handover_error(exc: handover.HandoverError, field: str) -> Response:
    if exc.status == 409:
        return _refused("not_running", exc.detail, "id")
    return _error(exc.status, exc.error, exc.detail, field)


@bp.post("/servers/<sid>/import")
@declare("A handover's data from the old server's node (bearer: the key of this server's "
         "setup request)",
         {200: Answer("restored, each payload checked by RESTORE", protocol.ImportResult),
          404: NOT_FOUND, 409: REFUSED,
          503: _err("the server's Redis did not answer")},
         body=protocol.HandoverData, path=SID, security="handover_key")
def import_data(sid: str) -> Response:
    """Node to node: a handover's data for this server (bearer: its handover key)."""
    key = _bearer()
    no_key = _error(401, "unauthorized", "no handover key of this server", "Authorization")
    if not key:  # who asks comes before what the body says
        return no_key
    data = protocol.HandoverData.model_validate_json(_json_body(), strict=True)
    try:
        result = _handovers().import_data(sid, key, data)
    except handover.HandoverError as exc:
        return _handover_error(exc, "id")
    except ValueError as exc:
        return _error(400, "bad_request", str(exc), "keys")
    except Forbidden:
        return no_key
    return _json(result)


def _json_body() -> bytes:
    """The raw JSON body; 415 for another type, and get_data honours
    MAX_CONTENT_LENGTH (413 before anything is parsed)."""
    if request.mimetype != "application/json":
        raise UnsupportedMediaType("the body must be application/json")
    return request.get_data(cache=False)


_REDIRECT = {200: Answer("the redirection now", protocol.RedirectState), 404: NOT_FOUND,
             409: REFUSED}


@bp.put("/servers/<sid>/redirect")
@declare("Transparent redirection of the server's users on", _REDIRECT, path=SID)
def redirect_on(sid: str) -> Response:
    return _redirect(sid, True)


@bp.delete("/servers/<sid>/redirect")
@declare("Transparent redirection of the server's users off", _REDIRECT, path=SID)
def redirect_off(sid: str) -> Response:
    return _redirect(sid, False)


def _redirect(sid: str, on: bool) -> Response:
    try:
        n = _manager().set_redirect(sid, on, _owner_filter())
    except CannotRedirect as exc:
        return _refused(exc.reason, exc.detail,
                        "intercept" if exc.reason == "no_intercept" else "id")
    return _json(protocol.RedirectState(server_id=sid, redirecting=on, rules=n))


@bp.put("/servers/<sid>/limits")
@declare("Set a server's limits by hand (operator)",
         {200: Answer("the server with its new limits", protocol.ServerInfo),
          403: OPERATOR_ONLY, 404: NOT_FOUND, 409: REFUSED},
         body=protocol.Limits, path=SID)
def set_limits(sid: str) -> Response:
    """The operator resizes a server by hand, as `docker update` does (the auto-scaler
    may change it again in its next round). Refused before anything is written when the
    server is not running, the node has not the room or the image needs more memory."""
    if g.owner != OPERATOR:
        return _error(403, "forbidden", "only the operator may set limits by hand",
                      "Authorization")
    limits = protocol.Limits.model_validate_json(_json_body(), strict=True)
    wanted = protocol.Resources(cores=limits.cores, memory_mb=limits.memory_mb)
    _manager().scale(sid, wanted, reason=protocol.ScaleReason.OPERATOR, numbers={})
    return _json(_node().get(sid).info())


@bp.get("/events")
@declare("Events, newest first", {200: Answer("the events", list[protocol.Event])},
         query=protocol.EventsQuery)
def events() -> Response:
    q = protocol.EventsQuery.model_validate(request.args.to_dict())
    return _json(_node().store.events(limit=q.limit, server_id=q.server,
                                      owner=_owner_filter()))


# A view the node's own pages read: its shape belongs to the dashboard, not the protocol.
_OBJECT = {"type": "object"}


@bp.get("/dashboard")
@declare("The dashboard's view (read-only)",
         {200: Answer("node history, servers, decisions", _OBJECT)})
def dashboard_view() -> Response:
    """What the dashboard page shows: node history, servers, decisions (read-only)."""
    return jsonify(dashboard.view(_node(), _metrics_of(),
                                  current_app.extensions["enorm.history"], _owner_filter()))


@bp.post("/autoscale")
@declare("Run one auto-scaling round now (operator)",
         {200: Answer("the round's plan and results", _OBJECT), 403: OPERATOR_ONLY,
          404: _err("this node runs no auto-scaler")})
def autoscale() -> Response:
    """Run one auto-scaling round now (operator only); answers the plan and results."""
    if g.owner != OPERATOR:
        return _error(403, "forbidden", "only the operator may run the auto-scaler",
                      "Authorization")
    run = current_app.extensions.get("enorm.autoscale")
    if run is None:
        return _error(404, "not_found", "this node has no auto-scaler", "path")
    return jsonify(run())


def _validation_error(exc: ValidationError) -> Response:
    err = exc.errors()[0]
    # pydantic adds validator names (`lax-or-strict[...]`) to some locations: not fields.
    field = ".".join(str(p) for p in err["loc"]
                     if isinstance(p, int) or str(p).isidentifier()) or "body"
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return _error(400, "bad_request", f"{err['msg']}{more}", field)


def document(app: Flask) -> dict:
    """The OpenAPI 3.1 document of `app`, from its routes' declarations and the models."""
    return openapi.document(
        openapi.operations(app, protocol.ErrorBody), title="enorm edge node API",
        version=protocol.VERSION, security_schemes={
            "bearer": {"type": "http", "scheme": "bearer",
                       "description": "a cloud manager's token, or the operator's"},
            "handover_key": {"type": "http", "scheme": "bearer",
                             "description": "the `handover_key` of the server's setup "
                                            "request (node to node)"}})


# What a werkzeug-level refusal is about, so that every 4xx names its field.
_HTTP_FIELDS = {404: "path", 405: "method", 413: "body", 415: "Content-Type",
                431: "headers"}
# The exposition format of prometheus_client (the `/metrics` answer's media type).
PROMETHEUS_TEXT = CONTENT_TYPE_LATEST.split(";")[0]
# The largest setup request (100,000 users) is about 7 MB of JSON.
MAX_BODY_BYTES = 16 << 20
# After a body this big, freed memory is handed back to the kernel.
BIG_BODY_BYTES = 1 << 20


def token_digest(token: str) -> bytes:
    """SHA-256 of a token's UTF-8 bytes: what the node keeps and compares."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def _stored_digest(configured: str) -> bytes:
    """A configured token: `sha256:<hex>` as the operator stored it, or a plain token."""
    if configured.startswith(TOKEN_HASH_PREFIX):
        return bytes.fromhex(configured.removeprefix(TOKEN_HASH_PREFIX))
    return token_digest(configured)


def _policy(cfg: NodeConfig) -> destinations.Policy:
    """The operator's destinations, with the node's own store and API always refused."""
    assert cfg.state_dir is not None
    own = [(cfg.listen_host, cfg.listen_port), (cfg.public_host, cfg.listen_port)]
    sockets = [str(store.managed_socket(Path(cfg.state_dir)))]
    if cfg.store_url:
        u = urlsplit(cfg.store_url)
        if u.scheme == "unix":
            sockets.append(u.path)
        elif u.hostname:
            own.append((u.hostname, u.port or 6379))
    return destinations.Policy(cfg.destinations, own_sockets=sockets, own_ports=own)


def create_app(
    manager: EdgeManager,
    handovers: handover.Handovers,
    *,
    tokens: dict[str, str],
    operator_token: str,
    autoscale: Callable[[], dict] | None = None,
    metrics: NodeMetrics | None = None,
) -> Flask:
    """A fresh app around one Edge Manager; tests build their own."""
    node = manager.node
    app = Flask("enorm", static_folder=None)
    app.config["ENORM_TOKEN_DIGESTS"] = {
        **{_stored_digest(t): owner for t, owner in tokens.items()},
        _stored_digest(operator_token): OPERATOR,
    }
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.extensions["enorm.destinations"] = _policy(node.config)
    app.extensions["enorm"] = manager
    app.extensions["enorm.handovers"] = handovers
    if metrics is None:
        metrics = NodeMetrics(node)
    node.events.listeners.append(metrics.on_event)
    app.extensions["enorm.metrics"] = metrics
    app.extensions["enorm.history"] = dashboard.History()
    if autoscale is not None:
        app.extensions["enorm.autoscale"] = autoscale
    app.register_blueprint(bp, url_prefix="/v1")

    @app.teardown_request
    def _trim(_exc: BaseException | None) -> None:
        if (request.content_length or 0) > BIG_BODY_BYTES:
            memory.release_memory()

    @app.get("/v1/openapi.json")
    @declare("This document", {200: Answer("OpenAPI 3.1", _OBJECT)}, security=None)
    def _openapi() -> Response:
        return Response(app.extensions["enorm.openapi"], mimetype="application/json")

    @app.get("/healthz")
    @declare("Whether the daemon and its store answer",
             {200: Answer("healthy", protocol.Health),
              503: _err("the node's store does not answer")}, security=None)
    def _healthz() -> Response:
        try:
            node.store.r.ping()
        except Exception as exc:  # the node's Redis is gone: not healthy
            return _error(503, "unavailable", f"store: {exc}")
        return _json(protocol.Health(status="ok", node=node.config.name))

    @app.get("/metrics")
    @declare("Prometheus text exposition (operator token)",
             {200: Answer("the node's metrics (docs/metrics.md)",
                          media_types=(PROMETHEUS_TEXT,)),
              403: OPERATOR_ONLY})
    def _metrics_view() -> Response:
        # Per-server series name tenants: only the operator's scraper may read them.
        denied = _authenticate()
        if denied is not None:
            return denied
        if g.owner != OPERATOR:
            return _error(403, "forbidden", "only the operator token may read /metrics",
                          "Authorization")
        return Response(generate_latest(metrics.registry), content_type=CONTENT_TYPE_LATEST)

    app.register_blueprint(dashboard.page)

    app.register_error_handler(ValidationError, _validation_error)
    # Well formed, but not a place this cloud manager may make the node connect to.
    app.register_error_handler(destinations.Refused, lambda e: _error(
        403, "destination_not_allowed", str(e), e.field))
    app.register_error_handler(NotFound, lambda e: _error(404, "not_found",
                                                          f"no server {e.args[0]}", "id"))
    # Another tenant's server is "not found" as well: a 403 would confirm that it exists.
    app.register_error_handler(Forbidden, lambda e: _error(404, "not_found",
                                                           f"no server {e.args[0]}", "id"))
    app.register_error_handler(AdmissionRefused, lambda r: _refused(
        r.reason, r.detail, r.field, r.free))

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Response:
        resp = _error(exc.code or 500, exc.name.lower().replace(" ", "_"),
                      exc.description or "", _HTTP_FIELDS.get(exc.code or 0))
        # werkzeug's own headers (a 405's Allow: RFC 9110 requires it)
        for k, v in exc.get_headers():
            if k.lower() != "content-type":
                resp.headers[k] = v
        return resp

    @app.errorhandler(Exception)
    def _internal(exc: Exception) -> Response:
        app.logger.exception("internal error")
        return _error(500, "internal", f"{type(exc).__name__}: {exc}")

    # The document, built once every route is in: an undeclared route fails here.
    app.extensions["enorm.openapi"] = json.dumps(document(app))
    documented = {(e.rule, e.method): frozenset(e.op.answers)
                  for e in openapi.operations(app, protocol.ErrorBody)}

    @app.after_request
    def _conform(resp: Response) -> Response:
        """An answer its route's entry does not list is a bug of ours: said and counted."""
        rule = request.url_rule
        if rule is None or request.method == "OPTIONS":
            return resp  # werkzeug's own 404 / 405 / OPTIONS: no entry of ours
        method = "GET" if request.method == "HEAD" else request.method
        listed = documented.get((rule.rule, method))
        if listed is not None and resp.status_code not in listed:
            log.error("undocumented answer: %s %s -> %d", method, rule.rule, resp.status_code)
            metrics.undocumented.labels(f"{method} {rule.rule}", str(resp.status_code)).inc()
        return resp

    return app
