"""What a worker may read and write in the coordinator's stores.

Read (GetBlob): only what its current attempt needs, the uploaded files (dataset, resume
adapter) of an active job it runs a rank of and the files of that job's stored model
(PrepareRank fetches them). A client (the laptop) is not held to this; it may read any blob it
could upload.

Write (PutCheckpoint): only the rank that saves a checkpoint uploads it, and only a checkpoint of
a size the job's adapter could have. (Outside runs: a non-zero rank replaced a stored step; one
header declaring a 1 PB file failed the job for good as "disk full".)"""

from __future__ import annotations

from typing import Iterable

from coordinator import planner
from coordinator.domain import Job
from coordinator.models import ModelStore
from coordinator.store import Attempt
from herd.errors import AuthError, HerdError, ProtocolError
from herd.stage_cut import StagePiece

# A checkpoint holds the adapter, the optimizer state and small files (trainer state, manifest):
# an upload declaring more than this many times the planner's estimate of the first two, plus
# SLACK_BYTES, is no checkpoint of the job.
SIZE_MARGIN = 4
SLACK_BYTES = 64 * 2**20


def check_worker_may_read(jobs: Iterable[Job], models: ModelStore, worker_id: str,
                          sha: str) -> None:
    for job in jobs:
        if not job.state.active or worker_id not in job.worker_ids:
            continue
        if sha in job.blobs():
            return
        model = models.get(job.model_digest) if job.model_digest else None
        if model is not None and any(f.sha256 == sha for f in model.files):
            return
    raise AuthError(f"worker {worker_id} runs no job with blob {sha[:12]}")


def check_uploader(job: Job, worker_id: str, attempts: list[Attempt],
                   piece: StagePiece | None) -> None:
    """Rank 0 uploads a data-parallel job's checkpoints; in a pipeline, replica 0's stage i runs
    on rank i and uploads that stage's piece (worker/pipeline/topology.py, worker/agent/relay.py).
    Another worker of the job is refused, and so is a piece of a layout the running attempt does
    not have (rank 1 of a data-parallel job stored "stage 1" pieces: an outside run)."""
    stages = next((a.stages for a in attempts if a.attempt == job.attempt), 0)  # 0: unknown
    if stages and (piece.count if piece is not None else 1) != stages:
        runs = "data parallel" if stages == 1 else f"in {stages} pipeline stages"
        sent = "a whole checkpoint" if piece is None else f"a piece of {piece.count} stages"
        raise AuthError(f"attempt {job.attempt} of job {job.job_id} runs {runs}; worker "
                        f"{worker_id} sent {sent}")
    rank = 0 if piece is None else piece.index
    stage = None if piece is None else piece.index
    if not 0 <= rank < len(job.worker_ids) or job.worker_ids[rank] != worker_id:
        what = "checkpoints" if stage is None else f"stage {stage}'s checkpoint pieces"
        raise AuthError(f"worker {worker_id} does not upload job {job.job_id}'s {what}: rank "
                        f"{rank} does")


def check_upload_size(job: Job, declared: int, model_config: dict | None) -> None:
    """A declared size the job's checkpoint could not have is refused as a broken upload (the
    uploader is told; the job is not failed as if the coordinator's disk were full). Unknown
    (no config.json at hand, or a full fine-tune): not bounded here."""
    if model_config is None or job.config.fine_tune_type == "full":
        return
    try:
        est = planner.estimate_memory(model_config, job.config)
    except (HerdError, KeyError, ValueError, TypeError, ArithmeticError):
        return  # a config.json the planner cannot read: its own refusals say why
    bound = SIZE_MARGIN * (est.lora + est.optimizer) + SLACK_BYTES
    if declared > bound:
        raise ProtocolError(f"a checkpoint of job {job.job_id} declares {declared} bytes; its "
                            f"adapter and optimizer state come to ~{est.lora + est.optimizer} "
                            f"(at most {bound} accepted)")
