"""The job state machine and its control loop.

QUEUED -> PLACING -> RUNNING -> SUCCEEDED | FAILED | CANCELLED (domain.TRANSITIONS). Decisions
are pure functions of the job, the workers and the clock (``decide_queued`` here, restarts,
stale ranks and re-adoption in coordinator/recovery.py); the Scheduler applies them, records
every change as an event, and talks to workers through an injected launcher, so tests step it
with ``tick()`` and a fake clock.

A job succeeds only with its final adapter stored; a checkpoint the coordinator cannot store
for DISK_GRACE_S fails it (recovery.py). A restarted coordinator re-adopts its workers' attempts.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from coordinator import recovery
from coordinator.backend import AgentBackend, Backend, Launcher, unavailable
from coordinator.domain import (
    Checkpoint,
    EventKind,
    FetchProgress,
    Job,
    JobState,
    ModelSource,
    RankLaunch,
    RankProgress,
    WorkerRecord,
    check_transition,
)
from coordinator.elastic import Elastic
from coordinator.launching import ModelInfo, bring_up, launches, stop_ranks
from coordinator.paths import FailedPaths
from coordinator.placement import (
    Fail,
    Placement,
    Wait,
    check_submit,
    decide_queued,
    mark_held,
    placing_text,
    wait_limit_s,
    wait_or_fail,
)
from coordinator.queue import Ahead, queue_order, same_wait
from coordinator.reconcile import Reconciler
from coordinator.recovery import RestartPolicy, StoredCheckpoints, decide_restart, retryable
from coordinator.refusals import Refusals
from coordinator.store import JobStore
from herd import log
from herd.errors import ConfigError, HerdError, PeerLostError

logger = log.get(__name__)


# --- the scheduler -----------------------------------------------------------------------------

class Scheduler:
    def __init__(self, store: JobStore, workers: Callable[[], list[WorkerRecord]],
                 launcher: Launcher, clock: Callable[[], float] = time.time,
                 placement_timeout_s: float = 600.0, backends: dict[str, Backend] | None = None,
                 models: ModelInfo | None = None, restart_policy: RestartPolicy | None = None,
                 checkpoints: StoredCheckpoints | None = None,
                 adopt_grace_s: float = 30.0, elastic_grace_s: float = 60.0,
                 unreachable_grace_s: float = 60.0):
        self.store = store
        self._models = models
        # cluster.backend -> where its ranks run; worker ids are unique across backends.
        self._backends: dict[str, Backend] = {"zeroconf": AgentBackend(workers, launcher),
                                              **(backends or {})}
        self._clock = clock
        self.placement_timeout_s = placement_timeout_s
        self.restart_policy = restart_policy or RestartPolicy()
        self._verify = checkpoints.verify if checkpoints else lambda c: None  # its problem
        self._cut_of = checkpoints.cut_of if checkpoints else lambda job_id, step: None
        self.adopt_grace_s = adopt_grace_s  # how long a restarted coordinator waits for ranks
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._not_before: dict[str, int] = {}  # job_id -> when its restart may be placed (ms)
        self.stopping = threading.Event()  # set by the coordinator's stop(): see _try_place
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="launch")
        self.reconcile = Reconciler(self, unreachable_grace_s)
        self.elastic = Elastic(self, elastic_grace_s)  # 0: never shrink a job
        self.paths = FailedPaths()  # data subnets a job's attempt failed on: avoided after
        self.refusals = Refusals()  # workers that refused a job's rank: others are tried
        self.disk_grace = recovery.DiskGrace()  # checkpoints a full disk refused, ridden out
        self._started_ms = self.now_ms()  # a wait's clock: a restart of ours is not the job's

    def _timeout_s(self, job: Job) -> float:  # a restarting job waits at least until it may shrink
        return wait_limit_s(job, self.placement_timeout_s, self.elastic.grace_s)

    health = property(lambda self: self.store.health)  # empty, or what keeps jobs unrecorded
    backends = property(lambda self: dict(self._backends))  # cluster.backend -> Backend

    def now_ms(self) -> int:
        return int(self._clock() * 1000)

    def backend(self, job: Job) -> Backend:
        return self._backends[job.config.cluster.backend]

    def workers(self) -> list[WorkerRecord]:
        """Every backend's workers: verified agents, and the Ray nodes once connected."""
        return [w for b in self._backends.values() for w in b.workers()]

    # --- recording -------------------------------------------------------------------------

    def _event(self, job: Job, kind: EventKind, **kw) -> None:
        self.store.add_event(job.job_id, self.now_ms(), kind, **kw)
        self._changed.notify_all()

    def _set_state(self, job: Job, to: JobState, message: str = "",
                   outcome: str | None = None) -> None:
        check_transition(job, to)
        job.state, job.message, job.updated_ms = to, message, self.now_ms()
        self.store.put_job(job)
        if (to.final or to is JobState.RESTARTING) and job.attempt:
            self.store.end_attempt(job.job_id, job.attempt, outcome or to.value, job.updated_ms)
        self._event(job, EventKind.STATE, state=to, message=message)
        logger.info("job_state", job_id=job.job_id, state=to.value, message=message)

    def _attempt_failed(self, job: Job, reason: str, exit_code: int | None,
                        interrupted: bool = False) -> None:
        """Restart from the last checkpoint, after a backoff, when the policy allows (recovery.py;
        at once when ``interrupted``), else fail. Caller holds the lock, then stops the ranks."""
        max_restarts = job.config.cluster.max_restarts
        self.reconcile.forget(job.job_id)
        now = self.now_ms()
        final = job.config.last_step()
        if job.state is JobState.RUNNING and any(
                c.step == final for c in self.store.checkpoints(job.job_id)):
            # Its final adapter is stored: the training is done, whatever ended the ranks after.
            self._set_state(job, JobState.SUCCEEDED, f"after its final checkpoint ({final}): "
                            f"{reason}")
            return
        if (lowered := recovery.rollback_config(job.config, exit_code)) is not None:
            job.config = lowered  # stored with the state below: every later attempt uses it
            self._not_before[job.job_id] = now  # nothing to wait for: no peer or link failed
            self._set_state(job, JobState.RESTARTING, f"attempt {job.attempt} failed: {reason}; "
                            + recovery.rolling_back(lowered, self.store.checkpoints(job.job_id)))
            return
        reason += self.paths.on_failed(job, self.store, exit_code)
        d = decide_restart(self.store.attempt_history(job.job_id),
                           self.store.checkpoints(job.job_id), now, max_restarts,
                           retryable(exit_code), self.restart_policy, interrupted)
        if d.restart:
            self._not_before[job.job_id] = now + int(d.delay_s * 1000)
            self._set_state(job, JobState.RESTARTING, recovery.restarting(
                job.attempt, reason, d, self.store.checkpoints(job.job_id), self.restart_policy),
                "interrupted" if interrupted else None)
        else:
            tried = f" (attempt {job.attempt})" if job.attempt > 1 else ""
            wasted = (f"; {d.wasted} attempts in a row stored no new checkpoint "
                      f"(cluster.max_restarts: {max_restarts})" if retryable(exit_code) else "")
            wasted += recovery.gave_up(job.config)  # after rollbacks (cluster.on_non_finite)
            self._set_state(job, JobState.FAILED, reason + tried + wasted)

    # --- entry points ----------------------------------------------------------------------

    def submit(self, job: Job, by: str = "") -> Job:  # by: who, for the job's events
        cfg = job.config
        backend = self._backends.get(cfg.cluster.backend)
        if backend is None:  # never silently place on other workers than asked
            raise ConfigError(
                unavailable(cfg.cluster.backend),
                hint="use cluster.backend: zeroconf (workers found by mDNS and verified by their "
                "certificates)")
        backend.connect(job)  # an unreachable Ray cluster fails here, naming the address tried
        check_submit(job, backend.workers(), self._models and self._models.config(job))
        with self._lock:
            job.created_ms = job.updated_ms = self.now_ms()
            job.state = JobState.QUEUED
            self.store.put_job(job)
            self._event(job, EventKind.STATE, state=JobState.QUEUED,
                        message=f"submitted by {by}" if by else "")
        logger.info("job_submitted", job_id=job.job_id, workers=job.workers_needed)
        return job

    def recover(self) -> None:
        """After a restart on its state folder: re-adopt or resume (coordinator/reconcile.py)."""
        self.reconcile.recover()

    def tick(self) -> None:
        """One pass: stop stale ranks, re-adopt, place queued jobs (oldest first), lost ranks."""
        self.reconcile.stop_stale()
        self.reconcile.adopt()
        with self._lock:
            queued = [j for j in self.store.list_jobs() if j.state.waiting]
        ahead = Ahead()  # the waiting jobs before each one, and the workers they keep
        for job in queue_order(queued):
            self._try_place(job, ahead)
        self.reconcile.check_running()

    def _try_place(self, job: Job, ahead: Ahead) -> None:
        with self._lock:
            job = self.store.get_job(job.job_id)
            if not job.state.waiting or self.now_ms() < self._not_before.get(job.job_id, 0):
                return ahead.keep(job, job.state.waiting)  # (in its backoff: it keeps them)
            name = job.config.cluster.backend
            backend = self._backends.get(name)
            if backend is None:  # queued before a restart of this coordinator without Ray
                self._set_state(job, JobState.FAILED, unavailable(name))
                return
            workers = mark_held(backend.workers(), self.store.list_jobs(), job)
            cut = recovery.kept_cut(self.store.checkpoints(job.job_id), self._cut_of)
            decision = decide_queued(job, workers, self.now_ms(), self._timeout_s(job),
                                     self._models and self._models.config(job), self._started_ms,
                                     self.refusals.of(job.job_id), cut)
            shrunk = self.elastic.shrink(job, workers, cut) if isinstance(decision, Wait) else None
            decision, note = shrunk or (decision, "")  # (elastic: zeroconf only, nothing reserved)
            if isinstance(decision, Placement) and (why := ahead.holds_back(job, workers)):
                decision = Wait(why, busy=True)
            if isinstance(decision, Placement):  # its data path, and where workers get the model
                decision = self.paths.reroute(job, decision, workers)
                try:
                    model = self._models.source(job) if self._models else ModelSource()
                except HerdError as e:
                    decision = Fail(e.message)
            if isinstance(decision, Placement) and backend.reserve is not None:
                reserved = backend.reserve(job, job.attempt + 1, decision,
                                           {w.worker_id: w for w in workers})
                if isinstance(reserved, Wait):
                    decision = wait_or_fail(job, reserved, self.now_ms(), self._timeout_s(job),
                                            self._started_ms)
                else:
                    workers = list(reserved.values())
            if isinstance(decision, Fail):
                self._set_state(job, JobState.FAILED, decision.reason)
                return
            if isinstance(decision, Wait):
                ahead.keep(job, decision.busy or job.state is JobState.RESTARTING)
                if not same_wait(job.message, decision.reason):
                    job.message = f"waiting: {decision.reason}"
                    self.store.put_job(job)
                    self._event(job, EventKind.LOG, message=job.message)
                return
            job.attempt += 1
            job.worker_ids = list(decision.worker_ids)
            resume = recovery.resume_step(  # (a first attempt's: --resume-from's checkpoint)
                self.store.checkpoints(job.job_id), self._verify,
                lambda m: self._event(job, EventKind.LOG, message=m))
            self.store.start_attempt(job.job_id, job.attempt, job.worker_ids, self.now_ms(),
                                     decision.pipeline_stages)
            self._set_state(job, JobState.PLACING, placing_text(decision, resume, note))
            if decision.path is not None and len(job.worker_ids) > 1:
                self._event(job, EventKind.LOG, message=decision.path.describe())
            try:  # (a bug here left the job PLACING for good, no rank started: a review)
                plan = launches(job, decision, {w.worker_id: w for w in workers}, resume, model)
            except HerdError as e:
                return self._set_state(job, JobState.FAILED, f"cannot launch: {e.message}")
        # Outside the lock (workers report back while we wait): models first, then every rank.
        results = bring_up(self._pool, backend, plan, self._on_fetch)
        failed = [(launch, err) for launch, err in zip(plan, results) if err]
        with self._lock:
            job = self.store.get_job(job.job_id)
            # Cancelled meanwhile (cancel() stops what started), or our own stop cut its calls (it
            # failed for good while its workers fetched: an outside run): reconcile.py retries.
            if job.state is not JobState.PLACING or self.stopping.is_set():
                return
            if failed:
                launch, err = failed[0]
                reason = f"rank {launch.rank} could not start on {launch.worker.worker_id}: "
                if isinstance(err, PeerLostError):  # a link just back, say: worth another try
                    self._attempt_failed(job, reason + err.message, None)
                elif self.refusals.place_elsewhere(job, failed, mark_held(  # (busy: not idle)
                        backend.workers(), self.store.list_jobs())):
                    self._attempt_failed(job, reason + err.message, None, interrupted=True)
                else:
                    self._set_state(job, JobState.FAILED, reason + err.message)
            else:
                self._set_state(job, JobState.RUNNING)
        if failed:
            self._stop_ranks(job)

    def _on_fetch(self, launch: RankLaunch, fetch: FetchProgress) -> bool:
        """Records a worker's fetch progress; False (stop fetching) once the attempt is over."""
        with self._lock:
            job = self.store.get_job(launch.job.job_id)
            if job.state is not JobState.PLACING or job.attempt != launch.job.attempt:
                return False
            self._event(job, EventKind.FETCH, fetch=fetch)
            return True

    def _stop_ranks(self, job: Job) -> None:
        stop_ranks(self._pool, self.backend(job), job)

    def cancel(self, job_id: str, by: str = "the user") -> JobState:
        with self._lock:
            job = self.store.get_job(job_id)
            if job.state.final:
                return job.state
            self._set_state(job, JobState.CANCELLED, f"cancelled by {by}")
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

    def on_storage_failed(self, job_id: str, step: int, reason: str) -> None:
        """A checkpoint the coordinator could not store: said, and sent again by its rank; the
        job fails with the reason once its grace is over (recovery.DiskGrace)."""
        with self._lock:
            job = self.store.get_job(job_id)
            if not job.state.active:
                return
            if (said := self.disk_grace.refused(job_id, step, reason, self.now_ms())) is not None:
                return said and self._event(job, EventKind.LOG, message=said)
            self.reconcile.forget(job_id)
            self._set_state(job, JobState.FAILED,
                            f"checkpoint {step} could not be stored on the coordinator: {reason}")
        self._stop_ranks(job)

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
                return self.reconcile.late_exit(job_id, attempt, rank, worker_id, code, error)
            if code != 0:
                reason = f"rank {rank} on {worker_id} exited with code {code}" + (
                    f": {error}" if error else "") + self.reconcile.silent_peers(job)
                self._attempt_failed(job, reason, code)
            else:
                self.store.add_rank_exit(job_id, attempt, rank, code, self.now_ms())
                if len(self.store.finished_ranks(job_id, attempt)) < len(job.worker_ids):
                    return
                self.reconcile.forget(job_id)
                if job.state is JobState.PLACING:
                    self._set_state(job, JobState.RUNNING)
                # Agents report a rank's exit after its uploads: by now the final adapter (at
                # iters, less a trailing partial accumulation) is stored, or it never will be.
                final = job.config.last_step()
                if final in {c.step for c in self.store.checkpoints(job_id)}:
                    return self._set_state(job, JobState.SUCCEEDED)
                return self._set_state(job, JobState.FAILED, (
                    f"every rank finished, but the final adapter (checkpoint {final}) "
                    "was never stored on the coordinator; see the job's log lines"))
        self._stop_ranks(job)

    def on_checkpoint(self, checkpoint: Checkpoint) -> None:
        with self._lock:
            job = self.store.get_job(checkpoint.job_id)  # (NotFoundError: removed meanwhile)
            self.store.add_checkpoint(checkpoint)
            self.disk_grace.stored(checkpoint.job_id)
            self._event(job, EventKind.CHECKPOINT, step=checkpoint.step,
                        message=f"checkpoint {checkpoint.step} stored")
        self.elastic.on_checkpoint(checkpoint.job_id, checkpoint.step)

    def on_worker_lost(self, worker_id: str, reason: str = "", unreachable: bool = False) -> None:
        """``unreachable``: it only stopped answering, so a running attempt first waits for it
        (coordinator/reconcile.py ``await_return``); else (revoked, a dead Ray node) it fails."""
        with self._lock:
            self.reconcile.lost_after_failure(worker_id, reason)  # its peers' failure named it not
            hit = [j for j in self.store.list_jobs() if j.state.active and worker_id in
                   j.worker_ids and not (unreachable and self.reconcile.await_return(
                       j, worker_id, reason))]
            for job in hit:
                self._attempt_failed(job, f"worker {worker_id} was lost"
                                     + (f": {reason}" if reason else ""), None)
        for job in hit:
            self._stop_ranks(job)

    def on_rank_lost(self, job_id: str, attempt: int, rank: int, worker_id: str,
                     reason: str) -> None:
        """A rank that died unreported (a Ray actor with its node): as a lost worker."""
        with self._lock:
            job = self._current(job_id, attempt)
            if job is None:
                return
            self._attempt_failed(job, f"rank {rank} on {worker_id} was lost: {reason}", None)
        self._stop_ranks(job)

    # --- watching --------------------------------------------------------------------------

    def wait_for_events(self, timeout_s: float) -> None:
        with self._changed:
            self._changed.wait(timeout_s)
