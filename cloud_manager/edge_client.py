"""The cloud manager's HTTP client for one edge node (protocol v1).

Procedure 1 (offer), 2 (setup request) and the cloud's side of 4 (withdrawal), with
short timeouts and retries: connection failures are retried for every call (nothing
reached the node), answers 502/503/504 only for the idempotent GET and DELETE, and so is a
kept-alive connection that is reset when it is used again (the node restarted behind a
proxy that held the connection open: the testbed's delayers, a board's reverse proxy).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import MaxRetryError, ProtocolError
from urllib3.util.retry import Retry

from enorm.protocol import (
    HandoverRequest,
    HandoverResult,
    NodeOffer,
    ProbeResult,
    Rejection,
    ServerInfo,
    SetupRequest,
    SetupResponse,
    TerminateResult,
)


class EdgeError(Exception):
    """The edge node answered something the protocol does not allow, or not at all."""

    def __init__(self, message: str, status: int | None = None, body: Any = None,
                 node: str | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.body, self.node = status, body, node


class Unauthorized(EdgeError):
    """401: the node does not know this cloud manager's token (`nodes.<name>.token`)."""


class Forbidden(EdgeError):
    """403: the token is known, but may not do this (e.g. a priority the operator does not
    allow it, an operator-only call)."""


class RequestRefused(EdgeError):
    """400: the node refused the request itself; `field` names what, `error` why."""

    def __init__(self, message: str, status: int, body: Any, node: str | None = None):
        super().__init__(message, status, body, node)
        body = body if isinstance(body, dict) else {}
        self.error, self.field = body.get("error"), body.get("field")


class DestinationNotAllowed(RequestRefused):
    """403 `destination_not_allowed`: the callback URL, the data sink or a handover's
    target is not among the destinations the node's operator allows this cloud manager
    (node config `destinations`); `field` names which."""


class Rejected(EdgeError):
    """409: the node does not admit the server; `reason` is machine-readable."""

    def __init__(self, rejection: Rejection):
        super().__init__(f"{rejection.error}: {rejection.detail}", 409, rejection)
        self.reason = rejection.error
        self.rejection = rejection


IDEMPOTENT = frozenset({"GET", "DELETE"})


def _reset(exc: requests.ConnectionError) -> bool:
    """The connection was reset or closed under the request (not refused, not timed
    out)."""
    reason = exc.args[0].reason if exc.args and isinstance(exc.args[0], MaxRetryError) else None
    return isinstance(reason, ProtocolError)


class EdgeClient:
    """One edge node, as seen by one cloud manager (its bearer token names the owner)."""

    def __init__(self, url: str, token: str, *, name: str | None = None,
                 timeout: float = 5.0, setup_timeout: float = 60.0,
                 terminate_timeout: float = 120.0, retries: int = 3):  # fmt: skip
        self.url = url.rstrip("/")
        self.name = name or self.url
        self.timeout, self.setup_timeout = timeout, setup_timeout
        self.terminate_timeout = terminate_timeout
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {token}"
        retry = Retry(total=retries, connect=retries, read=0, status=retries,
                      backoff_factor=0.1, status_forcelist=(502, 503, 504),
                      allowed_methods=IDEMPOTENT,
                      raise_on_status=False)  # fmt: skip
        self.http.mount("http://", HTTPAdapter(max_retries=retry))
        self.http.mount("https://", HTTPAdapter(max_retries=retry))

    def __repr__(self) -> str:
        return f"EdgeClient({self.name})"

    def _call(self, method: str, path: str, timeout: float, **kw: Any) -> requests.Response:
        try:
            try:
                return self.http.request(method, self.url + path, timeout=timeout, **kw)
            except requests.ConnectionError as exc:
                if method not in IDEMPOTENT or not _reset(exc):
                    raise
                # urllib3 counts a reset as a read error, and reads are not retried (a
                # read timeout on a long DELETE must not send it twice); a reset is not a
                # timeout, and GET and DELETE may be sent again (a DELETE the node had
                # already done answers 404: nothing to end).
                return self.http.request(method, self.url + path, timeout=timeout, **kw)
        except requests.RequestException as exc:
            raise EdgeError(f"{self.name}: {method} {path}: {exc}", node=self.name) from exc

    def _fail(self, resp: requests.Response) -> EdgeError:
        """The error an answer means, named after its cause (the node answered)."""
        try:
            body = resp.json()
            detail = body.get("detail", resp.text) if isinstance(body, dict) else resp.text
        except ValueError:
            body, detail = None, resp.text
        code = resp.status_code
        where = f"{self.name}: {resp.request.method} {urlsplit(resp.url).path}"
        if isinstance(body, dict) and body.get("error") == "destination_not_allowed":
            return DestinationNotAllowed(
                f"{where}: {code} destination_not_allowed: {body.get('field')}: {detail} "
                "(the node's operator lists where each cloud manager may point: "
                "`destinations`)", code, body, self.name)
        if code == 401:
            return Unauthorized(f"{where}: 401 unauthorized: the node does not know this "
                                f"cloud manager's token ({detail})", code, body, self.name)
        if code == 403:
            return Forbidden(f"{where}: 403 forbidden: {detail}", code, body, self.name)
        if code == 400 and isinstance(body, dict):
            field = body.get("field")
            return RequestRefused(f"{where}: 400 {body.get('error')}: {field}: {detail}",
                                  code, body, self.name)
        return EdgeError(f"{where}: {code} {detail}", code, body, self.name)

    def offer(self, timeout: float | None = None) -> NodeOffer:
        """GET /v1/node: capacity, free resources, unit, policy, load."""
        r = self._call("GET", "/v1/node", timeout or self.timeout)
        if r.status_code != 200:
            raise self._fail(r)
        return NodeOffer.model_validate(r.json())

    def probe(self, addresses: Sequence[str], timeout: float | None = None) -> ProbeResult:
        """POST /v1/probe: the RTT from the node to these users, by the node's own probe."""
        r = self._call("POST", "/v1/probe", timeout or self.timeout,
                       json={"addresses": list(addresses)})
        if r.status_code != 200:
            raise self._fail(r)
        return ProbeResult.model_validate(r.json())

    def setup(self, req: SetupRequest) -> SetupResponse:
        """POST /v1/servers (the handshake). Raises Rejected on 409."""
        r = self._call("POST", "/v1/servers", self.setup_timeout,
                       json=req.model_dump(mode="json", exclude_none=True))
        if r.status_code == 201:
            return SetupResponse.model_validate(r.json())
        if r.status_code == 409:
            raise Rejected(Rejection.model_validate(r.json()))
        raise self._fail(r)

    def redirect(self, server_id: str, on: bool) -> int:
        """PUT / DELETE /v1/servers/{id}/redirect: the node's transparent redirection of
        the server's users on or off; returns the rules in place."""
        r = self._call("PUT" if on else "DELETE", f"/v1/servers/{server_id}/redirect",
                       self.timeout)
        if r.status_code != 200:
            raise self._fail(r)
        return int(r.json()["rules"])

    def hand_over(self, server_id: str, to: EdgeClient, to_server: str,
                  key: str) -> HandoverResult:
        """POST /v1/servers/{id}/handover: this node gives the server's users' keys to
        `to_server` on `to` directly, then ends the server (shared keys merged home).
        An EdgeError with a 4xx (e.g. 403: the operator allows no such destination; 409:
        not running), 502 (the other node did not take them) or 503 (the server's Redis):
        nothing moved, the server serves on."""
        body = HandoverRequest(to_url=to.url, to_server=to_server, key=key)
        r = self._call("POST", f"/v1/servers/{server_id}/handover", self.terminate_timeout,
                       json=body.model_dump())
        if r.status_code != 200:
            raise self._fail(r)
        return HandoverResult.model_validate(r.json())

    def server(self, server_id: str) -> ServerInfo | None:
        """GET /v1/servers/{id}; None once the server is gone."""
        r = self._call("GET", f"/v1/servers/{server_id}", self.timeout)
        if r.status_code == 404:
            return None
        if r.status_code != 200:
            raise self._fail(r)
        return ServerInfo.model_validate(r.json())

    def servers(self) -> list[ServerInfo]:
        r = self._call("GET", "/v1/servers", self.timeout)
        if r.status_code != 200:
            raise self._fail(r)
        return [ServerInfo.model_validate(s) for s in r.json()]

    def terminate(self, server_id: str, conflicts: str | None = None) -> TerminateResult:
        """DELETE /v1/servers/{id}: the cloud's withdrawal; the edge merges the data back
        before it destroys the container. `pending` names servers whose merge failed
        (kept stopped on the node; it retries). `conflicts="cloud"`: every key the cloud
        changed since the copy keeps the cloud's value (else the setup's rule)."""
        r = self._call("DELETE", f"/v1/servers/{server_id}", self.terminate_timeout,
                       **({"params": {"conflicts": conflicts}} if conflicts else {}))
        if r.status_code in (200, 202):
            return TerminateResult.model_validate(r.json())
        if r.status_code == 404:
            return TerminateResult(terminated=[])
        raise self._fail(r)

    def events(self, server_id: str | None = None, limit: int = 100) -> list[dict]:
        params: dict[str, Any] = {"limit": limit}
        if server_id:
            params["server"] = server_id
        r = self._call("GET", "/v1/events", self.timeout, params=params)
        if r.status_code != 200:
            raise self._fail(r)
        return r.json()

    def close(self) -> None:
        self.http.close()
