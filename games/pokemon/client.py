"""A game client for tests, the demo and load tools.

It logs in at the cloud, asks the cloud's redirection config which server to play on,
and follows it: on a connection error (also one in the middle of an answer), a 404 (the
server does not hold the user) or a `redirect` hint it asks /config again and retries
(after a growing pause if the config still names the same server), so a user moves to
an edge server, back, or on to another node's server without noticing.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import requests

RETRYABLE_STATUS = (404, 409, 502, 503)
BACKOFF_S, BACKOFF_MAX_S = 0.02, 0.5


class GameClient:
    def __init__(self, cloud_url: str, provider: str, identity: str, *, name: str = "",
                 session: requests.Session | None = None, timeout: float = 5.0,
                 retries: int = 3):  # fmt: skip
        self.cloud = cloud_url.rstrip("/")
        self.provider, self.identity, self.name = provider, identity, name
        self.http = session or requests.Session()
        self.timeout, self.retries = timeout, retries
        self.user: str | None = None
        self.token: str | None = None
        self.server: str | None = None
        self.servers_used: list[str] = []  # every server switch, in order

    def login(self) -> str:
        """POST /id at the cloud: the user id (created on the first login)."""
        r = self.http.post(
            self.cloud + "/id",
            json={"provider": self.provider, "identity": self.identity, "name": self.name},
            timeout=self.timeout,
        )
        r.raise_for_status()
        body = r.json()
        self.user, self.token = body["user"], body["token"]
        self.refresh()
        return self.user

    def refresh(self) -> str:
        """Ask the cloud which server serves this user now."""
        r = self.http.get(self.cloud + "/config", params={"user": self.user}, timeout=self.timeout)
        r.raise_for_status()
        server = r.json()["server"].rstrip("/")
        if server != self.server:
            self.servers_used.append(server)
        self.server = server
        return server

    def request(self, method: str, path: str, **kw: Any) -> requests.Response:
        """One game request on the current server, following the redirection config."""
        if self.user is None:
            self.login()
        headers = {"X-User": self.user, "X-Token": self.token, **kw.pop("headers", {})}
        last: Exception | None = None
        # Retries end after `retries` of them and `timeout` seconds both: a server being
        # handed over to another node resets its users for a moment before the config
        # names the new one, and a quick client would run out of tries meanwhile.
        deadline = time.monotonic() + self.timeout
        for attempt in itertools.count():
            if attempt > self.retries and time.monotonic() >= deadline:
                break
            try:
                r = self.http.request(
                    method, self.server + path, headers=headers, timeout=self.timeout, **kw
                )
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
                # the server is gone, or went while answering (a terminating server's
                # node resets its users' connections): ask where to play now
                last = exc
                before = self.server
                self.refresh()
                if self.server == before:  # not switched yet: wait a little, growing
                    time.sleep(min(BACKOFF_S * 2**attempt, BACKOFF_MAX_S))
                continue
            hint = _redirect_hint(r)
            if r.status_code in RETRYABLE_STATUS and (hint or r.status_code == 404):
                last = requests.HTTPError(f"{r.status_code} from {self.server}", response=r)
                before = self.server
                self.refresh()
                if self.server == before:
                    return r  # the config did not change: this is the server's answer
                continue
            return r
        raise ConnectionError(f"no server could answer {method} {path}: {last}")

    def _json(self, method: str, path: str, **kw: Any) -> Any:
        r = self.request(method, path, **kw)
        r.raise_for_status()
        return r.json()

    # the game's requests
    def me(self) -> dict:
        return self._json("GET", "/u")

    def update(self, lat: float, lng: float) -> dict:
        return self._json("POST", "/update", json={"lat": lat, "lng": lng})

    def wild(self, region: str | None = None) -> dict:
        return self._json("GET", "/wpm", params={"region": region} if region else None)

    def catch(self, spawn: str) -> dict:
        return self._json("POST", "/pm", json={"spawn": spawn})

    def pokemon(self, pm_uid: str | int) -> dict:
        return self._json("GET", f"/pm/{pm_uid}")

    def party(self) -> list[dict]:
        return self._json("GET", "/6pm")["party"]

    def pokedex(self) -> list[int]:
        return self._json("GET", "/pd")["pokedex"]


def _redirect_hint(r: requests.Response) -> str | None:
    if "json" not in r.headers.get("Content-Type", ""):
        return None
    try:
        body = r.json()
    except ValueError:
        return None
    return body.get("redirect") if isinstance(body, dict) else None
