"""The ``grpc`` gradient exchange: a chunked, pipelined ring all-reduce between rank processes.

Works where an MLX group cannot form (no ``Group.split`` on the ring backend, only ring
neighbours, all ranks within ~30 s, aborts or hangs on a dead peer: FACTS.md). Every rank serves
ExchangeService (protos/v1/exchange.proto) on its own port, over mutual TLS with its job attempt's
credential (herd/rpc/pki.py rank_scope; peers.py),
and opens one stream (Link) to its right neighbour at start-up that carries every all-reduce, in
chunks (schedule: ring.py; bytes on the wire: wire.py; the handlers peers call: server.py). Chunks
are far below any message-size limit, so a buffer of any length goes through.

Every all-reduce has a deadline. A killed peer breaks its links. Its left neighbour sees it at
once, in an all-reduce or between two (grpcio 1.85 does not always wake the server side of an
idle stream whose client died: its right neighbour may not). A stalled peer is found by probing
every rank just before the deadline. The first rank to know tells every peer (Abort), so each
rank raises ``herd.errors.PeerLostError`` naming the lost peer within ``timeout_s``, and the
exchange is spent: a new group needs a new ``GrpcExchange``. An orderly close says so on both
links (a goodbye message to the right, Bye to the left), so a neighbour that closes after the
last all-reduce is never taken for a lost one.
"""

from __future__ import annotations

import enum
import os
import threading
import time
import weakref
from concurrent import futures
from pathlib import Path

import grpc
import mlx.core as mx
import numpy as np

from herd import log
from herd.errors import AuthError, ConfigError, HerdError, PeerLostError
from herd.rpc import pki
from protos.v1 import exchange_pb2 as pb
from worker.exchange.grpc import wire
from worker.exchange.grpc.peers import CREDENTIAL_HINT, SERVICE, connect, peer_name, probe, unary
from worker.exchange.grpc.ring import Exchange, RingPlan
from worker.exchange.grpc.server import serve
from worker.rank.runtime import reuse_freed_memory

logger = log.get(__name__)

RANK_TLS_ENV = "HERD_RANK_TLS"  # set by the worker agent (worker/agent/rank_process.py)
NEIGHBORS_ONLY_ENV = "HERD_EXCHANGE_NEIGHBORS_ONLY"  # "1": a cable ring (peers.connect)
# Big enough that per-message Python overhead is small next to the copy, small enough that a ring
# of a few ranks keeps several chunks in flight (bench/results/allreduce-*.md).
DEFAULT_CHUNK_BYTES = 1024 * 1024
# Buffers this small (scalars: loss sums, token counts, metrics) always travel in float32: a
# lossy wire saves nothing on them, and a token count rounded to 8 bits skews every update.
EXACT_MAX_ELEMENTS = 4096
# How long a rank waits for a peer to take its Abort or Bye. On a loaded machine a healthy peer's
# server may take more than half a second to answer; a Bye or Abort that times out leaves that
# peer to learn of the failure from our closed link, and it then names us, not the rank that
# died. So telling may use the time left before the all-reduce's deadline, up to this much.
TELL_S = 5.0


class GroupState(enum.IntEnum):
    """The life of a group, in order: it only ever moves forward (``GrpcExchange._advance``)."""

    READY = 0  # all-reduces run
    SPENT = 1  # an all-reduce failed or a neighbour left; the peers may not all know yet
    SPENT_ANNOUNCED = 2  # spent, and every peer has been (or is being) told why
    CLOSED = 3  # this rank closed it


def _close_at_exit(exchange: "GrpcExchange") -> None:
    """Close ``exchange`` when the process exits without having closed it (an exception on the
    way). Otherwise exit would hang: concurrent.futures joins the server's pool threads at exit,
    and one of them serves the left neighbour's link until that link ends, which for a
    neighbour exiting the same way is never. threading's own exit hooks run before that join
    (concurrent.futures registers its join the same way); atexit runs after it, too late."""
    ref = weakref.ref(exchange)

    def close() -> None:
        if (alive := ref()) is not None:
            alive.close()

    register = getattr(threading, "_register_atexit", None)
    try:
        if register is not None:
            register(close)
    except RuntimeError:
        pass  # the interpreter is already shutting down: nothing left to hang


class GrpcExchange:
    """A ring of ``len(peers)`` ranks summing float32 buffers over authenticated gRPC streams.

    ``peers[i]`` is the ``host:port`` rank i serves on; this rank binds ``peers[rank]``.
    ``credential``: this rank's certificate for its job attempt (every rank of the group holds
    one for the same attempt); None only for a plaintext baseline in benchmarks. The constructor
    returns once every peer has answered, or raises PeerLostError naming the missing ones after
    ``timeout_s`` (AuthError when a peer holds no credential of this attempt).
    """

    name = "grpc"

    def __init__(
        self,
        rank: int,
        peers: list[str],
        credential: pki.Identity | None,
        timeout_s: float = 60.0,
        wire_dtype: str = "float32",
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        neighbors_only: bool = False,
    ):
        if not 0 <= rank < len(peers):
            raise ConfigError(
                f"rank {rank} is outside a group of {len(peers)} peers",
                hint="HERD_EXCHANGE_PEERS lists one host:port per rank, in rank order")
        if wire_dtype not in wire.WIRE_DTYPES:
            raise ConfigError(f"cluster.wire_dtype {wire_dtype!r} is not supported",
                              hint=f"use one of {sorted(wire.WIRE_DTYPES)}")
        if timeout_s <= 0 or chunk_bytes < 4:
            raise ConfigError("cluster.exchange_timeout_s and chunk_bytes must be positive")
        self.rank, self.size, self.peers = rank, len(peers), list(peers)
        self.timeout_s = float(timeout_s)
        self.wire_dtype = wire_dtype
        self._dtype = wire.WIRE_DTYPES[wire_dtype]
        self._chunk_elements = max(1, chunk_bytes // 4)
        self.chunk_bytes = self._chunk_elements * 4
        self._credential = credential
        self._log = logger.bind(rank=rank, size=self.size)
        self._seq = 0
        # The group's lifecycle, under _registry: its state and, once spent, the first cause.
        self._state = GroupState.READY
        self._error: HerdError | None = None
        self._exchanges: dict[int, Exchange] = {}
        self._registry = threading.Condition()
        self._server: grpc.Server | None = None
        self._pool: futures.ThreadPoolExecutor | None = None  # the server's threads
        self._channels: dict[int, grpc.Channel] = {}
        self._link = None  # the stream to the right neighbour
        self._right_closed = False  # it said Bye: its end of our link is orderly
        self._right_reason = ""  # ...and why, when its group was spent
        self._told: list[grpc.Future] = []  # Abort calls made, kept until they finish
        self._replies: threading.Thread | None = None
        if self.size == 1:
            return
        started = time.monotonic()
        reuse_freed_memory()  # chunk buffers stay warm: no page fault per byte moved
        try:
            self._server, self._pool = serve(self, credential)
            self._channels = connect(rank, self.peers, credential, self.timeout_s,
                                     neighbors_only)
        except AuthError:
            # Stay reachable a moment: peers still dialling us (their deadline may be just after
            # ours) then fail TLS too, and report a credential mismatch instead of a rank that
            # never came up.
            time.sleep(min(2.0, self.timeout_s))
            self.close()
            raise
        except BaseException:
            self.close()
            raise
        right = (rank + 1) % self.size
        self._link = self._channels[right].stream_stream(
            f"/{SERVICE}/Link",
            request_serializer=None,  # the request stream yields encoded bytes already
            response_deserializer=pb.PushChunksReply.FromString,
        )(self._link_requests())
        self._replies = threading.Thread(target=self._read_replies, name="exchange-replies",
                                         daemon=True)
        self._replies.start()
        _close_at_exit(self)
        self._log.info("exchange_ready", exchange="grpc", peers=self.peers, wire_dtype=wire_dtype,
                       startup_s=round(time.monotonic() - started, 3))

    @classmethod
    def from_env(cls, timeout_s: float = 60.0, wire_dtype: str = "float32") -> "GrpcExchange":
        """Rank from HERD_RANK (else MLX_RANK), peers from HERD_EXCHANGE_PEERS, the rank's
        credential from the folder HERD_RANK_TLS names (``rank.pem``, ``rank.key``, ``ca.pem``:
        the worker agent writes them; tests and ``herd train`` users make them with
        ``herd.rpc.pki.Authority.issue("rank", ...)``)."""
        rank = os.environ.get("HERD_RANK") or os.environ.get("MLX_RANK")
        listed = os.environ.get("HERD_EXCHANGE_PEERS", "").split(",")
        peers = [p.strip() for p in listed if p.strip()]
        if rank is None or not peers:
            raise ConfigError(
                "the grpc exchange needs HERD_RANK (or MLX_RANK) and HERD_EXCHANGE_PEERS",
                hint='the launcher sets HERD_EXCHANGE_PEERS="host:port,host:port,..." in rank '
                'order',
            )
        try:
            rank_i = int(rank)
        except ValueError:
            raise ConfigError(f"HERD_RANK/MLX_RANK must be an integer, not {rank!r}") from None
        folder = os.environ.get(RANK_TLS_ENV)
        if not folder:
            raise ConfigError(f"the grpc exchange needs {RANK_TLS_ENV}: the folder of this "
                              "rank's credential", hint=CREDENTIAL_HINT)
        credential = pki.Identity.load(Path(folder), "rank")
        return cls(rank_i, peers, credential, timeout_s=timeout_s, wire_dtype=wire_dtype,
                   neighbors_only=os.environ.get(NEIGHBORS_ONLY_ENV) == "1")

    # ---- the collective ----------------------------------------------------------------------

    def all_sum(self, flat: mx.array, donate: bool = False) -> mx.array:
        """The elementwise sum of ``flat`` over all ranks (float32, 1-D), identical on every rank.

        One call at a time (every rank makes the same calls in the same order). ``donate``: the
        caller owns ``flat``'s buffer alone (no other array shares it) and never reads it again,
        so the sum is written into it instead of into a copy.
        """
        if flat.ndim != 1 or flat.dtype != mx.float32:
            raise ValueError(f"all_sum takes a 1-D float32 array, got {flat.dtype} {flat.shape}")
        if self.size == 1:
            return flat
        # Summed in place through a numpy view and returned as is. Without ``donate``, in one
        # copy owned by MLX; with it, in ``flat`` itself: a fresh buffer of gradient size costs a
        # page fault per 4 KiB, more CPU than moving it to a peer (bench/results/allreduce-*.md).
        out = flat if donate else mx.array(flat)
        mx.eval(out)
        buf = np.asarray(out)
        if not buf.flags.c_contiguous:  # a broadcast (stride 0) or strided view: sum a real copy
            out = mx.array(np.ascontiguousarray(buf))
            mx.eval(out)
            buf = np.asarray(out)
        plan = RingPlan(buf.size, self.size, self.rank, self._chunk_elements)
        deadline = time.monotonic() + self.timeout_s
        with self._registry:
            if self._state is GroupState.CLOSED:  # under the lock: close() must not miss a
                raise PeerLostError("the grpc exchange is closed")  # call it races with
            broken = self._error if self._state is not GroupState.READY else None
            announce = self._state is GroupState.SPENT
            if announce:
                self._advance(GroupState.SPENT_ANNOUNCED)
            if broken is None:
                dtype = wire.FLOAT32 if buf.size <= EXACT_MAX_ELEMENTS else self._dtype
                ex = Exchange(self._seq, plan, buf, dtype, deadline)
                self._seq += 1
                self._exchanges[ex.seq] = ex
                self._registry.notify_all()  # the link's request stream picks it up
        if broken is not None:
            if announce:
                # Found out quietly (a neighbour closed, or its link broke unseen): a peer two
                # hops away would otherwise hear of it only from our own close, and blame us.
                self._tell_peers(self._seq, broken, wait=True)
            raise PeerLostError(f"the grpc exchange failed earlier: {broken.message}",
                                hint="the job's next attempt forms a new group")
        try:
            # Stop waiting a little before the deadline: what is left goes to naming the culprit.
            probe_s = min(1.0, 0.1 * self.timeout_s)
            if not ex.wait(lambda: ex.done, deadline - probe_s - self._reserve_s()):
                if ex.error is None:
                    ex.fail(self._stalled_error(ex, probe_s))
                self._abandon(ex)
                raise ex.error
        finally:
            ex.settled.set()
            with self._registry:
                self._exchanges.pop(ex.seq, None)
        return out

    # ---- the link to the right neighbour -----------------------------------------------------

    def _link_requests(self):
        """The link's request stream: every all-reduce's outgoing chunks, in call order, until
        the exchange closes. Runs on gRPC's request-consumer thread."""
        seq = 0
        while True:
            with self._registry:
                self._registry.wait_for(
                    lambda: seq in self._exchanges or self._state is GroupState.CLOSED)
                ex = self._exchanges.get(seq)
            if ex is None:
                # Closed, and only then: a spent group keeps its links open until its rank
                # closes, so that no neighbour takes it for a lost one. The goodbye tells the
                # right neighbour this is an orderly end, not a broken link.
                yield wire.encode(seq, 0, 0, wire.FLOAT32, goodbye=True,
                                  reason=self._closing_reason())
                return
            c = ex.plan.chunks_per_segment
            for i in range(ex.plan.messages):
                # Message i forwards what incoming message i - C completed.
                if i >= c and not ex.wait(lambda: ex.received > i - c, ex.deadline):
                    # Keep the stream open until the peers have been told why (Abort): ended
                    # early, it would make the right neighbour blame this rank.
                    ex.settled.wait(timeout=max(0.0, ex.deadline - time.monotonic()) + 1.0)
                    return
                yield ex.encode_outgoing(i)
            seq += 1

    def _read_replies(self) -> None:
        """The right neighbour's reply per applied all-reduce. (A message gRPC has accepted is not
        yet delivered: only this reply says our part is done and the process may exit.)"""
        try:
            for reply in self._link:
                with self._registry:
                    ex = self._exchanges.get(reply.seq)
                if ex is not None:
                    ex.mark_sent()
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.CANCELLED and self._state is not GroupState.READY:
                return  # we cancelled it: closing, or abandoning a failed all-reduce
            if self._right_closed:
                right = self._name((self.rank + 1) % self.size)
                # A spent group's neighbour says what spent it: that is the cause to report.
                cause = (self._right_reason
                         or f"{right} closed its exchange (seen by rank {self.rank})")
                self.link_lost(PeerLostError(cause), incoming=False, broken=False)
            else:
                self.link_lost(self._send_error(err), incoming=False)

    def link_lost(self, error: HerdError, incoming: bool, broken: bool = True) -> None:
        """A link ended: the one from the left (``incoming``) or the one to the right.

        An all-reduce in flight that still needs it fails, and its caller tells the peers why.
        One that does not is left to finish: a neighbour that finished the last all-reduce and
        closed its exchange ends its links at once. Either way the group is spent, so the next
        call fails at once. A link ``broken`` between all-reduces (no goodbye or Bye: its rank
        died) is news to every peer, who would otherwise hear it second-hand, from a neighbour
        that closed because of it, or at their deadline: this rank tells them, as it would for a
        failed all-reduce.
        """
        with self._registry:
            if self._state is GroupState.CLOSED:
                return
            waiting = [ex for ex in self._exchanges.values()
                       if (ex.received < ex.plan.messages if incoming else not ex.sent)]
            for ex in waiting:
                ex.fail(error)
            # With an all-reduce failing, its caller spends the group (_abandon); without one,
            # only a ready group changes here: a later, quieter end must not look announced.
            first = not waiting and self._state is GroupState.READY
            if first:
                self._advance(GroupState.SPENT_ANNOUNCED if broken else GroupState.SPENT, error)
            self._registry.notify_all()
        if first:
            self._log.info("exchange_link_ended", error=error.message)
            if broken:
                self._tell_peers(self._seq, error, wait=False)

    def _abandon(self, ex: Exchange) -> None:
        """Mark the group spent and tell every peer why, then drop our link."""
        with self._registry:
            first = self._advance(GroupState.SPENT_ANNOUNCED, ex.error)
        self._log.warning("exchange_failed", seq=ex.seq, error=ex.error.message,
                          received=ex.received, messages=ex.plan.messages, first=first)
        # Before cancelling our link, even when another rank saw the failure first: the right
        # neighbour may see our cancel before that rank's Abort, and would blame us.
        self._tell_peers(ex.seq, ex.error, wait=True, by=ex.deadline)
        self._link.cancel()

    def _advance(self, to: GroupState, error: HerdError | None = None) -> bool:
        """The group's one transition: its state only moves forward, so a later, lesser event
        never undoes an earlier one (an Abort after close, a quiet end after an announced one).
        The error that first spends the group is its cause. Caller holds ``_registry``. Returns
        True when this call spent a ready group."""
        first = self._state is GroupState.READY and to is not GroupState.READY
        if first and to is not GroupState.CLOSED:
            self._error = error
        self._state = max(self._state, to)
        return first and to is not GroupState.CLOSED

    def _reserve_s(self) -> float:
        """What an all-reduce keeps, before its deadline, for telling the peers why it failed."""
        return min(0.5, 0.05 * self.timeout_s)

    def _tell_peers(self, seq: int, error: HerdError, wait: bool,
                    by: float | None = None) -> None:
        """Abort every peer with ``error``; best effort. Each call has up to TELL_S, or the
        time left before ``by`` (an all-reduce's deadline) and at least the reserve: a rank
        found stalled near its deadline still raises about on time."""
        request = pb.AbortRequest(rank=self.rank, seq=seq, reason=error.message)
        budget = TELL_S if by is None else max(
            self._reserve_s(), min(TELL_S, by - time.monotonic()))
        calls = []
        for channel in list(self._channels.values()):
            try:
                calls.append(unary(channel, "Abort").future(request, timeout=budget))
            except ValueError:
                pass  # that channel was closed: we are closing too
        self._told += calls  # grpcio cancels a call whose future is garbage-collected
        for told in calls if wait else ():
            try:
                told.result()
            except (grpc.RpcError, grpc.FutureCancelledError):
                pass  # that peer is gone or stalled, and finds out by itself

    def _name(self, rank: int) -> str:
        return peer_name(self.peers, rank)

    def _send_error(self, err: grpc.RpcError) -> HerdError:
        right = self._name((self.rank + 1) % self.size)
        code, details = err.code(), err.details()
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            return AuthError(f"{right} refused rank {self.rank}'s credential: {details}",
                             hint=CREDENTIAL_HINT)
        if code == grpc.StatusCode.ABORTED:  # the neighbour reports a failure it saw
            return PeerLostError(details)
        return PeerLostError(f"lost {right} (seen by rank {self.rank}): {code.name}: {details}",
                             hint="the rank process died or its machine dropped off the network")

    def _stalled_error(self, ex: Exchange, probe_s: float) -> PeerLostError:
        silent = probe(self._channels, self.rank, self.size, probe_s)
        hint = ("a stalled rank (stopped, swapping, or overloaded) holds up the whole ring; "
                "raise cluster.exchange_timeout_s if buffers are huge for the network")
        if silent:
            names = ", ".join(self._name(r) for r in silent)
            return PeerLostError(f"{names} stopped answering: all-reduce #{ex.seq} got no further "
                                 f"in {self.timeout_s:g}s (seen by rank {self.rank})", hint=hint)
        waiting = (self.rank - 1) % self.size if ex.received < ex.plan.messages else (
            (self.rank + 1) % self.size)
        return PeerLostError(f"all-reduce #{ex.seq} did not finish within {self.timeout_s:g}s on "
                             f"rank {self.rank}: waiting on {self._name(waiting)} "
                             f"({ex.received}/{ex.plan.messages} chunks in)", hint=hint)

    # ---- what the server half reports (worker/exchange/grpc/server.py) ----------------------

    def aborted_by_peer(self, rank: int, seq: int, reason: str) -> None:
        """A peer's Abort: the group is spent, and all-reduce ``seq`` and later ones fail."""
        error = PeerLostError(reason)
        with self._registry:
            if self._advance(GroupState.SPENT_ANNOUNCED, error):  # the sender tells every peer
                self._log.warning("exchange_aborted_by_peer", by=rank, seq=seq, reason=reason)
            for ex in self._exchanges.values():
                if ex.seq >= seq:  # an earlier all-reduce may still finish
                    ex.fail(error)
            self._registry.notify_all()

    def said_bye(self, rank: int, reason: str) -> None:
        """A neighbour is closing its exchange; the right one's end of our link is then orderly.
        ``reason``: why its group was spent, if it was (the cause to report, not its close)."""
        if rank == (self.rank + 1) % self.size:
            self._right_reason = reason
            self._right_closed = True

    def _closing_reason(self) -> str:
        """What this rank's Bye and goodbye say: the cause that spent its group, if one did. A
        neighbour that hears of the cause only from our close (its Abort lost or late) then
        names the real culprit, not us."""
        return self._error.message if self._error is not None else ""

    def exchange_for(self, seq: int) -> Exchange | str:
        """The local all-reduce ``seq`` (the left neighbour may start before this rank does), or
        why there is none."""
        with self._registry:
            self._registry.wait_for(
                lambda: seq in self._exchanges or self._state is not GroupState.READY
                or seq < self._seq,
                timeout=self.timeout_s,
            )
            ex = self._exchanges.get(seq)
            state, error = self._state, self._error
        if ex is not None:
            return ex
        me = self._name(self.rank)
        if error is not None:  # what spent the group, before our close that followed it
            return error.message
        if state is GroupState.CLOSED:
            return f"{me} closed its exchange before all-reduce #{seq}"
        return f"{me} did not start all-reduce #{seq} within {self.timeout_s:g}s"

    # ---- shutdown ----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop serving and drop the channels; idempotent. In-flight all-reduces fail."""
        with self._registry:
            if self._state is GroupState.CLOSED:  # under the lock: the exit hook may race
                return  # another closer
            self._advance(GroupState.CLOSED)
            for ex in self._exchanges.values():
                ex.fail(PeerLostError(f"the grpc exchange of rank {self.rank} was closed"))
            self._registry.notify_all()  # the link's request stream ends: a half-close
        if self._replies is not None:
            # The left neighbour's link to us ends with our server: say it is orderly first.
            # (In a cable ring it is out of reach: its own stream to us ending tells it.)
            if (left := self._channels.get((self.rank - 1) % self.size)) is not None:
                try:
                    unary(left, "Bye")(pb.ByeRequest(rank=self.rank,
                                                     reason=self._closing_reason()),
                                       timeout=min(TELL_S, self.timeout_s))
                except grpc.RpcError:
                    pass  # best effort: that neighbour is gone, or finds out by itself
            # The right neighbour ends our link once it sees the goodbye; bounded, for a
            # neighbour that is gone.
            self._replies.join(timeout=1.0)
            self._link.cancel()
        if self._server is not None:
            # A short grace: the left neighbour may still be waiting for our reply to its stream.
            self._server.stop(grace=1.0).wait(timeout=2.0)
            self._pool.shutdown(wait=False, cancel_futures=True)
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()

    def __enter__(self) -> "GrpcExchange":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

