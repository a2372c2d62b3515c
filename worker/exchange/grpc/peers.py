"""Meeting the peers of a gRPC exchange: the start-up handshake, liveness probes, and telling a
peer with the wrong cluster secret apart from one that never came up."""

from __future__ import annotations

import time

import grpc

from herd.errors import AuthError, ConfigError, PeerLostError
from herd.rpc.auth import METADATA_KEY, ServerAuth, check_token
from herd.rpc.channel import signed_channel
from protos.v1 import exchange_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["ExchangeService"].full_name
RANK_KEY = "x-herd-rank"  # who a Hello claims to come from: only ever used to explain a refusal
SECRET_HINT = ("every rank must hold the same cluster secret ($HERD_SECRET, or the secret file "
               "`herd init` wrote)")
_ATTEMPT_S = 1.0
_UNARY = {"Hello": (pb.HelloRequest, pb.HelloReply), "Abort": (pb.AbortRequest, pb.AbortReply),
          "Bye": (pb.ByeRequest, pb.ByeReply)}


def peer_name(peers: list[str], rank: int) -> str:
    return f"rank {rank} ({peers[rank]})"


def unary(channel: grpc.Channel, method: str):
    request, reply = _UNARY[method]
    return channel.unary_unary(f"/{SERVICE}/{method}", request_serializer=request.SerializeToString,
                               response_deserializer=reply.FromString)


class RefusalLog(grpc.ServerInterceptor):
    """herd.rpc.auth's ServerAuth, remembering which ranks it refused: a peer started with another
    secret must read as that, not as a peer that never came up."""

    def __init__(self, secret: str):
        self._auth = ServerAuth(secret)
        self._secret = secret
        self.ranks: set[int] = set()

    def intercept_service(self, continuation, handler_call_details):
        metadata = dict(handler_call_details.invocation_metadata or ())
        claimed = metadata.get(RANK_KEY, "")
        if claimed.isdigit():
            try:
                check_token(self._secret, handler_call_details.method, metadata.get(METADATA_KEY))
            except AuthError:
                self.ranks.add(int(claimed))
        return self._auth.intercept_service(continuation, handler_call_details)


def connect(rank: int, peers: list[str], secret: str, timeout_s: float,
            refusals: RefusalLog) -> dict[int, grpc.Channel]:
    """Hello every peer until all answer (they may start seconds apart); one channel per peer.

    Raises AuthError when a peer refuses our credentials (or we refused theirs), ConfigError when
    a peer is not the rank its address says, PeerLostError naming who is missing at the deadline.
    """
    deadline = time.monotonic() + timeout_s
    size = len(peers)
    channels: dict[int, grpc.Channel] = {}
    missing = {r for r in range(size) if r != rank}
    request = pb.HelloRequest(rank=rank, world_size=size)
    try:
        while True:
            for r in sorted(missing):
                # A fresh channel per attempt: a refused connection puts a channel into
                # exponential reconnect back-off, which would outlast a peer's slow start.
                if r in channels:
                    channels.pop(r).close()
                channels[r] = signed_channel(peers[r], secret)
                remaining = deadline - time.monotonic()
                try:
                    reply = unary(channels[r], "Hello")(
                        request, timeout=max(0.05, min(_ATTEMPT_S, remaining)),
                        wait_for_ready=True, metadata=((RANK_KEY, str(rank)),))
                except grpc.RpcError as e:
                    if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                        raise AuthError(f"{peer_name(peers, r)} refused rank {rank}'s credentials: "
                                        f"{e.details()}", hint=SECRET_HINT) from None
                    continue
                if reply.rank != r or reply.world_size != size:
                    raise ConfigError(
                        f"{peers[r]} answers as rank {reply.rank} of {reply.world_size}, "
                        f"expected rank {r} of {size}",
                        hint="every rank must get the same HERD_EXCHANGE_PEERS, in rank order")
                missing.discard(r)
            if not missing:
                return channels
            if time.monotonic() >= deadline:
                names = ", ".join(peer_name(peers, r) for r in sorted(missing))
                if refused := sorted(missing & refusals.ranks):
                    raise AuthError(
                        f"{names} did not come up within {timeout_s:g}s: calls from "
                        f"{', '.join(f'rank {r}' for r in refused)} carried wrong credentials "
                        f"(rank {rank} waited)", hint=SECRET_HINT)
                raise PeerLostError(
                    f"{names} did not come up within {timeout_s:g}s (rank {rank} waited)",
                    hint="start every rank, and check HERD_EXCHANGE_PEERS and firewalls")
            time.sleep(0.1)
    except BaseException:
        for channel in channels.values():
            channel.close()
        raise


def probe(channels: dict[int, grpc.Channel], rank: int, size: int, timeout_s: float) -> list[int]:
    """Ranks that do not answer Hello within ``timeout_s`` (all asked at once)."""
    request = pb.HelloRequest(rank=rank, world_size=size)
    calls = {r: unary(ch, "Hello").future(request, timeout=timeout_s) for r, ch in channels.items()}
    silent = []
    for r, call in calls.items():
        try:
            call.result()
        except grpc.RpcError:
            silent.append(r)
    return sorted(silent)
