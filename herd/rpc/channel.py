"""Channels and servers with herd's options, and the deadlines every client call carries.

Every channel is mutual TLS with the cluster CA (herd/rpc/pki.py): ``secure_channel`` dials a peer
as the name it must hold (``coordinator.herd``, ``w1.worker.herd``), so a server without that
certificate fails the handshake before a byte of a request is sent. Every server requires a client
certificate from the same CA and puts ``auth.Gate`` in front of its handlers.
"""

from __future__ import annotations

from concurrent import futures
from typing import Container, Mapping

import grpc

from herd.rpc.auth import Gate, Rule
from herd.rpc.pki import Identity

# Deadlines (seconds) every client call carries. Streams that move files get a longer one.
UNARY_DEADLINE_S = 10.0
TRANSFER_DEADLINE_S = 600.0
SLOW_LINK_BYTES_S = 256 * 1024  # 2 Mbit/s: a slow uplink a laptop may upload over


def transfer_deadline_s(size: int) -> float:
    """A file upload's deadline: TRANSFER_DEADLINE_S, plus its size at SLOW_LINK_BYTES_S (600 s
    alone cut a 300 MB dataset on a 4 Mbit/s uplink for ever: an outside run)."""
    return TRANSFER_DEADLINE_S + size / SLOW_LINK_BYTES_S

# The largest message a server takes: transfers move 1 MiB chunks (herd/rpc/files.py, the
# exchange), every other request is far smaller (auth.SMALL_REQUEST_BYTES, checked per rpc).
SERVER_MAX_MESSAGE = 4 * 1024 * 1024

# One place for channel options.
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # A peer that was away (a coordinator restarted) is dialled again within 5 s of its return:
    # gRPC's own backoff grows to 120 s, and workers took ~40 s to reach a coordinator that had
    # been down a minute, past the 30 s the README promises for re-adoption (an outside run).
    ("grpc.initial_reconnect_backoff_ms", 1_000),
    ("grpc.min_reconnect_backoff_ms", 1_000),
    ("grpc.max_reconnect_backoff_ms", 5_000),
]
# Connections a server holds at once, handshaking or not: a stranger re-opening connections that
# never finish TLS (each dropped after 5 s) took a coordinator from 440 MB to 1.35 GB and to
# 17,700 of its 20,000 descriptors (an outside run). gRPC has no per-source bound; past this one
# new connections are closed at once (~50 KB each: at most ~50 MB), connections already up (a
# worker's, the coordinator's to its workers) are kept, and a new CLI call may be refused until
# the flood ends. A cluster needs a few per machine.
MAX_INCOMING_CONNECTIONS = 1024
SERVER_OPTIONS = [
    ("grpc.max_allowed_incoming_connections", MAX_INCOMING_CONNECTIONS),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", SERVER_MAX_MESSAGE),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    # A connection that has not finished its TLS handshake in this time is closed: a peer that
    # opens sockets and says nothing holds no more than a socket, and not for long.
    ("grpc.server_handshake_timeout_ms", 5_000),
    # Streams one connection may have open at once (the per-peer call limit is in auth.Gate).
    ("grpc.max_concurrent_streams", 64),
    # A port another server holds is refused, not shared: with SO_REUSEPORT (gRPC's default on
    # Linux) a second coordinator on 7450 would take half of the first one's connections.
    ("grpc.so_reuseport", 0),
]


def secure_channel(target: str, identity: Identity, peer: str,
                   options: list | None = None) -> grpc.Channel:
    """A channel to ``target`` that presents ``identity`` and only talks to a server whose
    certificate, from the cluster CA, holds the DNS name ``peer`` (herd.rpc.pki.dns_name)."""
    opts = list(options or CHANNEL_OPTIONS) + [("grpc.ssl_target_name_override", peer)]
    return grpc.secure_channel(target, identity.channel_credentials(), options=opts)


def secure_server(identity: Identity, rules: Mapping[str, Rule], max_workers: int,
                  revoked: Container[str] = frozenset(), max_calls_per_peer: int = 16,
                  options: list | None = None) -> grpc.Server:
    """A server whose handlers only verified members may reach, per ``rules``. Bind it with
    ``bind``. Calls beyond what its threads can queue are refused at once (RESOURCE_EXHAUSTED)
    rather than waiting without bound."""
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        options=options or SERVER_OPTIONS,
        interceptors=[Gate(rules, revoked, max_calls_per_peer)],
        maximum_concurrent_rpcs=max_workers * 8,
    )


def bind(server: grpc.Server, identity: Identity, address: str) -> int:
    """Listens on ``address`` with mutual TLS; the port bound (0 when it could not bind)."""
    try:
        return server.add_secure_port(address, identity.server_credentials())
    except RuntimeError:
        return 0
