"""Who may do what on the coordinator's HTTP side.

- ``Authorization: Bearer <token>`` with the API token (herd/rpc/api_token.py): everything.
- A wrong bearer token: nothing (401), whatever else the request carries.
- The dashboard's session cookie (set by ``POST /login`` with the token): reading (GET) only, so a
  page on another site can make a browser send the cookie but can change nothing; it is also
  SameSite=Strict and HttpOnly.
- Anonymous: reading the dashboard and /metrics only when the coordinator's HTTP side is bound to
  loopback or started with ``--dashboard-open``; otherwise nothing. The job API (/v1) always wants
  the bearer token: programs can carry one, and it starts work on the cluster.

The token never appears in a page, a URL or a log: the login posts it in a request body, and the
cookie holds an expiry and an HMAC of it, not the token.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import time

from herd.rpc.api_token import api_token

COOKIE = "herd_session"
SESSION_S = 12 * 3600


class Access(enum.IntEnum):
    NONE = 0
    READ = 1
    FULL = 2


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class WebAuth:
    def __init__(self, secret: str, anonymous_read: bool):
        self._token = api_token(secret)
        self.anonymous_read = anonymous_read

    def token_ok(self, token: str) -> bool:
        return hmac.compare_digest(token.encode(), self._token.encode())

    def _session_mac(self, expiry: int) -> str:
        return hmac.new(self._token.encode(), f"session|{expiry}".encode(),
                        hashlib.sha256).hexdigest()

    def new_session(self, now: float | None = None) -> str:
        expiry = int((time.time() if now is None else now) + SESSION_S)
        return f"{expiry}.{self._session_mac(expiry)}"

    def session_ok(self, value: str | None, now: float | None = None) -> bool:
        try:
            expiry_text, mac = (value or "").split(".")
            expiry = int(expiry_text)
        except ValueError:
            return False
        fresh = expiry > (time.time() if now is None else now)
        return fresh and hmac.compare_digest(mac, self._session_mac(expiry))

    def access(self, authorization: str | None, cookie: str | None) -> Access:
        """What a request may do, from its Authorization header and session cookie."""
        if authorization is not None:
            scheme, _, token = authorization.partition(" ")
            ok = scheme.lower() == "bearer" and self.token_ok(token.strip())
            return Access.FULL if ok else Access.NONE
        if self.session_ok(cookie) or self.anonymous_read:
            return Access.READ
        return Access.NONE
