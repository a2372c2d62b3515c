"""The scheduler's view of the workers checked against its own: what each worker runs (its
Health) compared with the attempts the store says are current.

- A rank that belongs to no current attempt is stale and stopped, again and again until its
  worker stops reporting it (coordinator/recovery.py ``stale_ranks``).
- After a coordinator restart, an attempt whose ranks all still run (or finished) is re-adopted;
  one that is not complete within ``adopt_grace_s`` restarts from its last checkpoint.
- A worker that stops answering the coordinator (its health checks fail) is not yet a failed
  attempt: the coordinator's own link may be what broke (a Wi-Fi blip, a switch port), and its
  ranks train on without it. The attempt waits up to ``unreachable_grace_s`` for the worker to
  come back and is re-adopted if its ranks still run; it fails sooner when a rank does (a worker
  that is really gone leaves its peers' collectives stalled: their watchdog or the exchange's
  deadline ends them, and their exit reports end the attempt as before). Back but running
  nothing: the wait for its exit report below.
- A running job whose worker runs nothing, with no exit report for ``lost_rank_grace_s``, lost
  its rank silently (its agent restarted): the attempt failed.

A part of the Scheduler (coordinator/scheduler.py), kept apart by concern: it calls the
scheduler's own state changes, under its lock.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from coordinator.domain import EventKind, Job, JobState, WorkerRecord
from coordinator.recovery import (
    STALE_STOP_EVERY_S,
    adoption_missing,
    decide_restart,
    retryable,
    stale_ranks,
)
from herd import log
from herd.errors import NumericalError

if TYPE_CHECKING:
    from coordinator.scheduler import Scheduler

logger = log.get(__name__)


def _workers(ids: tuple[str, ...]) -> str:
    return f"worker {ids[0]}" if len(ids) == 1 else "workers " + ", ".join(ids)


class Reconciler:
    def __init__(self, scheduler: "Scheduler", unreachable_grace_s: float = 60.0):
        self.s = scheduler
        # job_id -> (re-adoption deadline in ms, the workers that stopped answering and why the
        # first did; none: a coordinator restart)
        self.adopting: dict[str, tuple[int, tuple[str, ...], str]] = {}
        self.unreachable_grace_s = unreachable_grace_s
        # job_id -> (attempt, when a worker of it stopped answering): a worker gone for good has
        # been gone since then, not since the attempt failed (coordinator/elastic.py counts so)
        self.gone_since: dict[str, tuple[int, int]] = {}
        self._stale_sent: dict[tuple[str, str, int], int] = {}  # (worker, job, attempt) -> ms
        self._idle_since: dict[tuple[str, str], int] = {}
        self.lost_rank_grace_s = 20.0
        self._cut_off_jobs: set[str] = set()  # waiting on, the coordinator cut off (_cut_off)

    def forget(self, job_id: str) -> None:
        """The job's attempt ended: nothing to re-adopt or to wait for."""
        self.adopting.pop(job_id, None)
        self._cut_off_jobs.discard(job_id)
        self._idle_since = {k: v for k, v in self._idle_since.items() if k[0] != job_id}

    def recover(self) -> None:
        s = self.s
        with s._lock:
            deadline = s.now_ms() + int(s.adopt_grace_s * 1000)
            for job in s.store.list_jobs():
                if job.state is JobState.RESTARTING:  # its backoff, as when it failed: kept
                    d = decide_restart(s.store.attempt_history(job.job_id),
                                       s.store.checkpoints(job.job_id), job.updated_ms, 1, True,
                                       s.restart_policy)
                    s._not_before[job.job_id] = job.updated_ms + int(d.delay_s * 1000)
                if job.state.active and job.config.cluster.backend == "ray":
                    # A rank actor is the driver's (this process's): it ended with it. Nothing to
                    # wait for (it waited 30 s for ranks that could not exist: an outside run).
                    self.adopting[job.job_id] = (s.now_ms(), (), "")
                    s._event(job, EventKind.LOG, message=(
                        "the coordinator restarted: the ranks of a Ray job end with it (their "
                        "actors are its own); restarting from the last checkpoint"))
                elif job.state.active:
                    self.adopting[job.job_id] = (deadline, (), "")
                    s._event(job, EventKind.LOG, message=(
                        f"the coordinator restarted: waiting up to {s.adopt_grace_s:.0f}s for "
                        f"attempt {job.attempt}'s ranks to report"))

    def await_return(self, job: Job, worker_id: str, reason: str) -> bool:
        """``worker_id`` of the job's attempt stopped answering: True when the attempt waits for
        it (a running job of the agents' backend); False: the caller fails the attempt now."""
        s = self.s
        if (not self.unreachable_grace_s or job.state is not JobState.RUNNING
                or job.config.cluster.backend != "zeroconf"):
            return False
        grace = self.unreachable_grace_s
        deadline, lost, why = self.adopting.get(
            job.job_id, (s.now_ms() + int(grace * 1000), (), reason))
        if job.job_id in self.adopting and not lost:
            return True  # re-adopting after a coordinator restart: that wait covers this one
        self.adopting[job.job_id] = (deadline, (*lost, worker_id), why)
        if self.gone_since.get(job.job_id, (0, 0))[0] != job.attempt:
            self.gone_since[job.job_id] = (job.attempt, s.now_ms())
        left = (deadline - s.now_ms()) / 1000
        it, its = ("them", "their") if lost else ("it", "its")
        job.message = (f"{_workers((*lost, worker_id))} stopped answering the coordinator: "
                       f"waiting for {it} ({its} ranks may train on)")
        s.store.put_job(job)  # `herd jobs` says so while it lasts
        s._event(job, EventKind.LOG, message=(
            f"worker {worker_id} stopped answering the coordinator ({reason}); its ranks may "
            f"train on: waiting up to {left:.0f}s for it before restarting attempt "
            f"{job.attempt} (a rank that lost it fails sooner)"))
        logger.warning("worker_unreachable_waiting", job_id=job.job_id, worker_id=worker_id,
                       left_s=left)
        return True

    def stop_stale(self) -> None:
        """Stops, again every few seconds until its worker no longer reports it, every rank that
        belongs to no current attempt (a StopJob that never arrived, a worker cut off and
        back). Sent from the pool: an unreachable worker never holds up the loop."""
        s = self.s
        workers = s._backends["zeroconf"].workers()  # agents report their ranks (Health)
        with s._lock:
            jobs = {j.job_id: j for j in s.store.list_jobs()}
        now = s.now_ms()
        stale = stale_ranks(workers, jobs, set(self.adopting))
        keys = {(w.worker_id, job_id, attempt) for w, job_id, attempt in stale}
        self._stale_sent = {k: v for k, v in self._stale_sent.items() if k in keys}
        for w, job_id, attempt in stale:
            key = (w.worker_id, job_id, attempt)
            if now - self._stale_sent.get(key, -10**12) < STALE_STOP_EVERY_S * 1000:
                continue
            self._stale_sent[key] = now
            logger.info("stale_rank_stopping", worker_id=w.worker_id, job_id=job_id,
                        attempt=attempt)
            s._pool.submit(self._stop_quietly, w, job_id, attempt)

    def _stop_quietly(self, w: WorkerRecord, job_id: str, attempt: int) -> None:
        s = self.s
        try:
            s._backends["zeroconf"].stop_attempt(w, job_id, attempt)
        except Exception as e:  # retried by the next stop_stale while the worker reports it
            logger.warning("stop_rank_failed", worker_id=w.worker_id, job_id=job_id,
                           error=str(e))

    def adopt(self) -> None:
        s = self.s
        if not self.adopting:
            return
        workers = {w.worker_id: w for w in s.workers()}
        failed = []
        with s._lock:
            now = s.now_ms()
            for job_id, (deadline, lost, why) in list(self.adopting.items()):
                job = s.store.get_job(job_id)
                if not job.state.active:
                    self._stop_waiting(job, lost)
                    continue
                missing = adoption_missing(job, workers,
                                           s.store.finished_ranks(job_id, job.attempt))
                if not missing:
                    if job.state is JobState.PLACING:
                        s._set_state(job, JobState.RUNNING)
                    self._stop_waiting(job, lost)
                    s._event(job, EventKind.LOG, message=(
                        f"re-adopted attempt {job.attempt}: its ranks trained on "
                        + (f"while {_workers(lost)} did not answer the coordinator" if lost else
                           "through the coordinator restart")))
                    logger.info("attempt_readopted", job_id=job_id, attempt=job.attempt)
                elif lost and all(" no longer runs rank " in m for m in missing):
                    # Back, but its rank is gone: its exit report may still be on its way
                    # (check_running waits lost_rank_grace_s for it), or the agent restarted.
                    self._stop_waiting(job, lost)
                elif now >= deadline and self._cut_off(job, lost, why, now):
                    continue  # its deadline moved on
                elif now >= deadline:
                    waited = self.unreachable_grace_s + (
                        s.placement_timeout_s if job_id in self._cut_off_jobs else 0)
                    s._attempt_failed(job, (
                        f"worker {lost[0]} was lost: {why}; not back within {waited:.0f}s"
                        if lost else
                        "the coordinator restarted and could not re-adopt "
                        f"attempt {job.attempt}: " + "; ".join(missing)), None,
                        interrupted=not lost)
                    failed.append(job)
        for job in failed:
            s._stop_ranks(job)

    def _cut_off(self, job: Job, lost: tuple[str, ...], why: str, now: int) -> bool:
        """At the end of the wait no worker at all answers the coordinator: what broke is the
        coordinator's own link (a cable, a switch port, a Wi-Fi blip), most likely, and the
        ranks train on. The wait goes on, once, for ``placement_timeout_s`` (as long as a
        restart would wait for workers anyway), so that they are re-adopted with the
        checkpoints their agents kept meanwhile (an outside run: a 120 s cut of the
        coordinator's cable failed the attempt at 60 s while its ranks trained on; 1,700
        iterations were redone). True when it goes on."""
        s = self.s
        extra = s.placement_timeout_s
        # (its own backend's: a Ray job after a coordinator restart has Ray nodes, and its
        # actors died with the driver: nothing to wait for)
        if job.job_id in self._cut_off_jobs or s.backend(job).workers() or not extra:
            return False
        self._cut_off_jobs.add(job.job_id)
        self.adopting[job.job_id] = (now + int(extra * 1000), lost, why)
        whom = _workers(lost) if lost else f"attempt {job.attempt}'s workers"
        job.message = (f"no worker answers the coordinator (its own link, most likely): waiting "
                       f"for {whom} (their ranks may train on)")
        s.store.put_job(job)
        s._event(job, EventKind.LOG, message=(
            f"no worker answers the coordinator, the cause most likely its own link: waiting up "
            f"to {extra:.0f}s more for {whom} before restarting attempt {job.attempt}"))
        logger.warning("coordinator_cut_off_waiting", job_id=job.job_id, more_s=extra)
        return True

    def _stop_waiting(self, job: Job, lost: tuple[str, ...]) -> None:
        """The job's attempt is no longer waited for (re-adopted, ended, or its worker back):
        its entries go, and `herd jobs` stops saying it waits."""
        del self.adopting[job.job_id]
        self.gone_since.pop(job.job_id, None)
        self._cut_off_jobs.discard(job.job_id)
        if lost and job.state is JobState.RUNNING:
            job.message = ""
            self.s.store.put_job(job)

    def silent_peers(self, job: Job) -> str:
        """For a rank's failure report: the job's workers that had already stopped answering the
        coordinator. A peer's agent killed or its Mac gone is seen first as a survivor's "lost
        a peer"; the one line a user reads names the worker that went (an outside run: the
        killed middle stage's worker was named nowhere)."""
        _, lost, why = self.adopting.get(job.job_id, (0, (), ""))
        return (f" ({_workers(lost)} stopped answering the coordinator ({why}): the likely "
                "cause)" if lost else "")

    def lost_after_failure(self, worker_id: str, reason: str) -> None:
        """``worker_id`` stopped answering just after an attempt of its job failed (the other
        order of the case above: its peers' reports came first): said in the job's events and
        its message, as the likely cause. Caller holds the lock."""
        s = self.s
        for job in s.store.list_jobs():
            if (job.state is not JobState.RESTARTING or worker_id not in job.worker_ids
                    or s.now_ms() - job.updated_ms > self.lost_rank_grace_s * 1000
                    or f"worker {worker_id} " in job.message):
                continue
            said = f"worker {worker_id} stopped answering the coordinator ({reason})"
            job.message = f"{job.message} ({said}: the likely cause)"
            s.store.put_job(job)
            s._event(job, EventKind.LOG, message=(
                f"{said} as attempt {job.attempt} failed: the likely cause (its peers lost it)"))

    def late_exit(self, job_id: str, attempt: int, rank: int, worker_id: str, code: int,
                  error: str) -> None:
        """An exit report of an attempt that already failed. A rank that failed on its own (its
        config, data, disk: no retry fixes it) while the restart waits is why the attempt
        failed, whatever was reported first (a peer's "lost a peer", quicker to arrive): the job
        fails naming it, instead of a restart that fails alike (an outside run: a worker's full
        disk, blamed on the healthy worker and retried). Caller holds the lock."""
        job = self.s.store.get_job(job_id)
        if (code == 0 or retryable(code) or job.state is not JobState.RESTARTING
                or job.attempt != attempt or code == NumericalError.exit_code):
            return  # (a non-finite step may be rolled back: coordinator/recovery.py)
        self.s._set_state(job, JobState.FAILED, f"attempt {attempt} failed: rank {rank} on "
                          f"{worker_id} exited with code {code}" + (f": {error}" if error else ""))

    def check_running(self) -> None:
        """A running job whose worker says it runs nothing, for longer than an exit report takes
        to arrive, lost its rank silently (e.g. the agent restarted): fail it, never hang."""
        s = self.s
        now = s.now_ms()
        workers = {w.worker_id: w for w in s.workers()}
        lost: list[Job] = []
        with s._lock:
            for job in s.store.list_jobs():
                if job.state is not JobState.RUNNING or job.job_id in self.adopting:
                    continue
                finished = s.store.finished_ranks(job.job_id, job.attempt)
                for rank, wid in enumerate(job.worker_ids):
                    w = workers.get(wid)
                    key = (job.job_id, wid)
                    runs = w is not None and w.running_job_id == job.job_id and (
                        w.running_attempt in (0, job.attempt))
                    if w is None or runs or rank in finished:
                        self._idle_since.pop(key, None)
                        continue
                    since = self._idle_since.setdefault(key, now)
                    if now - since >= self.lost_rank_grace_s * 1000:
                        s._attempt_failed(job, f"worker {wid} is no longer running its rank "
                                          f"(no exit report for {self.lost_rank_grace_s:.0f}s)",
                                          None)
                        lost.append(job)
                        break
        for job in lost:
            s._stop_ranks(job)
