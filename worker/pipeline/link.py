"""How pipeline stages reach each other: point-to-point on one MLX ring.

MLX's ring backend has no ``Group.split`` and its send/recv reach ring neighbours only; the
topology (worker/pipeline/topology.py) lays data x pipeline out so that every hop it needs is a
ring hop.
"""

from __future__ import annotations

import time
from typing import Protocol

import mlx.core as mx

from worker.pipeline.topology import Topology


class Link(Protocol):
    """Point-to-point transport between neighbouring stages (no autodiff through it), and a sum over
    every rank (the finiteness check)."""

    seconds: float  # time spent inside send/recv: the transfers and the waits for a neighbour
    sent_bytes: int  # activations and cotangents sent to other stages

    def send(self, x: mx.array, dst: int) -> None: ...
    def recv(self, shape: tuple[int, ...], dtype: mx.Dtype, src: int) -> mx.array: ...
    def sum_all(self, x: mx.array) -> mx.array: ...


class MLXLink:
    """MLX ring send/recv between stages (addressed by stage index) and to the data-parallel
    peer."""

    def __init__(self, group: mx.distributed.Group, topology: Topology):
        self.group, self.topo, self.seconds, self.sent_bytes = group, topology, 0.0, 0

    def send(self, x: mx.array, dst: int) -> None:
        mx.eval(x)  # compute first, so the timer measures the transfer only
        tic = time.perf_counter()
        mx.eval(mx.distributed.send(x, self.topo.stage_ranks[dst], group=self.group))
        self.seconds += time.perf_counter() - tic
        self.sent_bytes += x.nbytes

    def recv(self, shape, dtype, src: int) -> mx.array:
        tic = time.perf_counter()
        y = mx.distributed.recv(shape, dtype, self.topo.stage_ranks[src], group=self.group)
        mx.eval(y)
        self.seconds += time.perf_counter() - tic
        return y

    def sum_all(self, x: mx.array) -> mx.array:
        """x summed over every rank of the job (every stage of every pipeline)."""
        y = mx.distributed.all_sum(x, group=self.group)
        mx.eval(y)
        return y

    def sum_with_peer(self, x: mx.array) -> mx.array:
        """x + the peer's x, added in replica order so both get the same bits. The lower rank
        sends first: blocking sends in opposite directions never wait on each other."""
        peer = self.topo.dp_peer
        mx.eval(x)
        if self.group.rank() < peer:
            mx.eval(mx.distributed.send(x, peer, group=self.group))
            other = mx.distributed.recv(x.shape, x.dtype, peer, group=self.group)
        else:
            other = mx.distributed.recv(x.shape, x.dtype, peer, group=self.group)
            mx.eval(other)
            mx.eval(mx.distributed.send(x, peer, group=self.group))
        mine_first = self.topo.replica == 0
        out = x + other if mine_first else other + x
        mx.eval(out)
        return out


class WatchedLink:
    """A link whose every transfer is a heartbeat (worker/rank/heartbeat.py), so the agent's
    watchdog bounds a stage's sends and receives as it bounds a data-parallel all-reduce: MLX's
    send/recv have no deadline either."""

    def __init__(self, inner: MLXLink, heartbeat):
        self.inner, self.heartbeat = inner, heartbeat

    def __getattr__(self, name):  # topo, group, seconds: the inner link's
        return getattr(self.inner, name)

    def _watched(self, what: str, fn, *args):
        self.heartbeat.enter(what)
        try:
            return fn(*args)
        finally:
            self.heartbeat.leave(what)

    def send(self, x: mx.array, dst: int) -> None:
        self._watched("send", self.inner.send, x, dst)

    def recv(self, shape, dtype, src: int) -> mx.array:
        return self._watched("recv", self.inner.recv, shape, dtype, src)

    def sum_with_peer(self, x: mx.array) -> mx.array:
        return self._watched("all_sum", self.inner.sum_with_peer, x)

    def sum_all(self, x: mx.array) -> mx.array:
        return self._watched("all_sum", self.inner.sum_all, x)
