"""Bringing an attempt's ranks up: one launch per rank (``launches``); every rank's model onto its
worker first (PrepareRank, each worker's progress handed on as it comes), then every rank started
together, so the MLX ring forms with all its members ready (a ring waits only ~30 s for them) and
no rank waits on another's download. And down again (``stop_ranks``)."""

from __future__ import annotations

import threading
from concurrent.futures import Executor
from dataclasses import replace
from typing import Callable, Protocol

from coordinator.backend import Backend
from coordinator.domain import FetchProgress, Job, ModelSource, RankLaunch, WorkerRecord
from coordinator.placement import Placement
from coordinator.planner.network import CONTROL, DataPath
from herd import jaccl, log
from herd.config import JobConfig, with_cluster
from herd.errors import HerdError
from herd.netif import hostport

logger = log.get(__name__)


class ModelInfo(Protocol):  # what the scheduler asks about a job's model (ModelCatalog)
    def config(self, job: Job) -> dict | None: ...
    def source(self, job: Job) -> ModelSource: ...


def launches(job: Job, placement: Placement, workers: dict[str, WorkerRecord],
             resume_step: int = 0, model: ModelSource | None = None) -> list[RankLaunch]:
    """One launch per rank, with the MLX ring hostfile and exchange peers in rank order (for a
    pipeline, the placement's ring order), for a pipeline every stage's blocks, and where the
    workers get the model."""
    chosen = [workers[w] for w in placement.worker_ids]
    path = placement.path or DataPath("ring", [w.host for w in chosen], CONTROL)
    peers = [hostport(a, w.exchange_port) for a, w in zip(path.addresses, chosen)]
    ring = [hostport(a, w.ring_port) for a, w in zip(path.addresses, chosen)]
    extra = {}
    if path.kind == "jaccl":  # rank 0's ring port is free: JACCL's side channel takes it
        extra = dict(ibv_devices_json=jaccl.devices_json(path.rdma),
                     jaccl_coordinator=hostport(chosen[0].host, chosen[0].ring_port))
    stages = tuple(tuple(s) for s in placement.stage_layers)
    job = replace(job, config=planned_config(job.config, placement))
    return [RankLaunch(job, r, w, ring if path.kind == "ring" else [], peers, resume_step, stages,
                       placement.data_parallel, path.kind, **extra, model=model or ModelSource(),
                       neighbors_only=path.neighbors_only)
            for r, w in enumerate(chosen)]


def planned_config(cfg: JobConfig, placement: Placement) -> JobConfig:
    """The config the ranks get; the stored job keeps the user's. A job shrunk to fewer workers
    (coordinator/elastic.py) says the workers it runs on: max_shares are checked against them (a
    shrunk job on Macs of different memory failed that check after it was PLACING, and stayed
    there: a review); a user's max_shares of the old rank count are dropped. Where the planner
    capped each rank's share by its memory (coordinator/planner/layout.py): cluster.max_shares,
    the lower of the planner's and the user's own where both are set and still cover the batch."""
    ranks, changes = len(placement.worker_ids), {}
    mine = cfg.cluster.max_shares
    if cfg.cluster.workers and ranks != cfg.cluster.workers:
        changes["workers"] = ranks
        if mine and len(mine) != placement.data_parallel:
            mine = changes["max_shares"] = None
    if caps := placement.max_shares:
        if mine and len(mine) == len(caps):
            lower = [min(a, b) for a, b in zip(mine, caps)]
            caps = tuple(lower) if sum(lower) >= cfg.batch_size else caps
        changes["max_shares"] = list(caps)
    return with_cluster(cfg, "the planned config", **changes) if changes else cfg


def bring_up(pool: Executor, backend: Backend, plan: list[RankLaunch],
             on_fetch: Callable[[RankLaunch, FetchProgress], bool]) -> list[HerdError | None]:
    """Per launch, None or the error it failed with (while preparing or starting). ``on_fetch``
    records a worker's progress; its False stops that fetch (the attempt is over). A backend without
    ``prepare_rank`` (Ray: its actor's Worker.start_rank prepares the model) only starts."""
    prepare_rank = getattr(backend, "prepare_rank", None)  # (absent in a test double: None)
    refused = threading.Event()  # one worker cannot prepare: the others stop fetching

    def prepare(launch: RankLaunch) -> HerdError | None:
        # (A worker short of disk refused before its own fetch, while the others went on
        # pulling their shards, tens of GB for a 70B, for an attempt that had failed: an
        # outside run. Their next progress report now ends their fetch.)
        err = _call(prepare_rank, launch,
                    lambda fetch: on_fetch(launch, fetch) and not refused.is_set())
        if err is not None:
            refused.set()
        return err

    results = list(pool.map(prepare, plan)) if prepare_rank is not None else [None] * len(plan)
    if not any(results):
        results = list(pool.map(lambda launch: _call(backend.start_rank, launch), plan))
    return results


def _call(fn, *args) -> HerdError | None:
    try:
        fn(*args)
        return None
    except HerdError as e:
        return e


def stop_ranks(pool: Executor, backend: Backend, job: Job) -> None:
    """Stops the attempt's ranks now (a worker that does not answer: Reconciler.stop_stale)."""
    workers = {w.worker_id: w for w in backend.workers()}
    targets = [workers[w] for w in job.worker_ids if w in workers]
    for fut in [pool.submit(backend.stop_job, w, job) for w in targets]:
        try:
            fut.result(timeout=15)
        except Exception as e:
            logger.warning("stop_rank_failed", job_id=job.job_id, error=str(e))
