"""A pipeline stage run by the herd worker agent: which stage of which replica a rank is, the tag
its checkpoints carry to the coordinator, and fetching its own piece back to resume.

Each stage of replica 0 uploads its checkpoint folder (stage-local names, optimizer state) tagged
with a ``StagePiece``; the coordinator merges a step's pieces into one mlx-lm adapter for
``herd pull`` and keeps the pieces, so a restarted stage resumes from exactly what it saved.
"""

from __future__ import annotations

from pathlib import Path

from herd.errors import ChecksumError, PlacementError
from herd.rpc.channel import TRANSFER_DEADLINE_S
from herd.rpc.files import receive_checkpoint_folder
from herd.rpc.status import rpc_errors
from protos.v1 import common_pb2, coordinator_pb2
from worker.pipeline.link import Topology


def stage_piece(rank: int, world: int, data_parallel: int,
                stage_layers: tuple[tuple[int, int], ...]) -> common_pb2.StagePiece | None:
    """This rank's stage, when it is a stage of replica 0 (the replica that saves checkpoints)."""
    topo = Topology.of(rank, world, data_parallel)
    if topo.replica != 0:
        return None
    start, end = stage_layers[topo.stage]
    return common_pb2.StagePiece(index=topo.stage, count=topo.stages,
                                 layers=common_pb2.LayerRange(start=start, end=end))


def pull_stage_piece(stub, target: str, job_id: str, step: int, stage: int,
                     folder: Path) -> common_pb2.StagePiece:
    """Stage ``stage``'s own checkpoint piece of ``step`` into ``folder``: every file
    sha256-checked, the folder renamed into place whole. Returns the piece's stage and blocks."""
    req = coordinator_pb2.GetAdapterRequest(job_id=job_id, step=step,
                                            stage=common_pb2.StagePiece(index=stage))
    with rpc_errors(target):
        header = receive_checkpoint_folder(stub.GetAdapter(req, timeout=TRANSFER_DEADLINE_S),
                                           folder, f"checkpoint {step} stage {stage}",
                                           hint="the agent fetches it again on the next attempt")
    if not header.HasField("stage"):
        raise ChecksumError(f"the coordinator sent no stage piece of checkpoint {step}")
    return header.stage


def check_same_cut(piece: common_pb2.StagePiece, stage_layers: tuple[tuple[int, int], ...],
                   stage: int, step: int) -> None:
    """A stage resumes only a piece of the same blocks (its optimizer state is per block)."""
    start, end = stage_layers[stage]
    if (piece.count, piece.layers.start, piece.layers.end) != (len(stage_layers), start, end):
        raise PlacementError(
            f"checkpoint {step} was saved by stage {piece.index} of {piece.count} with blocks "
            f"{piece.layers.start}:{piece.layers.end}; this attempt's stage {stage} runs blocks "
            f"{start}:{end}: a pipeline resumes only with the same cut",
            hint="restart it on workers with the same memory, or submit it again")
