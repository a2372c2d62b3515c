"""Where a rank sits in data x pipeline, and which piece of a checkpoint it owns.

Pure arithmetic, no MLX: the rank lays its links out with it, and the agent (which imports no
MLX) uses it to tag a stage's checkpoint upload and to check the piece a stage resumes from.
"""

from __future__ import annotations

from dataclasses import dataclass

from herd.errors import ConfigError, PlacementError
from herd.stage_cut import StagePiece


@dataclass(frozen=True)
class Topology:
    """Where a rank sits in data x pipeline on one MLX ring, whose send/recv reach neighbours only.

    Replica 0 runs stages 0..S-1 on ranks 0..S-1; replica 1 runs them on ranks 2S-1..S (reversed),
    so every pipeline hop is a ring hop, and for S <= 2 so is every data-parallel pair (rank r and
    2S-1-r). Wider layouts would need a transport that reaches any peer; refused here (and at
    `herd check`, herd/config.py; pipelines pass activations over the MLX ring only)."""

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
                hint="use cluster.parallelism.data 1 or 2",
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
                    f"2 x {stages} (data x pipeline): stage {stage}'s replicas are not ring "
                    "neighbours",
                    hint="on the MLX ring use 2 x 1 or 2 x 2; wider layouts need the gRPC "
                    "transport",
                )
        return cls(replica, replicas, stage, stages, ranks, peer)


def saved_piece(rank: int, world: int, data_parallel: int,
                stage_layers: tuple[tuple[int, int], ...]) -> StagePiece | None:
    """This rank's stage, when it is a stage of replica 0 (the replica that saves checkpoints)."""
    topo = Topology.of(rank, world, data_parallel)
    if topo.replica != 0:
        return None
    start, end = stage_layers[topo.stage]
    return StagePiece(index=topo.stage, count=topo.stages, start=start, end=end)


def check_same_cut(piece: StagePiece, stage_layers: tuple[tuple[int, int], ...], stage: int,
                   step: int) -> None:
    """A stage resumes only a piece of the same blocks (its optimizer state is per block)."""
    start, end = stage_layers[stage]
    if (piece.count, piece.start, piece.end) != (len(stage_layers), start, end):
        raise PlacementError(
            f"checkpoint {step} was saved by stage {piece.index} of {piece.count} with blocks "
            f"{piece.start}:{piece.end}; this attempt's stage {stage} runs blocks "
            f"{start}:{end}: a pipeline resumes only with the same cut",
            hint="restart it on workers with the same memory, or submit it again")
