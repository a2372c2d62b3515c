"""The job state machine and its control loop.

QUEUED -> PLACING -> RUNNING -> SUCCEEDED | FAILED | CANCELLED (domain.TRANSITIONS). Decisions
are pure functions of the job, the workers and the clock (``decide_queued``); the Scheduler
applies them, records every change as an event, and talks to workers through an injected
launcher, so tests step it with ``tick()`` and a fake clock.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Protocol

from coordinator.domain import (
    TRANSITIONS,
    Checkpoint,
    EventKind,
    Job,
    JobState,
    RankLaunch,
    RankProgress,
    WorkerRecord,
)
from coordinator.placement import Placement, check_fits, place
from coordinator.planner.network import DataPath
from coordinator.store import JobStore
from herd import jaccl, log
from herd.errors import ConfigError, HerdError, PeerLostError, PlacementError
from herd.netif import hostport

logger = log.get(__name__)


class Launcher(Protocol):
    def start_rank(self, launch: RankLaunch) -> None: ...

    def stop_job(self, worker: WorkerRecord, job_id: str) -> None: ...


# --- pure policy -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Wait:
    reason: str


@dataclass(frozen=True)
class Fail:
    reason: str


def decide_queued(job: Job, workers: list[WorkerRecord], now_ms: int,
                  placement_timeout_s: float) -> Placement | Wait | Fail:
    """What to do with a queued (or restarting) job now."""
    try:
        return place(job.config, workers)
    except PlacementError as e:
        since = job.created_ms if job.state is JobState.QUEUED else job.updated_ms
        waited_s = (now_ms - since) / 1000
        if waited_s >= placement_timeout_s:
            return Fail(f"could not be placed within {placement_timeout_s:.0f}s: {e.message}")
        return Wait(e.message)
    except HerdError as e:
        return Fail(e.message)


def launches(job: Job, placement: Placement, workers: dict[str, WorkerRecord],
             resume_step: int = 0) -> list[RankLaunch]:
    """One launch per rank, with the MLX ring hostfile and exchange peers in rank order (for a
    pipeline, the placement's ring order) and, for a pipeline, every stage's blocks."""
    chosen = [workers[w] for w in placement.worker_ids]
    path = placement.path or DataPath("ring", [w.host for w in chosen], "control network")
    peers = [hostport(a, w.exchange_port) for a, w in zip(path.addresses, chosen)]
    ring = [hostport(a, w.ring_port) for a, w in zip(path.addresses, chosen)]
    extra = {}
    if path.kind == "jaccl":  # rank 0's ring port is free: JACCL's side channel takes it
        extra = dict(ibv_devices_json=jaccl.devices_json(path.rdma),
                     jaccl_coordinator=hostport(chosen[0].host, chosen[0].ring_port))
    stages = tuple(tuple(s) for s in placement.stage_layers)
    return [RankLaunch(job, r, w, ring if path.kind == "ring" else [], peers, resume_step, stages,
                       placement.data_parallel, path.kind, **extra)
            for r, w in enumerate(chosen)]


# A rank killed by a signal, a lost peer (PeerLostError's exit code) or a lost worker is worth
# another attempt; a rank that failed on its own (bad config, bad data) would fail again.
RETRYABLE_EXIT_CODES = {PeerLostError.exit_code}


def should_restart(job: Job, max_restarts: int, exit_code: int | None) -> bool:
    """``exit_code`` None: the worker itself was lost."""
    retryable = exit_code is None or exit_code < 0 or exit_code in RETRYABLE_EXIT_CODES
    return retryable and job.attempt <= max_restarts


def _cut(spans) -> str:
    return ",".join(f"{a}:{b}" for a, b in spans)


def check_transition(job: Job, to: JobState) -> None:
    if to not in TRANSITIONS[job.state]:
        raise ValueError(f"job {job.job_id}: {job.state.value} -> {to.value} is not allowed")


# --- the scheduler -----------------------------------------------------------------------------

class Scheduler:
    def __init__(self, store: JobStore, workers: Callable[[], list[WorkerRecord]],
                 launcher: Launcher, clock: Callable[[], float] = time.time,
                 placement_timeout_s: float = 600.0):
        self.store = store
        self._workers = workers
        self._launcher = launcher
        self._clock = clock
        self.placement_timeout_s = placement_timeout_s
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._finished_ranks: dict[tuple[str, int], set[int]] = {}
        self._idle_since: dict[tuple[str, str], int] = {}
        self.lost_rank_grace_s = 20.0
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="launch")

    def now_ms(self) -> int:
        return int(self._clock() * 1000)

    # --- recording -------------------------------------------------------------------------

    def _event(self, job: Job, kind: EventKind, **kw) -> None:
        self.store.add_event(job.job_id, self.now_ms(), kind, **kw)
        self._changed.notify_all()

    def _set_state(self, job: Job, to: JobState, message: str = "") -> None:
        check_transition(job, to)
        job.state, job.message, job.updated_ms = to, message, self.now_ms()
        self.store.put_job(job)
        if (to.final or to is JobState.RESTARTING) and job.attempt:
            self.store.end_attempt(job.job_id, job.attempt, to.value, job.updated_ms)
        self._event(job, EventKind.STATE, state=to, message=message)
        logger.info("job_state", job_id=job.job_id, state=to.value, message=message)

    def _attempt_failed(self, job: Job, reason: str, exit_code: int | None) -> None:
        """Restart from the last checkpoint when the policy allows, else fail. Caller holds the
        lock and stops the attempt's ranks afterwards."""
        max_restarts = job.config.cluster.max_restarts
        self._idle_since = {k: v for k, v in self._idle_since.items() if k[0] != job.job_id}
        if should_restart(job, max_restarts, exit_code):
            ckpts = self.store.checkpoints(job.job_id)
            start = f"from checkpoint {ckpts[-1].step}" if ckpts else "from the start"
            self._set_state(job, JobState.RESTARTING,
                            f"attempt {job.attempt} failed: {reason}; restarting {start}")
        else:
            tried = f" (attempt {job.attempt})" if job.attempt > 1 else ""
            self._set_state(job, JobState.FAILED, reason + tried)

    # --- entry points ----------------------------------------------------------------------

    def submit(self, job: Job) -> Job:
        cfg = job.config
        if cfg.cluster.backend != "zeroconf":  # never silently place on other workers than asked
            raise ConfigError(
                f"cluster.backend = {cfg.cluster.backend!r} is not available in this version",
                hint="use cluster.backend: zeroconf (workers found by mDNS and verified by secret)")
        # Refused now, with numbers and fixes, if no worker set at hand could ever hold it.
        check_fits(cfg, self._workers())
        with self._lock:
            job.created_ms = job.updated_ms = self.now_ms()
            job.state = JobState.QUEUED
            self.store.put_job(job)
            self._event(job, EventKind.STATE, state=JobState.QUEUED)
        logger.info("job_submitted", job_id=job.job_id, workers=job.workers_needed)
        return job

    def recover(self) -> None:
        """After a restart: ranks of jobs that were active report to a coordinator that no longer
        knows their attempt; fail those jobs plainly (their workers are told to stop)."""
        with self._lock:
            for job in self.store.list_jobs():
                if job.state.active:
                    self._set_state(job, JobState.FAILED,
                                    "the coordinator restarted while the job ran")

    def tick(self) -> None:
        """One pass of the control loop: place queued jobs, oldest first; catch lost ranks."""
        with self._lock:
            queued = [j for j in self.store.list_jobs() if j.state.waiting]
        for job in sorted(queued, key=lambda j: j.created_ms):
            self._try_place(job)
        self._check_running()

    def _check_running(self) -> None:
        """A running job whose worker says it runs nothing, for longer than an exit report takes
        to arrive, lost its rank silently (e.g. the agent restarted): fail it, never hang."""
        now = self.now_ms()
        workers = {w.worker_id: w for w in self._workers()}
        lost: list[Job] = []
        with self._lock:
            for job in self.store.list_jobs():
                if job.state is not JobState.RUNNING:
                    continue
                finished = self._finished_ranks.get((job.job_id, job.attempt), set())
                for rank, wid in enumerate(job.worker_ids):
                    w = workers.get(wid)
                    key = (job.job_id, wid)
                    if w is None or w.running_job_id == job.job_id or rank in finished:
                        self._idle_since.pop(key, None)
                        continue
                    since = self._idle_since.setdefault(key, now)
                    if now - since >= self.lost_rank_grace_s * 1000:
                        self._attempt_failed(job, f"worker {wid} is no longer running its rank "
                                             f"(no exit report for {self.lost_rank_grace_s:.0f}s)",
                                             None)
                        lost.append(job)
                        break
        for job in lost:
            self._stop_ranks(job)

    def free_workers(self) -> list[WorkerRecord]:
        busy = {w for j in self.store.list_jobs() if j.state.active for w in j.worker_ids}
        return [w for w in self._workers() if w.worker_id not in busy]

    def _try_place(self, job: Job) -> None:
        with self._lock:
            job = self.store.get_job(job.job_id)
            if not job.state.waiting:
                return
            workers = self.free_workers()
            decision = decide_queued(job, workers, self.now_ms(), self.placement_timeout_s)
            if isinstance(decision, Fail):
                self._set_state(job, JobState.FAILED, decision.reason)
                return
            if isinstance(decision, Wait):
                if job.message != f"waiting: {decision.reason}":
                    job.message = f"waiting: {decision.reason}"
                    self.store.put_job(job)
                    self._event(job, EventKind.LOG, message=job.message)
                return
            job.attempt += 1
            job.worker_ids = list(decision.worker_ids)
            ckpts = self.store.checkpoints(job.job_id) if job.attempt > 1 else []
            resume = ckpts[-1].step if ckpts else 0
            self.store.start_attempt(job.job_id, job.attempt, job.worker_ids, self.now_ms())
            layout = (f" as {decision.data_parallel} x {decision.pipeline_stages} (data x "
                      f"pipeline), blocks {_cut(decision.stage_layers)}"
                      if decision.stage_layers else "")
            self._set_state(job, JobState.PLACING, f"starting {len(job.worker_ids)} ranks on "
                            + ", ".join(job.worker_ids) + layout
                            + (f", resuming from checkpoint {resume}" if resume else ""))
            if decision.path is not None and len(job.worker_ids) > 1:
                self._event(job, EventKind.LOG, message=decision.path.describe())
            plan = launches(job, decision, {w.worker_id: w for w in workers}, resume)
        # Start all ranks together, outside the lock (workers report back while we wait).
        results = list(self._pool.map(self._start_one, plan))
        failed = [(launch, err) for launch, err in zip(plan, results) if err]
        with self._lock:
            job = self.store.get_job(job.job_id)
            if job.state is not JobState.PLACING:
                return  # cancelled meanwhile; cancel() stops what started
            if failed:
                launch, err = failed[0]
                self._set_state(job, JobState.FAILED, f"rank {launch.rank} could not start on "
                                f"{launch.worker.worker_id}: {err}")
            else:
                self._set_state(job, JobState.RUNNING)
        if failed:
            self._stop_ranks(job)

    def _start_one(self, launch: RankLaunch) -> str | None:
        try:
            self._launcher.start_rank(launch)
            return None
        except HerdError as e:
            return e.message

    def _stop_ranks(self, job: Job) -> None:
        workers = {w.worker_id: w for w in self._workers()}
        targets = [workers[w] for w in job.worker_ids if w in workers]
        for fut in [self._pool.submit(self._launcher.stop_job, w, job.job_id) for w in targets]:
            try:
                fut.result(timeout=15)
            except Exception as e:  # a dead worker cannot be stopped; its ranks die with it
                logger.warning("stop_rank_failed", job_id=job.job_id, error=str(e))

    def cancel(self, job_id: str) -> JobState:
        with self._lock:
            job = self.store.get_job(job_id)
            if job.state.final:
                return job.state
            self._set_state(job, JobState.CANCELLED, "cancelled by the user")
        self._stop_ranks(job)
        return JobState.CANCELLED

    # --- reports from workers --------------------------------------------------------------

    def _current(self, job_id: str, attempt: int) -> Job | None:
        job = self.store.get_job(job_id)
        return job if job.state.active and job.attempt == attempt else None

    def on_progress(self, job_id: str, attempt: int, progress: RankProgress) -> bool:
        """Records progress; returns True when the rank must stop (job no longer running)."""
        with self._lock:
            job = self._current(job_id, attempt)
            if job is None:
                return True
            self._event(job, EventKind.PROGRESS, progress=progress, step=progress.iteration)
            return False

    def on_log(self, job_id: str, attempt: int, message: str) -> bool:
        with self._lock:
            job = self._current(job_id, attempt)
            if job is None:
                return True
            self._event(job, EventKind.LOG, message=message)
            return False

    def on_exit(self, job_id: str, attempt: int, rank: int, worker_id: str, code: int,
                error: str) -> None:
        with self._lock:
            job = self._current(job_id, attempt)
            if job is None:
                return
            if code != 0:
                reason = f"rank {rank} on {worker_id} exited with code {code}"
                self._attempt_failed(job, f"{reason}: {error}" if error else reason, code)
            else:
                done = self._finished_ranks.setdefault((job_id, attempt), set())
                done.add(rank)
                if len(done) < len(job.worker_ids):
                    return
                if job.state is JobState.PLACING:
                    self._set_state(job, JobState.RUNNING)
                self._set_state(job, JobState.SUCCEEDED)
                return
        self._stop_ranks(job)

    def on_checkpoint(self, checkpoint: Checkpoint) -> None:
        with self._lock:
            self.store.add_checkpoint(checkpoint)
            job = self.store.get_job(checkpoint.job_id)
            self._event(job, EventKind.CHECKPOINT, step=checkpoint.step,
                        message=f"checkpoint {checkpoint.step} stored")

    def on_worker_lost(self, worker_id: str) -> None:
        with self._lock:
            hit = [j for j in self.store.list_jobs()
                   if j.state.active and worker_id in j.worker_ids]
            for job in hit:
                self._attempt_failed(job, f"worker {worker_id} was lost", None)
        for job in hit:
            self._stop_ranks(job)

    # --- watching --------------------------------------------------------------------------

    def wait_for_events(self, timeout_s: float) -> None:
        with self._changed:
            self._changed.wait(timeout_s)

    def run(self, stop: threading.Event, interval_s: float = 0.5) -> None:
        while not stop.is_set():
            try:
                self.tick()
            except Exception:  # the loop must survive one bad job; the error is logged in full
                logger.exception("scheduler_tick_failed")
            stop.wait(interval_s)
