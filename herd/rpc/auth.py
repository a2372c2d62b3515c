"""Who may call what: the gate in front of every herd server.

Every server speaks mutual TLS with the cluster CA (herd/rpc/pki.py): a peer without a
certificate of this cluster never completes the handshake, so it cannot open a call, send a byte
of a message, or hold a server thread. There is no bearer token to capture and replay: TLS binds
every call to its connection and both ends' keys.

Behind the handshake, ``Gate`` checks each call before its handler runs:
- the method is one this server serves, and the caller's role (and, for a rank, its job attempt)
  may call it (``Rule``); anything else is PERMISSION_DENIED;
- the caller's name is not revoked (UNAUTHENTICATED);
- the caller has fewer than ``max_calls_per_peer`` calls in flight (RESOURCE_EXHAUSTED): one member
  cannot take every thread. With the server's per-message limit this bounds the bytes one peer can
  have in flight, too;
- a unary request is no larger than its rule's ``max_request_bytes`` (small for every rpc that is
  not a chunked transfer), refused before it is parsed.
Handlers that need finer checks (a worker reporting only for its own jobs) read ``peer_of``.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Container, Mapping

import grpc

from herd.rpc import pki

# A unary request of an rpc that moves no files: a config, a few ids. Transfers are chunked.
SMALL_REQUEST_BYTES = 64 * 1024


@dataclass(frozen=True)
class Peer:
    """The verified caller of a call: its certificate's role and name."""

    role: str
    name: str

    @property
    def label(self) -> str:
        return f"{self.role}/{self.name}"


def peer_of(context: grpc.ServicerContext) -> Peer | None:
    """The caller's verified identity, from its TLS client certificate."""
    props = context.auth_context() or {}
    sans = [s.decode(errors="replace") for s in props.get("x509_subject_alternative_name", ())]
    found = pki.names_of(sans)
    return Peer(*found) if found else None


@dataclass(frozen=True)
class Rule:
    """Who may call one method: these roles (and, when ``names`` is set, only these names), with
    unary requests of at most ``max_request_bytes``."""

    roles: frozenset[str]
    names: frozenset[str] | None = None
    max_request_bytes: int = SMALL_REQUEST_BYTES


def rules(service: str, roles: Mapping[str, Container[str] | str], names=None,
          sizes: Mapping[str, int] | None = None) -> dict[str, Rule]:
    """``{"/<service>/<Method>": Rule}`` for a service's methods."""
    out = {}
    for method, allowed in roles.items():
        allowed = frozenset([allowed] if isinstance(allowed, str) else allowed)
        out[f"/{service}/{method}"] = Rule(
            allowed, frozenset(names) if names is not None else None,
            (sizes or {}).get(method, SMALL_REQUEST_BYTES))
    return out


class Revocations:
    """The names the CA revoked (herd/rpc/pki.py ``Authority.revoke``), re-read when
    ``revoked.json`` changes: ``herd revoke`` on the coordinator's machine takes effect without a
    restart."""

    def __init__(self, folder: Path | None):
        self._path = folder / "revoked.json" if folder else None
        self._stamp: float | None = None
        self._names: frozenset[str] = frozenset()

    def names(self) -> frozenset[str]:
        if self._path is None:
            return self._names
        try:
            stamp = self._path.stat().st_mtime_ns
        except FileNotFoundError:
            return frozenset()
        if stamp != self._stamp:
            try:
                self._names = frozenset(json.loads(self._path.read_text()))
                self._stamp = stamp
            except (OSError, ValueError):
                pass  # unreadable now: keep the last list, read again next call
        return self._names

    def __contains__(self, label: str) -> bool:
        return label in self.names()


REVOKED_CHECK_S = 1.0  # how often an open stream looks at the revocations again


class _TooBig:
    def __init__(self, size: int):
        self.size = size


class Gate(grpc.ServerInterceptor):
    def __init__(self, rules: Mapping[str, Rule], revoked: Container[str] = frozenset(),
                 max_calls_per_peer: int = 16):
        self._rules = dict(rules)
        self._revoked = revoked
        self._max_calls = max_calls_per_peer
        self._lock = threading.Lock()
        self._calls: dict[str, int] = {}

    def intercept_service(self, continuation: Callable, details):
        handler = continuation(details)
        if handler is None:
            return None  # UNIMPLEMENTED, answered by grpcio without a thread
        rule = self._rules.get(details.method)
        if rule is None:
            return _refuse(handler, grpc.StatusCode.PERMISSION_DENIED,
                           f"{details.method} is not served to anyone")
        return _guard(handler, self, details.method, rule)

    # --- per call --------------------------------------------------------------------------

    def admit(self, context: grpc.ServicerContext, method: str, rule: Rule) -> str:
        """Checks the caller; returns its label (a slot is held until ``release``)."""
        peer = peer_of(context)
        if peer is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          "the caller holds no certificate of this cluster")
        if peer.label in self._revoked:
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          f"the certificate of {peer.label} was revoked")
        if peer.role not in rule.roles or (rule.names is not None and peer.name not in rule.names):
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"{peer.label} may not call {method.rsplit('/', 1)[-1]}")
        with self._lock:
            n = self._calls.get(peer.label, 0)
            if n >= self._max_calls:
                busy = True
            else:
                busy = False
                self._calls[peer.label] = n + 1
        if busy:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{peer.label} already has {n} calls in flight here")
        return peer.label

    def release(self, label: str) -> None:
        with self._lock:
            n = self._calls.get(label, 1) - 1
            if n <= 0:
                self._calls.pop(label, None)
            else:
                self._calls[label] = n


def _guard(handler, gate: Gate, method: str, rule: Rule):
    """``handler`` with the gate's checks before its behaviour runs, and its slot released when
    the call ends (after a streamed response's last message)."""
    kind = _kind(handler)
    behavior = getattr(handler, kind)
    deserialize = handler.request_deserializer
    if not handler.request_streaming:
        limit = rule.max_request_bytes

        def deserialize(data: bytes, _inner=handler.request_deserializer):
            if len(data) > limit:
                return _TooBig(len(data))
            return _inner(data) if _inner else data

    def check_size(request, context):
        if isinstance(request, _TooBig):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{request.size}-byte request: {method.rsplit('/', 1)[-1]} takes at most "
                          f"{rule.max_request_bytes} bytes")

    def watched(messages, label: str, context):
        """A stream's messages, its caller's revocation checked again as they pass (at most
        every REVOKED_CHECK_S): `herd revoke` also ends the calls already open."""
        checked = time.monotonic()
        for message in messages:
            if time.monotonic() - checked > REVOKED_CHECK_S:
                checked = time.monotonic()
                if label in gate._revoked:
                    context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                  f"the certificate of {label} was revoked")
            yield message

    if handler.response_streaming:
        def guarded(request, context):
            label = gate.admit(context, method, rule)
            try:
                check_size(request, context)
                if handler.request_streaming:
                    request = watched(request, label, context)
                yield from watched(behavior(request, context), label, context)
            finally:
                gate.release(label)
    else:
        def guarded(request, context):
            label = gate.admit(context, method, rule)
            try:
                check_size(request, context)
                if handler.request_streaming:
                    request = watched(request, label, context)
                return behavior(request, context)
            finally:
                gate.release(label)

    return handler._replace(request_deserializer=deserialize, **{kind: guarded})


def _kind(handler) -> str:
    return {(False, False): "unary_unary", (False, True): "unary_stream",
            (True, False): "stream_unary", (True, True): "stream_stream"}[
        (handler.request_streaming, handler.response_streaming)]


def _refuse(handler, code: grpc.StatusCode, message: str):
    """A handler of the same shape that ends the call with ``code`` at once."""
    def refuse(request, context):
        context.abort(code, message)

    if handler.response_streaming:
        def refuse_stream(request, context):
            context.abort(code, message)
            yield  # pragma: no cover (abort raises)
        return handler._replace(**{_kind(handler): refuse_stream})
    return handler._replace(**{_kind(handler): refuse})
