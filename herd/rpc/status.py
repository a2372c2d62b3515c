"""herd errors <-> gRPC status, in one place, for every service and every client.

Servers call ``abort(context, err)``: the call ends with err's status code, its message (and hint)
as the details, and its class name in the trailing metadata (``x-herd-error``). Clients wrap calls
in ``rpc_errors()``, which raises the same ``HerdError`` subclass the server raised, so the exit
code survives the wire (a refused dataset is exit 3 on the laptop too). A failure with no class
attached (the connection itself, a deadline, the auth interceptor) is mapped by its status code.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator

import grpc

from herd import log
from herd.errors import (
    DISK_ERRNOS,
    AuthError,
    ChecksumError,
    ConfigError,
    DatasetError,
    DoesNotFitError,
    HerdError,
    NotFoundError,
    NumericalError,
    PeerLostError,
    PlacementError,
    ProtocolError,
    StorageError,
)

ERROR_KEY = "x-herd-error"
logger = log.get(__name__)

# Most specific first: the first class the error is an instance of gives the code.
_CODES: list[tuple[type[HerdError], grpc.StatusCode]] = [
    (AuthError, grpc.StatusCode.UNAUTHENTICATED),
    (ChecksumError, grpc.StatusCode.DATA_LOSS),
    (ConfigError, grpc.StatusCode.INVALID_ARGUMENT),
    (DatasetError, grpc.StatusCode.INVALID_ARGUMENT),
    (ProtocolError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (PlacementError, grpc.StatusCode.FAILED_PRECONDITION),
    (PeerLostError, grpc.StatusCode.UNAVAILABLE),
    (StorageError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (NumericalError, grpc.StatusCode.FAILED_PRECONDITION),
]
# The classes a client rebuilds from the metadata; a name not listed falls back to the code.
_CLASSES = {cls.__name__: cls for cls in (HerdError, DoesNotFitError, *(c for c, _ in _CODES))}
# Errors with no class attached, by code.
_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: ConfigError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.FAILED_PRECONDITION: PlacementError,
    grpc.StatusCode.DATA_LOSS: ChecksumError,
}


def status_for(err: HerdError) -> grpc.StatusCode:
    for cls, code in _CODES:
        if isinstance(err, cls):
            return code
    return grpc.StatusCode.FAILED_PRECONDITION


def abort(context: grpc.ServicerContext, err: HerdError) -> None:
    """Ends the call with err's status code; the client sees the message, the hint and the
    class."""
    context.set_trailing_metadata(((ERROR_KEY, type(err).__name__),))
    context.abort(status_for(err), str(err))


def _error_class(e: grpc.RpcError) -> type[HerdError] | None:
    metadata = (e.trailing_metadata() if hasattr(e, "trailing_metadata") else None) or ()
    return _CLASSES.get(dict(metadata).get(ERROR_KEY, ""))


# What grpcio says when a TLS handshake fails: the peer's certificate is not from the CA we trust,
# or does not hold the name we dialled it as (herd/rpc/channel.py secure_channel).
_TLS_FAILURES = ("Hostname Verification", "CERTIFICATE_VERIFY_FAILED", "Tls handshake failed",
                 "Ssl handshake failed", "SSL_ERROR")
CERT_HINT = ("every machine needs a certificate of this cluster: `herd init` on the coordinator's "
             "machine, `herd join TOKEN` on the others")


def is_tls_failure(e: grpc.RpcError) -> bool:
    details = (e.details() if hasattr(e, "details") else None) or ""
    return e.code() == grpc.StatusCode.UNAVAILABLE and any(m in details for m in _TLS_FAILURES)


def error_from_rpc(e: grpc.RpcError, target: str = "") -> HerdError:
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = (e.details() if hasattr(e, "details") else None) or str(code)
    if (cls := _error_class(e)) is not None:
        # The server's own error: its message already names the culprit and the fix.
        return cls(details)
    if is_tls_failure(e):
        if "Hostname Verification" in details:  # signed by this cluster's CA, another member
            return AuthError(
                f"{target or 'the server'} is a member of this cluster, but not the one dialled "
                f"(TLS: another role or name answers there, e.g. a worker's port): {details}",
                hint="check the address and port: the coordinator's gRPC port is 7450 unless "
                "`herd coordinator --port` says otherwise")
        return AuthError(f"{target or 'the server'} is not a verified member of this cluster "
                         f"(TLS; or not a herd gRPC port): {details}", hint=CERT_HINT)
    if code == grpc.StatusCode.UNAVAILABLE:
        return PeerLostError(
            f"{target or 'the server'} is unreachable: {details}",
            # (said by workers and the coordinator too: "is `herd coordinator` running?" sent
            # a user after a coordinator that ran, where a worker's link was lossy: outside run)
            hint="is it running, and is the network between here and there up?",
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return PeerLostError(f"{target or 'the server'} did not answer in time")
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return AuthError(f"refused by {target or 'the server'}: {details}", hint=CERT_HINT)
    return _BY_CODE.get(code, HerdError)(details)


@contextlib.contextmanager
def rpc_errors(target: str = "") -> Iterator[None]:
    """Turns a failed call into the HerdError it stands for."""
    try:
        yield
    except grpc.RpcError as e:
        raise error_from_rpc(e, target) from None


def handlers(owner: str, folder: Callable[[Any], object]):
    """The decorators of one server's servicer methods, (unary, server-streaming): a HerdError,
    raised before or between messages, ends the call with its status (``abort``); so does an
    OSError of a full or failing disk, as a StorageError naming ``owner``'s disk (``folder``: of
    the servicer), never grpcio's "Exception calling application" (each handler of the
    coordinator's was patched one by one until it was said here once: a review)."""

    def refused(fn, context, e: Exception, servicer) -> None:
        if isinstance(e, OSError):
            if e.errno not in DISK_ERRNOS:
                raise e
            e = StorageError(f"{owner}'s disk cannot be written ({e.strerror}: "
                             f"{e.filename or folder(servicer)})",
                             hint=f"free space on {owner}'s disk (its --state-dir)")
        logger.info("rpc_refused", rpc=fn.__name__, error=str(e))
        abort(context, e)

    def unary(fn):
        @functools.wraps(fn)
        def wrapper(self, request, context):
            try:
                return fn(self, request, context)
            except (HerdError, OSError) as e:
                refused(fn, context, e, self)

        return wrapper

    def streaming(fn):
        @functools.wraps(fn)
        def wrapper(self, request, context):
            try:
                yield from fn(self, request, context)
            except (HerdError, OSError) as e:
                refused(fn, context, e, self)

        return wrapper

    return unary, streaming
