"""The edge node's HTTP API (protocol v1): a Flask app factory and one blueprint.

Every answer is JSON. Bad input is a 400 that names the field, admission refusals are
409 with a machine-readable reason, and nothing raises a traceback at the client.
"""

from __future__ import annotations

import hashlib
import hmac
import json
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

from enorm import dashboard, destinations, handover, memory, probes, protocol, store
from enorm.config import TOKEN_HASH_PREFIX, NodeConfig
from enorm.events import decide
from enorm.manager import AdmissionRefused, CannotRedirect, EdgeManager, LaunchFailed
from enorm.metrics import NodeMetrics
from enorm.node import Forbidden, Node, NotFound

OPERATOR = "operator"

bp = Blueprint("v1", __name__)


def _error(status: int, error: str, detail: str, field: str | None = None) -> Response:
    body = protocol.ErrorBody(error=error, detail=detail, field=field)
    resp = jsonify(body.model_dump(exclude_none=True))
    resp.status_code = status
    return resp


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
def node() -> Response:
    return _json(_node().offer())


# One probe at a time per node: a placement question costs at most 256 connects.
_PROBING = threading.Lock()


@bp.post("/probe")
def probe_users() -> Response:
    """How far the given users are from this node, by the Monitor's own probe."""
    if request.mimetype != "application/json":
        return _error(415, "unsupported_media_type", "the body must be application/json",
                      "Content-Type")
    req = protocol.ProbeRequest.model_validate_json(request.get_data(cache=False), strict=True)
    if not _PROBING.acquire(blocking=False):
        return _error(429, "busy", "another probe is running; try again", "addresses")
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
def create_server() -> Response:
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
        body = protocol.Rejection(error=r.reason, detail=r.detail, free=r.free)  # type: ignore[arg-type]
        return _json(body, 409)
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
def list_servers() -> Response:
    return _json(_node().servers(_owner_filter()))


@bp.get("/servers/<sid>")
def get_server(sid: str) -> Response:
    return _json(_node().get(sid, _owner_filter()).info())


@bp.delete("/servers/<sid>")
def delete_server(sid: str) -> Response:
    """The cloud's override: withdraw a server (its data is merged back first)."""
    t0 = time.perf_counter()
    result = _manager().terminate(sid, protocol.TerminationReason.CLOUD_WITHDRAWAL,
                                  owner=_owner_filter())
    _metrics_of().termination_seconds.observe(time.perf_counter() - t0)
    return _json(result, 202 if result.pending else 200)


@bp.post("/servers/<sid>/handover")
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
        return _error(exc.status, exc.error, exc.detail, "to_url" if exc.status == 502 else "id")
    return _json(result)


@bp.post("/servers/<sid>/import")
def import_data(sid: str) -> Response:
    """Node to node: a handover's data for this server (bearer: its handover key)."""
    key = _bearer()
    data = protocol.HandoverData.model_validate_json(_json_body(), strict=True)
    try:
        result = _handovers().import_data(sid, key, data)
    except handover.HandoverError as exc:
        return _error(exc.status, exc.error, exc.detail, "id")
    except ValueError as exc:
        return _error(400, "bad_request", str(exc), "keys")
    except Forbidden:
        return _error(401, "unauthorized", "no handover key of this server", "Authorization")
    return _json(result)


def _json_body() -> bytes:
    """The raw JSON body; 415 for another type, and get_data honours
    MAX_CONTENT_LENGTH (413 before anything is parsed)."""
    if request.mimetype != "application/json":
        raise UnsupportedMediaType("the body must be application/json")
    return request.get_data(cache=False)


@bp.route("/servers/<sid>/redirect", methods=["PUT", "DELETE"])
def redirect_server(sid: str) -> Response:
    """Transparent redirection of the server's users on (PUT) or off (DELETE)."""
    try:
        n = _manager().set_redirect(sid, request.method == "PUT", _owner_filter())
    except CannotRedirect as exc:
        return _error(exc.status, "bad_request" if exc.status == 400 else "not_running",
                      exc.detail, "intercept" if exc.status == 400 else "id")
    return _json(protocol.RedirectState(server_id=sid, redirecting=request.method == "PUT",
                                        rules=n))


@bp.put("/servers/<sid>/limits")
def set_limits(sid: str) -> Response:
    """The operator resizes a server by hand, as `docker update` does (operator only; the
    auto-scaler may change it again in its next round)."""
    if g.owner != OPERATOR:
        return _error(403, "forbidden", "only the operator may set limits by hand",
                      "Authorization")
    payload = request.get_json(silent=True)
    if not isinstance(payload, dict):
        return _error(400, "bad_request", "body must be a JSON object", "body")
    limits = protocol.Resources.model_validate(payload)
    if _node().get(sid).state != "running":
        return _error(409, "not_running", f"server {sid} is not running", "id")
    _manager().scale(sid, limits, reason=protocol.ScaleReason.OPERATOR, numbers={})
    return _json(_node().get(sid).info())


@bp.get("/events")
def events() -> Response:
    try:
        limit = int(request.args.get("limit", "100"))
        if not 1 <= limit <= 10_000:
            raise ValueError
    except ValueError:
        return _error(400, "bad_request", "must be an integer within 1-10000", "limit")
    evs = _node().store.events(limit=limit, server_id=request.args.get("server"),
                                  owner=_owner_filter())
    return _json(evs)


@bp.get("/dashboard")
def dashboard_view() -> Response:
    """What the dashboard page shows: node history, servers, decisions (read-only)."""
    return jsonify(dashboard.view(_node(), _metrics_of(),
                                  current_app.extensions["enorm.history"], _owner_filter()))


@bp.post("/autoscale")
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


def openapi() -> dict:
    """The OpenAPI 3.1 description, built from the same pydantic models the API uses."""
    models = [protocol.SetupRequest, protocol.SetupResponse, protocol.Rejection,
              protocol.ErrorBody, protocol.NodeOffer, protocol.ServerInfo, protocol.Event,
              protocol.TerminateResult, protocol.Resources, protocol.ProbeRequest,
              protocol.ProbeResult, protocol.RedirectState, protocol.HandoverRequest,
              protocol.HandoverResult, protocol.HandoverData, protocol.ImportResult]
    schemas: dict[str, Any] = {}
    for m in models:
        s = m.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(s.pop("$defs", {}))
        schemas[m.__name__] = s

    def ref(name: str) -> dict:
        return {"content": {"application/json": {"schema": {
            "$ref": f"#/components/schemas/{name}"}}}}

    def arr(name: str) -> dict:
        return {"content": {"application/json": {"schema": {
            "type": "array", "items": {"$ref": f"#/components/schemas/{name}"}}}}}

    err = {"description": "error", **ref("ErrorBody")}
    sid = [{"name": "sid", "in": "path", "required": True, "schema": {"type": "string"}}]
    return {
        "openapi": "3.1.0",
        "info": {"title": "enorm edge node API", "version": protocol.VERSION},
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/node": {"get": {"summary": "The node's offer",
                                 "responses": {"200": {"description": "offer",
                                                       **ref("NodeOffer")}, "401": err}}},
            "/v1/probe": {"post": {
                "summary": "RTT from the node to the given users, by the node's own probe "
                           "(placement before any setup)",
                "requestBody": {"required": True, **ref("ProbeRequest")},
                "responses": {"200": {"description": "RTTs", **ref("ProbeResult")},
                              "400": err, "401": err, "415": err, "429": err}}},
            "/v1/servers/{sid}/redirect": {
                m: {"summary": f"Transparent redirection {word}",
                    "parameters": sid,
                    "responses": {"200": {"description": "state", **ref("RedirectState")},
                                  "400": err, "401": err, "404": err, "409": err}}
                for m, word in (("put", "on"), ("delete", "off"))},
            "/v1/servers": {
                "post": {"summary": "Setup request (handshake, Procedure 2)",
                         "requestBody": {"required": True, **ref("SetupRequest")},
                         "responses": {"201": {"description": "admitted",
                                               **ref("SetupResponse")},
                                       "400": err, "401": err, "403": err, "413": err,
                                       "415": err,
                                       "409": {"description": "refused",
                                               **ref("Rejection")}}},
                "get": {"summary": "Servers of the caller",
                        "responses": {"200": {"description": "servers",
                                              **arr("ServerInfo")}, "401": err}},
            },
            "/v1/servers/{sid}": {
                "parameters": sid,
                "get": {"summary": "One server",
                        "responses": {"200": {"description": "server", **ref("ServerInfo")},
                                      "401": err, "404": err}},
                "delete": {"summary": "Withdraw (data merged back first, Procedure 4)",
                           "responses": {"200": {"description": "terminated",
                                                 **ref("TerminateResult")},
                                         "202": {"description": "migration pending",
                                                 **ref("TerminateResult")},
                                         "401": err, "404": err}},
            },
            "/v1/servers/{sid}/handover": {
                "parameters": sid,
                "post": {"summary": "Give the server's users and their data to a server on "
                                    "another node (node to node), then end it",
                         "requestBody": {"required": True, **ref("HandoverRequest")},
                         "responses": {"200": {"description": "handed over",
                                               **ref("HandoverResult")},
                                       "400": err, "401": err, "403": err, "404": err,
                                       "409": err, "415": err, "502": err}}},
            "/v1/servers/{sid}/import": {
                "parameters": sid,
                "post": {"summary": "A handover's data from the old server's node (bearer: "
                                    "the key of this server's setup request)",
                         "requestBody": {"required": True, **ref("HandoverData")},
                         "responses": {"200": {"description": "restored",
                                               **ref("ImportResult")},
                                       "400": err, "401": err, "409": err, "415": err,
                                       "503": err}}},
            "/v1/servers/{sid}/limits": {
                "parameters": sid,
                "put": {"summary": "Set a server's limits by hand (operator)",
                        "requestBody": {"required": True, **ref("Resources")},
                        "responses": {"200": {"description": "server", **ref("ServerInfo")},
                                      "400": err, "401": err, "403": err, "404": err,
                                      "409": err}}},
            "/v1/events": {"get": {"summary": "Events, newest first",
                                   "parameters": [{"name": "limit", "in": "query",
                                                   "schema": {"type": "integer"}},
                                                  {"name": "server", "in": "query",
                                                   "schema": {"type": "string"}}],
                                   "responses": {"200": {"description": "events",
                                                         **arr("Event")}, "401": err}}},
            "/v1/autoscale": {"post": {"summary": "Run one auto-scaling round (operator)",
                                       "responses": {"200": {"description": "round"},
                                                     "403": err}}},
            "/healthz": {"get": {"security": [], "responses": {"200": {"description": "ok"}}}},
            "/v1/dashboard": {"get": {"summary": "The dashboard's view (read-only)",
                                      "responses": {"200": {"description": "view"},
                                                    "401": err}}},
            "/metrics": {"get": {"summary": "Prometheus text (operator token)",
                                 "responses": {"200": {"description": "Prometheus text"},
                                               "401": err, "403": err}}},
        },
    }


# What a werkzeug-level refusal is about, so that every 4xx names its field.
_HTTP_FIELDS = {404: "path", 405: "method", 413: "body", 415: "Content-Type",
                431: "headers"}
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
    app = Flask("enorm")
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

    spec = json.dumps(openapi())

    @app.get("/v1/openapi.json")
    def _openapi() -> Response:
        return Response(spec, mimetype="application/json")

    @app.get("/healthz")
    def _healthz() -> Response:
        try:
            node.store.r.ping()
        except Exception as exc:  # the node's Redis is gone: not healthy
            return _error(503, "unavailable", f"store: {exc}")
        return jsonify({"status": "ok", "node": node.config.name})

    @app.get("/metrics")
    def _metrics_view() -> Response:
        # Per-server series name tenants: only the operator's scraper may read them.
        denied = _authenticate()
        if denied is not None:
            return denied
        if g.owner != OPERATOR:
            return _error(403, "forbidden", "only the operator token may read /metrics",
                          "Authorization")
        return Response(generate_latest(metrics.registry), mimetype=CONTENT_TYPE_LATEST)

    app.register_blueprint(dashboard.page)

    app.register_error_handler(ValidationError, _validation_error)
    app.register_error_handler(destinations.Refused, lambda e: _error(
        400, "destination_not_allowed", str(e), e.field))
    app.register_error_handler(NotFound, lambda e: _error(404, "not_found",
                                                          f"no server {e.args[0]}", "id"))
    # Another tenant's server is "not found" as well: a 403 would confirm that it exists.
    app.register_error_handler(Forbidden, lambda e: _error(404, "not_found",
                                                           f"no server {e.args[0]}", "id"))
    app.register_error_handler(AdmissionRefused, lambda r: _json(protocol.Rejection(
        error=r.reason, detail=r.detail, free=r.free), 409))

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Response:
        return _error(exc.code or 500, exc.name.lower().replace(" ", "_"),
                      exc.description or "", _HTTP_FIELDS.get(exc.code or 0))

    @app.errorhandler(Exception)
    def _internal(exc: Exception) -> Response:
        app.logger.exception("internal error")
        return _error(500, "internal", f"{type(exc).__name__}: {exc}")

    return app
