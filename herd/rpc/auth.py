"""Cluster-secret authentication for every gRPC call, on every service.

The secret never crosses the wire: each call carries ``x-herd-auth: <ts>.<nonce>.<hmac>``, an
HMAC-SHA256 over the method name, a timestamp and a nonce. A LAN sniffer learns no secret and a
token is only good for one method within ``MAX_SKEW_S``. (Without TLS a captured token can be
replayed inside that window; mTLS with a cluster CA is the next step and is additive.)
A zeroconf advert is a hint only: nothing is trusted until it answers an authenticated call.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path
from typing import Callable

import grpc

from herd.errors import AuthError

METADATA_KEY = "x-herd-auth"
MAX_SKEW_S = 300.0
SECRET_ENV = "HERD_SECRET"


def new_secret() -> str:
    return secrets.token_hex(32)


def default_home() -> Path:
    return Path(os.environ.get("HERD_HOME", Path.home() / ".herd"))


def write_secret(path: Path, secret: str | None = None) -> str:
    secret = secret or new_secret()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    return secret


def load_secret(path: Path | None = None) -> str:
    """The cluster secret: $HERD_SECRET, else the file (default $HERD_HOME/secret)."""
    if env := os.environ.get(SECRET_ENV):
        return env.strip()
    path = path or default_home() / "secret"
    try:
        secret = path.read_text().strip()
    except FileNotFoundError:
        raise AuthError(
            f"no cluster secret at {path}",
            hint="run `herd init` on one machine and copy its secret file to the others, "
            "or set HERD_SECRET",
        ) from None
    if len(secret) < 16:
        raise AuthError(f"the cluster secret in {path} is too short",
                        hint="run `herd init --force`")
    return secret


def _sign(secret: str, method: str, ts: str, nonce: str) -> str:
    msg = f"{method}|{ts}|{nonce}".encode()
    return hmac.new(secret.encode(), msg, hashlib.sha256).hexdigest()


def make_token(secret: str, method: str, now: float | None = None) -> str:
    ts = f"{(time.time() if now is None else now):.3f}"
    nonce = secrets.token_hex(8)
    return f"{ts}.{nonce}.{_sign(secret, method, ts, nonce)}"


def check_token(secret: str, method: str, token: str | None, now: float | None = None) -> None:
    if not token:
        raise AuthError("call carries no cluster credentials")
    try:
        ts, frac, nonce, mac = token.split(".")
        ts = f"{ts}.{frac}"
    except ValueError:
        raise AuthError("malformed credentials") from None
    if not hmac.compare_digest(_sign(secret, method, ts, nonce), mac):
        raise AuthError("wrong cluster secret")
    skew = abs((time.time() if now is None else now) - float(ts))
    if skew > MAX_SKEW_S:
        raise AuthError(f"credentials are {skew:.0f}s old", hint="check the machines' clocks")


class SignCalls(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds a fresh token to every call a channel makes (herd/rpc/channel.py signed_channel)."""

    def __init__(self, secret: str):
        self._secret = secret

    def _details(self, d):
        md = list(d.metadata or [])
        md.append((METADATA_KEY, make_token(self._secret, d.method)))
        return d._replace(metadata=md) if hasattr(d, "_replace") else _Details(d, md)

    def intercept_unary_unary(self, cont, d, req):
        return cont(self._details(d), req)

    def intercept_unary_stream(self, cont, d, req):
        return cont(self._details(d), req)

    def intercept_stream_unary(self, cont, d, it):
        return cont(self._details(d), it)

    def intercept_stream_stream(self, cont, d, it):
        return cont(self._details(d), it)


class _Details(grpc.ClientCallDetails):
    def __init__(self, d, metadata):
        self.method = d.method
        self.timeout = d.timeout
        self.metadata = metadata
        self.credentials = d.credentials
        self.wait_for_ready = getattr(d, "wait_for_ready", None)
        self.compression = getattr(d, "compression", None)


class ServerAuth(grpc.ServerInterceptor):
    """Refuses every call without valid credentials with UNAUTHENTICATED."""

    def __init__(self, secret: str):
        self._secret = secret

    def intercept_service(self, continuation: Callable, handler_call_details):
        token = dict(handler_call_details.invocation_metadata or ()).get(METADATA_KEY)
        try:
            check_token(self._secret, handler_call_details.method, token)
        except AuthError as e:
            return _deny(str(e), continuation(handler_call_details))
        return continuation(handler_call_details)


def _deny(message: str, handler):
    def abort(request_or_iterator, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler is None:
        return None
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)
