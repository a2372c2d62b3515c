"""Elastic on a permanent loss: a data-parallel job that lost a worker for longer than a grace
period carries on with the workers left, and grows back at a checkpoint once workers return.

The global batch never changes: k ranks split the batch_size examples of every step, and
the gradients are summed with each rank's loss divided by the whole step's target count
(worker/rank/trainer.py), so k ranks give the update of one process with the same global batch,
whatever k (to float rounding: tests/conftest.py SAME_UPDATE). Checkpoints carry no world size
that resuming depends on. A data x pipeline job shrinks by whole replicas, each stage keeping
its blocks (the cut its checkpoint was written in: recovery.kept_cut); a single pipeline, and
jobs that pin their data parallelism, keep waiting for their workers: their layout is the user's.

A part of the Scheduler (coordinator/scheduler.py), kept apart by concern: it calls the
scheduler's own state changes, under its lock.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from coordinator.domain import Job, JobState, WorkerRecord
from coordinator.placement import (
    Placement,
    mark_held,
    place,
    policy_refusal,
    stages_of,
    workers_needed,
)
from herd import log
from herd.config import JobConfig
from herd.errors import PlacementError

if TYPE_CHECKING:
    from coordinator.scheduler import Scheduler

logger = log.get(__name__)


def _with_workers(cfg: JobConfig, k: int) -> JobConfig:
    return cfg.model_copy(update={"cluster": cfg.cluster.model_copy(update={"workers": k})})


def elastic(cfg: JobConfig) -> bool:  # (Ray reserves its own bundles: not resized here)
    return cfg.cluster.data_parallel() is None and cfg.cluster.backend == "zeroconf"


def shrink_placement(cfg: JobConfig, workers: list[WorkerRecord], model_config: dict | None = None,
                     cut: tuple | None = None) -> Placement | None:
    """The most ranks, fewer than asked, that the idle workers hold with the same global batch
    and the same stages (``cut``: the layout the job's checkpoint keeps), in whole replicas
    (split evenly only where the job needs it: herd.config ``uneven_split_why_not``); None when
    none do, or when a single pipeline would have to lose a stage."""
    idle = [w for w in workers if not w.running_job_id]
    stages = stages_of(cfg, cut)
    for k in range(min(workers_needed(cfg) - 1, len(idle)), 0, -1):
        dp = k // stages
        if k % stages or dp > cfg.batch_size or (
                cfg.batch_size % dp and cfg.cluster.uneven_split_why_not(stages)):
            continue
        try:
            placement = place(_with_workers(cfg, k), idle, model_config, cut=cut)
        except PlacementError:
            continue
        if placement.pipeline_stages == stages:
            return placement
    return None


def grow_placement(cfg: JobConfig, current: list[WorkerRecord], free: list[WorkerRecord],
                   model_config: dict | None = None, cut: tuple | None = None
                   ) -> Placement | None:
    """The job's full placement on its current workers and idle free ones, if it fits now (its
    stages kept)."""
    mine = [replace(w, running_job_id="", running_attempt=0) for w in current]
    try:
        placement = place(cfg, mine + [w for w in free if not w.running_job_id], model_config,
                          cut=cut)
    except PlacementError:
        return None
    return placement if placement.pipeline_stages == stages_of(cfg, cut) else None


class Elastic:
    def __init__(self, scheduler: "Scheduler", grace_s: float):
        self.s, self.grace_s = scheduler, grace_s

    def _model_config(self, job: Job) -> dict | None:
        return self.s._models.config(job) if self.s._models else None

    def shrink(self, job: Job, workers: list[WorkerRecord],
               cut: tuple | None = None) -> tuple[Placement, str] | None:
        """For a restarting job that has waited past the grace period for its workers: the
        placement on fewer, and why (for its PLACING message). ``cut``: the layout its
        checkpoint keeps. Caller holds the lock."""
        attempt, gone_ms = self.s.reconcile.gone_since.get(job.job_id, (0, job.updated_ms))
        since = min(job.updated_ms, gone_ms) if attempt == job.attempt else job.updated_ms
        waited_s = (self.s.now_ms() - since) / 1000
        if (not self.grace_s or job.state is not JobState.RESTARTING or waited_s < self.grace_s
                or not elastic(job.config)):
            return None
        # (only on workers that would run it, as decide_queued places: coordinator/refusals.py)
        refused = self.s.refusals.of(job.job_id)
        placement = shrink_placement(job.config, [w for w in workers if not policy_refusal(job, w)
                                                  and w.worker_id not in refused],
                                     self._model_config(job), cut)
        if placement is None:
            return None
        k, n = len(placement.worker_ids), workers_needed(job.config)
        logger.info("job_shrunk", job_id=job.job_id, workers=k, asked=n)
        over = (f"{placement.data_parallel} replicas of {placement.pipeline_stages} stages"
                if placement.stage_layers else f"{k} ranks")
        return placement, (f"; shrunk to {k} of {n} workers after waiting {waited_s:.0f}s for "
                           f"the rest (the same global batch of {job.config.batch_size}, over "
                           f"{over}); it grows back at a checkpoint once workers return")

    def on_checkpoint(self, job_id: str, step: int) -> None:
        """A shrunk job grows back at this checkpoint when enough workers are free again."""
        s = self.s
        with s._lock:
            job = s.store.get_job(job_id)
            n = workers_needed(job.config)
            if (job.state is not JobState.RUNNING or len(job.worker_ids) >= n
                    or step >= job.config.last_step() or not elastic(job.config)):
                return
            workers = {w.worker_id: w for w in s.workers()}
            current = [workers[w] for w in job.worker_ids if w in workers]
            free = [w for w in mark_held(s.backend(job).workers(), s.store.list_jobs())
                    if w.worker_id not in job.worker_ids and not policy_refusal(job, w)
                    and w.worker_id not in s.refusals.of(job.job_id)]
            cut = s._cut_of(job_id, step)  # (the layout this checkpoint was written in)
            grown = grow_placement(job.config, current, free, self._model_config(job), cut)
            # Only onto more workers: a job the planner placed on fewer than it asked for (one
            # worker's memory too small) restarted onto the same ones at every checkpoint (an
            # outside run).
            if grown is None or len(grown.worker_ids) <= len(job.worker_ids):
                return
            s.reconcile.forget(job_id)
            s._not_before.pop(job_id, None)
            s._set_state(job, JobState.RESTARTING,
                         f"growing back to {len(grown.worker_ids)} workers from checkpoint {step}: "
                         "enough are free again", outcome="grown")
            logger.info("job_growing", job_id=job_id, workers=len(grown.worker_ids), step=step)
        s._stop_ranks(job)
