"""Who may do what on the coordinator's HTTP side.

- ``Authorization: Bearer <token>`` with the API token (herd/rpc/api_token.py): everything; with
  the read token: reading only (the dashboard's data and /metrics: a Prometheus server).
- A wrong bearer token, or one of an older generation (`herd api-token --rotate`): nothing (401),
  whatever else the request carries.
- The dashboard's session cookie (set by ``POST /login`` with either token): reading (GET) only,
  so a page on another site can make a browser send the cookie but can change nothing; it is also
  SameSite=Strict and HttpOnly.
- Anonymous: reading the dashboard and /metrics only when the coordinator's HTTP side is bound to
  loopback or started with ``--dashboard-open``, and only for a request that names this machine
  in its Host header (``WebAuth.host_ok``); otherwise nothing. The job API (/v1) always wants
  the bearer token: programs can carry one, and it starts work on the cluster.

Why the Host: any web page the operator opens can point a name of its own at 127.0.0.1 (DNS
rebinding) and then read the loopback dashboard as its own site (an outside review). Its requests
carry its own name as Host, and no token: the browser keeps a session cookie for the name it was
set under, and the page cannot know the token. So a token or cookie is accepted whatever the
Host (an SSH tunnel, a proxy, a hostname), and an anonymous read is granted only to names such a
page cannot own.

The token never appears in a page, a URL or a log: the login posts it in a request body, and the
cookie holds an expiry and an HMAC of it, not the token.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import socket
import time
from typing import Callable

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


def host_name(header: str) -> str:
    """The name or address in a Host header: no port, no IPv6 brackets, lower case."""
    name = header.strip().lower()
    if name.startswith("["):
        name = name[1:].partition("]")[0]
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    return name.rstrip(".")


class WebAuth:
    def __init__(self, secret: str, anonymous_read: bool, bind_host: str = "127.0.0.1",
                 generation: Callable[[], int] = lambda: 0):
        self._secret, self._generation = secret, generation
        self._tokens: tuple[int, str, str] | None = None  # (generation, full, read)
        self.anonymous_read = anonymous_read
        self._names = {"localhost", host_name(bind_host)}
        self._lan = not is_loopback(host_name(bind_host))
        if self._lan:  # --dashboard-open: also this machine's own names, as a browser types them
            me = socket.gethostname().lower().split(".")[0]
            self._names |= {me, f"{me}.local"}

    def host_ok(self, host: str | None) -> bool:
        """Whether a request with this Host header may read anonymously: a loopback name or
        address, the bound address, and on a LAN bind any IP address and this machine's name.
        A rebinding page always sends a name of its own (an address in the page's URL is
        connected to as it is, so it cannot be pointed elsewhere)."""
        if host is None:
            return True  # (a browser always sends one: this is a hand-made request)
        name = host_name(host)
        if name in self._names or name.endswith(".localhost"):
            return True  # (browsers resolve *.localhost to loopback themselves)
        try:
            address = ipaddress.ip_address(name)
        except ValueError:
            return False
        return address.is_loopback or self._lan

    def _current(self) -> tuple[str, str]:
        """The full and the read token of the generation in force (read each request: a
        rotation takes effect at once, with no restart)."""
        gen = self._generation()
        if self._tokens is None or self._tokens[0] != gen:
            self._tokens = (gen, api_token(self._secret, gen),
                            api_token(self._secret, gen, read_only=True))
        return self._tokens[1], self._tokens[2]

    def token_access(self, token: str) -> Access:
        full, read = self._current()
        if hmac.compare_digest(token.encode(), full.encode()):
            return Access.FULL
        return Access.READ if hmac.compare_digest(token.encode(), read.encode()) else Access.NONE

    def _session_mac(self, expiry: int) -> str:
        # (keyed by the full token: a rotation ends every session)
        return hmac.new(self._current()[0].encode(), f"session|{expiry}".encode(),
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

    def anonymous_ok(self, host: str | None) -> bool:
        return self.anonymous_read and self.host_ok(host)

    def access(self, authorization: str | None, cookie: str | None,
               host: str | None = None) -> Access:
        """What a request may do, from its Authorization header, session cookie and Host."""
        if authorization is not None:
            scheme, _, token = authorization.partition(" ")
            return self.token_access(token.strip()) if scheme.lower() == "bearer" else Access.NONE
        if self.session_ok(cookie) or self.anonymous_ok(host):
            return Access.READ
        return Access.NONE
