"""The server half of a rank's gRPC exchange: the ExchangeService handlers its peers call.

Each handler turns a call into news for the rank's group (worker/exchange/grpc/__init__.py): a
peer's Abort spends it, a Bye marks the right neighbour's end as orderly, and the left neighbour's
Link stream is applied, chunk by chunk, into the all-reduce it belongs to. The group keeps every
state change; this module only speaks gRPC.
"""

from __future__ import annotations

from concurrent import futures
from typing import TYPE_CHECKING

import grpc

from herd.errors import HerdError, PeerLostError
from herd.rpc import pki
from herd.rpc.auth import Gate
from herd.rpc.channel import SERVER_MAX_MESSAGE, SERVER_OPTIONS, bind
from protos.v1 import exchange_pb2 as pb
from worker.exchange.grpc import wire
from worker.exchange.grpc.peers import SERVICE, peer_name, rules

if TYPE_CHECKING:
    from worker.exchange.grpc import GrpcExchange

_LOST_HINT = "the rank process died or its machine dropped off the network"


class ExchangeServicer:
    def __init__(self, group: GrpcExchange):
        self.group = group

    def hello(self, request: pb.HelloRequest, context) -> pb.HelloReply:
        return pb.HelloReply(rank=self.group.rank, world_size=self.group.size)

    def abort(self, request: pb.AbortRequest, context) -> pb.AbortReply:
        self.group.aborted_by_peer(request.rank, request.seq, request.reason)
        return pb.AbortReply()

    def bye(self, request: pb.ByeRequest, context) -> pb.ByeReply:
        self.group.said_bye(request.rank, request.reason)
        return pb.ByeReply()

    def link(self, requests, context):
        """The left neighbour's link: apply its chunks, reply once per completed all-reduce."""
        g = self.group
        left = peer_name(g.peers, (g.rank - 1) % g.size)

        def broke(how: str) -> PeerLostError:
            during = f" during all-reduce #{ex.seq} ({ex.received}/{ex.plan.messages} chunks in)"
            return PeerLostError(f"lost {left}: its link {how}{during if ex else ''} "
                                 f"(seen by rank {g.rank})", hint=_LOST_HINT)

        ex = None
        try:
            for chunk in requests:
                if chunk.goodbye:  # the left closed its exchange, after its last all-reduce
                    # A spent group's rank says what spent it: that is the cause to report.
                    cause = PeerLostError(chunk.reason) if chunk.reason else None
                    if ex is not None:
                        ex.fail(cause or PeerLostError(f"{left} closed its exchange during "
                                                       f"all-reduce #{ex.seq} (seen by rank "
                                                       f"{g.rank})"))
                    g.link_lost(cause or PeerLostError(f"{left} closed its exchange "
                                                       f"(seen by rank {g.rank})"),
                                incoming=True, broken=False)
                    return
                if ex is None:
                    found = g.exchange_for(chunk.seq)
                    if isinstance(found, str):
                        context.abort(grpc.StatusCode.ABORTED, found)
                    ex = found
                if ex.error is not None:
                    context.abort(grpc.StatusCode.ABORTED, ex.error.message)
                ex.apply_incoming(chunk)
                if ex.received == ex.plan.messages:
                    yield pb.PushChunksReply(seq=ex.seq, received=ex.received)
                    ex = None
        except GeneratorExit:  # grpcio dropped this handler: the call was cancelled mid-reply
            g.link_lost(broke("broke"), incoming=True)
            raise
        except grpc.RpcError:
            g.link_lost(broke("broke"), incoming=True)
            return
        except HerdError as e:
            ex.fail(e)
            context.abort(grpc.StatusCode.ABORTED, f"rank {g.rank}: {e.message}")
        # The stream ended without a goodbye: the left rank died (grpcio may end a broken stream
        # this way rather than with an error).
        g.link_lost(broke("ended without a goodbye"), incoming=True)


def serve(group: GrpcExchange, credential: pki.Identity | None
          ) -> tuple[grpc.Server, futures.ThreadPoolExecutor]:
    """ExchangeService for ``group`` on its own address, started; and the server's threads.
    Mutual TLS with ``credential``, taking calls from ranks of the same job attempt only;
    plaintext when it is None (bench/allreduce.py's baseline only)."""
    servicer = ExchangeServicer(group)
    handlers = {
        "Hello": grpc.unary_unary_rpc_method_handler(
            servicer.hello, request_deserializer=pb.HelloRequest.FromString,
            response_serializer=pb.HelloReply.SerializeToString),
        # Hand-decoded so the payload is a view of the received bytes (wire.py).
        "Link": grpc.stream_stream_rpc_method_handler(
            servicer.link, request_deserializer=wire.decode,
            response_serializer=pb.PushChunksReply.SerializeToString),
        "Abort": grpc.unary_unary_rpc_method_handler(
            servicer.abort, request_deserializer=pb.AbortRequest.FromString,
            response_serializer=pb.AbortReply.SerializeToString),
        "Bye": grpc.unary_unary_rpc_method_handler(
            servicer.bye, request_deserializer=pb.ByeRequest.FromString,
            response_serializer=pb.ByeReply.SerializeToString),
    }
    # A link holds a thread for the group's life: one per peer, and some for the unary calls.
    pool = futures.ThreadPoolExecutor(max_workers=group.size + 4, thread_name_prefix="exchange")
    # A chunk is one message: the limit follows the group's chunk size.
    limit = max(SERVER_MAX_MESSAGE, group.chunk_bytes + 4096)
    options = [(k, limit if k == "grpc.max_receive_message_length" else v)
               for k, v in SERVER_OPTIONS]
    server = grpc.server(
        pool,
        handlers=[grpc.method_handlers_generic_handler(SERVICE, handlers)],
        # Every rank of the attempt holds the same name: the limit is the group's, with room
        # for each peer's Hello, Abort and Bye besides the one link.
        interceptors=[Gate(rules(credential), max_calls_per_peer=4 * group.size + 4)]
        if credential else [],
        options=options,
    )
    address = group.peers[group.rank]
    if credential is not None:
        bound = bind(server, credential, address)
    else:
        try:
            bound = server.add_insecure_port(address)
        except RuntimeError:
            bound = 0
    if not bound:
        pool.shutdown(wait=False)
        raise HerdError(f"rank {group.rank} cannot listen on {address}",
                        hint="the port is taken or the host is not this machine's address")
    server.start()
    return server, pool
