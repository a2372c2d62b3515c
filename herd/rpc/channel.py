"""Channels and servers with herd's options, and the deadlines every client call carries."""

from __future__ import annotations

from concurrent import futures

import grpc

from herd.rpc.auth import ServerAuth, SignCalls

# Deadlines (seconds) every client call carries. Streams that move files get a longer one.
UNARY_DEADLINE_S = 10.0
TRANSFER_DEADLINE_S = 600.0

# One place for channel options: large messages are always chunked by callers, but allow headroom.
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
SERVER_OPTIONS = CHANNEL_OPTIONS + [("grpc.http2.min_ping_interval_without_data_ms", 5_000)]


def signed_channel(target: str, secret: str) -> grpc.Channel:
    """A channel whose every call is signed with the cluster secret. The transport itself is
    plaintext (herd/rpc/auth.py says what that protects and what it does not)."""
    channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
    return grpc.intercept_channel(channel, SignCalls(secret))


def signed_server(secret: str, max_workers: int) -> grpc.Server:
    """A server that refuses every call not signed with the cluster secret."""
    return grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers),
                       options=SERVER_OPTIONS, interceptors=[ServerAuth(secret)])
