"""herd errors <-> gRPC status codes, in one place, for both services and every client.

Servers call ``abort(context, err)``; clients wrap calls in ``rpc_errors()`` so a refused call
surfaces as the same ``HerdError`` subclass (and exit code) the server raised.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import grpc

from herd.errors import (
    AuthError,
    ConfigError,
    DatasetError,
    HerdError,
    NotFoundError,
    PeerLostError,
    PlacementError,
)

# Deadlines (seconds) every client call carries. Streams get their own, longer ones.
UNARY_DEADLINE_S = 10.0
TRANSFER_DEADLINE_S = 600.0

_CODES: list[tuple[type[HerdError], grpc.StatusCode]] = [
    (AuthError, grpc.StatusCode.UNAUTHENTICATED),
    (ConfigError, grpc.StatusCode.INVALID_ARGUMENT),
    (DatasetError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (PlacementError, grpc.StatusCode.FAILED_PRECONDITION),
    (PeerLostError, grpc.StatusCode.UNAVAILABLE),
]
_ERRORS = {
    grpc.StatusCode.UNAUTHENTICATED: AuthError,
    grpc.StatusCode.INVALID_ARGUMENT: ConfigError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.FAILED_PRECONDITION: PlacementError,
}


class ChecksumError(HerdError):
    """Bytes that do not hash to the sha256 they were sent with."""


def status_for(err: HerdError) -> grpc.StatusCode:
    if isinstance(err, ChecksumError):
        return grpc.StatusCode.DATA_LOSS
    for cls, code in _CODES:
        if isinstance(err, cls):
            return code
    return grpc.StatusCode.FAILED_PRECONDITION


def abort(context: grpc.ServicerContext, err: HerdError) -> None:
    """Ends the call with err's status code; the client sees the message and the hint."""
    context.abort(status_for(err), str(err))


def error_from_rpc(e: grpc.RpcError, target: str = "") -> HerdError:
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = (e.details() if hasattr(e, "details") else None) or str(code)
    if code == grpc.StatusCode.UNAVAILABLE:
        return PeerLostError(
            f"{target or 'the server'} is unreachable: {details}",
            hint="is `herd coordinator` running? pass --coordinator HOST:PORT to skip discovery",
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return PeerLostError(f"{target or 'the server'} did not answer in time")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return AuthError(
            f"refused by {target or 'the server'}: {details}",
            hint="every machine needs the same cluster secret (`herd init` once, copy the file)",
        )
    err = _ERRORS.get(code, HerdError)(details)
    return err


@contextlib.contextmanager
def rpc_errors(target: str = "") -> Iterator[None]:
    """Turns a failed call into the HerdError it stands for."""
    try:
        yield
    except grpc.RpcError as e:
        raise error_from_rpc(e, target) from None
