"""The coordinator's join port: JoinService, the one thing a machine without a certificate reaches.

It is its own gRPC server, apart from CoordinatorService: its own two threads, tiny messages, few
calls at once, and connections closed after a few seconds whatever they do. Whoever floods or
stalls it can delay a join, never a call of the cluster (herd/rpc/join.py says what the token's
HMACs protect).
"""

from __future__ import annotations

import hmac
import time
from concurrent import futures

import grpc

from herd import log
from herd.errors import AuthError, HerdError
from herd.rpc import pki
from herd.rpc.join import (
    JOIN_MAX_MESSAGE,
    JOIN_ROLES,
    MAX_TTL_S,
    reply_proof,
    request_proof,
    token_secret,
)
from herd.rpc.status import abort
from herd.rpc.token_ledger import TokenLedger
from protos.v1 import join_pb2, join_pb2_grpc

logger = log.get(__name__)

JOIN_SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", JOIN_MAX_MESSAGE),
    ("grpc.max_send_message_length", JOIN_MAX_MESSAGE),
    ("grpc.max_concurrent_streams", 2),
    # Every connection ends within a few seconds, a stalled (half-open) call with it.
    ("grpc.max_connection_age_ms", 5_000),
    ("grpc.max_connection_age_grace_ms", 2_000),
    ("grpc.max_connection_idle_ms", 3_000),
    ("grpc.http2.max_pings_without_data", 0),
]


class JoinServicer(join_pb2_grpc.JoinServiceServicer):
    def __init__(self, authority: pki.Authority, clock=time.time):
        self._ca = authority
        self._key = authority.join_key()
        self._clock = clock
        self._tokens = TokenLedger(authority.folder)  # `herd revoke` voids a member's token

    def Join(self, request, context):
        try:
            cert = self._sign(request)
        except HerdError as e:
            logger.warning("join_refused", role=request.role[:20], name=request.name[:80],
                           peer=context.peer(), error=e.message)
            abort(context, e)
        logger.info("member_joined", role=request.role, name=request.name, peer=context.peer())
        return join_pb2.JoinReply(ca_pem=self._ca.ca_pem, cert_pem=cert,
                                  proof=reply_proof(self._secret(request), self._ca.ca_pem, cert))

    def _secret(self, request) -> bytes:
        return token_secret(self._key, request.role, request.expires, request.nonce)

    def _sign(self, request) -> bytes:
        if request.role not in JOIN_ROLES:
            raise AuthError("a join token is for a worker or a client")
        proof = request_proof(self._secret(request), request.role, request.name, request.csr_pem)
        if not hmac.compare_digest(proof, request.proof):
            raise AuthError("the join token is not one of this cluster's",
                            hint="use a token printed by this cluster's `herd coordinator` or "
                            "`herd token`")
        now = self._clock()
        if not now <= request.expires <= now + MAX_TTL_S:
            raise AuthError("the join token has expired",
                            hint="make a new one on the coordinator's machine: `herd token`")
        self._tokens.check(request.nonce)
        cert = self._ca.sign_csr(request.csr_pem, request.role, request.name)
        self._tokens.joined(f"{request.role}/{request.name}", request.nonce)
        return cert


def serve_join(authority: pki.Authority, address: str) -> tuple[grpc.Server, int]:
    """JoinService on ``address``, started; the server and its port (0: could not bind)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="join"),
                         options=JOIN_SERVER_OPTIONS, maximum_concurrent_rpcs=4)
    join_pb2_grpc.add_JoinServiceServicer_to_server(JoinServicer(authority), server)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if port:
        server.start()
    return server, port
