"""How pipeline stages reach each other: point-to-point on one MLX ring.

MLX's ring backend has no ``Group.split`` and its send/recv reach ring neighbours only; the
topology below lays data x pipeline out so that every hop it needs is a ring hop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import mlx.core as mx

from herd.errors import ConfigError


class Link(Protocol):
    """Point-to-point transport between neighbouring stages (no autodiff through it)."""

    seconds: float  # time spent inside send/recv, for the benchmark

    def send(self, x: mx.array, dst: int) -> None: ...
    def recv(self, shape: tuple[int, ...], dtype: mx.Dtype, src: int) -> mx.array: ...


@dataclass(frozen=True)
class Topology:
    """Where a rank sits in data x pipeline on one MLX ring, whose send/recv reach neighbours only.

    Replica 0 runs stages 0..S-1 on ranks 0..S-1; replica 1 runs them on ranks 2S-1..S (reversed),
    so every pipeline hop is a ring hop, and for S <= 2 so is every data-parallel pair (rank r and
    2S-1-r). Wider layouts need a transport that reaches any peer (herd's gRPC); refused here."""

    replica: int
    replicas: int
    stage: int
    stages: int
    stage_ranks: tuple[int, ...]  # group rank of each stage of this rank's replica
    dp_peer: int | None  # group rank of the same stage in the other replica

    @classmethod
    def of(cls, rank: int, world: int, replicas: int) -> "Topology":
        if replicas not in (1, 2) or world % replicas:
            raise ConfigError(
                f"{replicas} data-parallel pipelines on {world} ranks: the MLX ring carries 1 or 2",
                hint="use cluster.parallelism.data 1 or 2 (more needs the gRPC transport)",
            )
        stages = world // replicas
        ranks0 = tuple(range(stages))
        ranks1 = tuple(range(2 * stages - 1, stages - 1, -1))
        replica = 0 if rank < stages else 1
        ranks = ranks0 if replica == 0 else ranks1
        stage = ranks.index(rank)
        peer = None
        if replicas == 2:
            peer = (ranks1 if replica == 0 else ranks0)[stage]
            if abs(peer - rank) != 1 and {peer, rank} != {0, world - 1}:
                raise ConfigError(
                    f"2 x {stages} (data x pipeline): stage {stage}'s replicas are not ring neighbours",
                    hint="on the MLX ring use 2 x 1 or 2 x 2; wider layouts need the gRPC transport",
                )
        return cls(replica, replicas, stage, stages, ranks, peer)


class MLXLink:
    """MLX ring send/recv between stages (addressed by stage index) and to the data-parallel peer."""

    def __init__(self, group: mx.distributed.Group, topology: Topology):
        self.group, self.topo, self.seconds = group, topology, 0.0

    def send(self, x: mx.array, dst: int) -> None:
        mx.eval(x)  # compute first, so the timer measures the transfer only
        tic = time.perf_counter()
        mx.eval(mx.distributed.send(x, self.topo.stage_ranks[dst], group=self.group))
        self.seconds += time.perf_counter() - tic

    def recv(self, shape, dtype, src: int) -> mx.array:
        tic = time.perf_counter()
        y = mx.distributed.recv(shape, dtype, self.topo.stage_ranks[src], group=self.group)
        mx.eval(y)
        self.seconds += time.perf_counter() - tic
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
