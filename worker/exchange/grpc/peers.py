"""Meeting the peers of a gRPC exchange: the start-up handshake, liveness probes, and telling a
peer that holds no credential for this job attempt apart from one that never came up.

Every rank holds a certificate for its job attempt only (herd/rpc/pki.py ``rank_scope``) and
dials its peers as that name, so TLS refuses a peer of another cluster, job or attempt, and the
server's gate refuses a caller of another attempt (``RULES``).
"""

from __future__ import annotations

import time

import grpc

from herd.errors import AuthError, ConfigError, PeerLostError
from herd.rpc import auth, pki
from herd.rpc.channel import CHANNEL_OPTIONS, secure_channel
from herd.rpc.status import is_tls_failure
from protos.v1 import exchange_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["ExchangeService"].full_name
CREDENTIAL_HINT = ("every rank of a job attempt gets its credential from the coordinator "
                   "(HERD_RANK_TLS names it); a rank of another attempt or cluster cannot join")
_ATTEMPT_S = 1.0
_UNARY = {"Hello": (pb.HelloRequest, pb.HelloReply), "Abort": (pb.AbortRequest, pb.AbortReply),
          "Bye": (pb.ByeRequest, pb.ByeReply)}


def rules(credential: pki.Identity) -> dict[str, auth.Rule]:
    """Only ranks of this very job attempt may call a rank's ExchangeService; Link moves chunks."""
    return auth.rules(SERVICE, {m: "rank" for m in ("Hello", "Link", "Abort", "Bye")},
                      names=[credential.name])


def peer_name(peers: list[str], rank: int) -> str:
    return f"rank {rank} ({peers[rank]})"


def unary(channel: grpc.Channel, method: str):
    request, reply = _UNARY[method]
    return channel.unary_unary(f"/{SERVICE}/{method}", request_serializer=request.SerializeToString,
                               response_deserializer=reply.FromString)


def channel_to(target: str, credential: pki.Identity | None) -> grpc.Channel:
    """A channel to a peer rank: TLS to a rank of the same job attempt; plaintext only when
    ``credential`` is None (bench/allreduce.py's baseline, never a real rank)."""
    if credential is None:
        return grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
    return secure_channel(target, credential, pki.dns_name("rank", credential.name))


def connect(rank: int, peers: list[str], credential: pki.Identity | None,
            timeout_s: float, neighbors_only: bool = False) -> dict[int, grpc.Channel]:
    """Hello every peer until all answer (they may start seconds apart); one channel per peer.
    ``neighbors_only`` (a ring over point-to-point cables): only the next rank. Each rank is
    listed at its end of the cable from the rank before it, so that is the only peer address this
    rank can reach, and the only one the ring sends to (the rank before dials us).

    Raises AuthError when a peer refuses our credential, or when a peer still missing at the
    deadline failed TLS (it holds no credential for this job attempt); ConfigError when a peer is
    not the rank its address says; PeerLostError naming who is missing at the deadline.
    """
    deadline = time.monotonic() + timeout_s
    size = len(peers)
    channels: dict[int, grpc.Channel] = {}
    missing = {(rank + 1) % size} if neighbors_only else set(range(size)) - {rank}
    untrusted: dict[int, str] = {}  # peers whose last try failed TLS, and how
    request = pb.HelloRequest(rank=rank, world_size=size)
    try:
        while True:
            for r in sorted(missing):
                # A fresh channel per attempt: a refused connection puts a channel into
                # exponential reconnect back-off, which would outlast a peer's slow start.
                if r in channels:
                    channels.pop(r).close()
                channels[r] = channel_to(peers[r], credential)
                remaining = deadline - time.monotonic()
                try:
                    # Not wait_for_ready: a call on a fresh channel still waits for its one
                    # connection attempt, and then fails with what went wrong (refused, or TLS:
                    # a rank of another attempt on that port), which the loop tells apart.
                    reply = unary(channels[r], "Hello")(
                        request, timeout=max(0.05, min(_ATTEMPT_S, remaining)))
                except grpc.RpcError as e:
                    if e.code() in (grpc.StatusCode.UNAUTHENTICATED,
                                    grpc.StatusCode.PERMISSION_DENIED):
                        raise AuthError(f"{peer_name(peers, r)} refused rank {rank}'s credential: "
                                        f"{e.details()}", hint=CREDENTIAL_HINT) from None
                    # A peer of another attempt may still hold the port for a moment: wait on.
                    if is_tls_failure(e):
                        untrusted[r] = e.details().rsplit(": ", 1)[-1]
                    elif e.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                        # (a try cut short by the deadline says nothing new: the last, shortest
                        # one erased the TLS failure and a stranger read as a lost peer, CI)
                        untrusted.pop(r, None)
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
                if bad := sorted(missing & set(untrusted)):
                    raise AuthError(
                        f"{names} did not come up within {timeout_s:g}s: "
                        + "; ".join(f"{peer_name(peers, r)} holds no credential of this job "
                                    f"attempt ({untrusted[r]})" for r in bad)
                        + f" (rank {rank} waited)", hint=CREDENTIAL_HINT)
                raise PeerLostError(
                    f"{names} did not come up within {timeout_s:g}s (rank {rank} waited)",
                    hint="is the data link between these workers up, and open to the "
                    "exchange port (a firewall)?")
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
