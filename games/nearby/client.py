"""A Nearby client for tests and tools: it logs in at the cloud, asks it which server
serves the user, and follows: on a connection error, a 404 (the server does not hold the
user) or a 409 with a `redirect`, it asks again and retries. One kept-alive HTTP session
per user, as a phone app keeps one."""

from __future__ import annotations

import time
from typing import Any

import requests


class NearbyClient:
    def __init__(self, cloud_url: str, user: str, name: str = "", timeout: float = 5.0,
                 retries: int = 4):  # fmt: skip
        self.cloud, self.user, self.name = cloud_url.rstrip("/"), user, name
        self.http = requests.Session()
        self.timeout, self.retries = timeout, retries
        self.token: str | None = None
        self.server: str | None = None

    def login(self) -> NearbyClient:
        r = self.http.post(self.cloud + "/login", json={"user": self.user, "name": self.name},
                           timeout=self.timeout)
        r.raise_for_status()
        self.token = r.json()["token"]
        self.where()
        return self

    def where(self) -> str:
        r = self.http.get(self.cloud + "/where", params={"user": self.user},
                          timeout=self.timeout)
        r.raise_for_status()
        self.server = r.json()["server"]
        return self.server

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """One request to the user's server; the answer's JSON (raises on a 4xx other
        than a move, or when the server cannot be found)."""
        for attempt in range(self.retries + 1):
            server = self.server or self.where()
            try:
                r = self.http.request(method, server + path, json=body, timeout=self.timeout,
                                      headers={"X-User": self.user, "X-Token": self.token})
            except requests.ConnectionError:
                r = None
            if r is not None and r.status_code not in (404, 409, 502, 503):
                r.raise_for_status()
                return r.json()
            if attempt == self.retries:
                if r is not None:
                    r.raise_for_status()
                raise ConnectionError(f"{self.user}: no server answers at {server}")
            if self.where() == server:
                time.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    def move(self, lat: float, lng: float) -> str:
        return self.call("POST", "/move", {"lat": lat, "lng": lng})["cell"]

    def post(self, text: str) -> str:
        return self.call("POST", "/post", {"text": text})["id"]

    def nearby(self) -> list[dict]:
        return self.call("GET", "/nearby")["messages"]

    def me(self) -> dict:
        return self.call("GET", "/me")

    def close(self) -> None:
        self.http.close()
