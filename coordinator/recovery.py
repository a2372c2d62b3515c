"""Policies for attempts that converge: pure functions of the job's history, the workers and the
clock, applied by the scheduler (coordinator/scheduler.py), so tests step them without sleeping.

- **Restarts back off and count only what is wasted.** An attempt that stored a new checkpoint
  made progress: its failure costs at most ``save_every`` steps, and a job whose every attempt
  gets further always finishes. ``max_restarts`` bounds the failures *in a row that made no
  progress* (a ring that cannot form, a worker that fails at once); 0 never restarts. Each
  restart waits ``base x 2^(n-1)`` seconds, capped, where n counts the failures of the last
  ``flap_window_s``: a link that keeps dropping is given time to come back instead of burning
  every restart in a minute, and three or more failures in that window are reported as
  flapping.
- **Stale ranks are stopped until they are gone.** A rank that a worker reports (its Health
  lists it) but that belongs to no current attempt (a failed attempt whose StopJob never arrived,
  a worker cut off and back, a job that ended meanwhile) is stopped again every
  ``STALE_STOP_EVERY_S`` until the worker no longer reports it.
- **A restarted coordinator re-adopts attempts.** An attempt whose every rank is still running on
  its worker (or already finished) carries on; one that is not complete within the grace period
  restarts from its last checkpoint.
- **A database it cannot write is a state, not a traceback loop** (``control_loop``).
- **A checkpoint a full disk refuses is ridden out** (``DiskGrace``): the rank keeps it and sends
  it again, the job trains on, and it fails only when no checkpoint of it could be stored for
  ``DISK_GRACE_S`` (an outside run: with a few MB free a job failed at its next checkpoint, while
  with none, its database unwritable too, the same job rode it out).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from coordinator.domain import Checkpoint, Job, WorkerRecord
from coordinator.store import Attempt, JobStore
from herd import log
from herd.config import JobConfig, with_cluster
from herd.errors import NumericalError, PeerLostError, StorageError
from herd.state_lock import private_folder

STALE_STOP_EVERY_S = 5.0
# A rank killed by a signal (its agent's watchdog included), a lost peer (PeerLostError's exit
# code) or a lost worker is worth another attempt; a rank that failed on its own (bad config, bad
# data, a non-finite loss, a full disk) would fail again.
RETRYABLE_EXIT_CODES = {PeerLostError.exit_code}


def retryable(exit_code: int | None) -> bool:
    """``exit_code`` None: the worker itself was lost."""
    return exit_code is None or exit_code < 0 or exit_code in RETRYABLE_EXIT_CODES


logger = log.get(__name__)


def rollbacks_done(cfg: JobConfig) -> int:
    """How many times the job's learning rate was lowered (cluster.lr_scale = factor ** n)."""
    c = cfg.cluster
    return round(math.log(c.lr_scale) / math.log(c.rollback_lr_factor))


def rollback_config(cfg: JobConfig, exit_code: int | None) -> JobConfig | None:
    """The config a rollback restarts with after a non-finite step, when the job asked for it
    (cluster.on_non_finite: rollback): the learning rate (or its schedule) times
    rollback_lr_factor once more. None: the job fails instead (not asked for, another failure,
    or max_rollbacks used). The ranks resume from the last checkpoint as after any restart; the
    step that went non-finite was never applied, so that checkpoint is good."""
    c = cfg.cluster
    if (exit_code != NumericalError.exit_code or c.on_non_finite != "rollback"
            or rollbacks_done(cfg) >= c.max_rollbacks):
        return None
    return with_cluster(cfg, "the rolled-back config", lr_scale=c.lr_scale * c.rollback_lr_factor)


def rolling_back(lowered: JobConfig, checkpoints: list[Checkpoint]) -> str:
    """How `herd watch` says a rollback (``lowered``: the config it restarts with)."""
    start = f"to checkpoint {checkpoints[-1].step}" if checkpoints else "to the start"
    c = lowered.cluster
    return (f"rolling back {start} with the learning rate x{c.lr_scale:g} (rollback "
            f"{rollbacks_done(lowered)} of {c.max_rollbacks}: cluster.on_non_finite)")


def gave_up(cfg: JobConfig) -> str:
    """What a failure after rollbacks adds to its reason ("" when none was made)."""
    if not (n := rollbacks_done(cfg)):
        return ""
    return (f"; still not finite after {n} rollbacks (learning rate x{cfg.cluster.lr_scale:g}; "
            f"cluster.max_rollbacks: {cfg.cluster.max_rollbacks})")


@dataclass(frozen=True)
class RestartPolicy:
    base_s: float = 5.0
    cap_s: float = 120.0
    flap_window_s: float = 600.0
    flap_failures: int = 3


@dataclass(frozen=True)
class RestartDecision:
    restart: bool
    delay_s: float
    wasted: int   # failures in a row without progress, this one included
    recent: int   # failures within the flap window, this one included
    flapping: bool


def made_progress(a: Attempt, checkpoints: list[Checkpoint], until_ms: int) -> bool:
    """A checkpoint was stored while the attempt ran."""
    end = a.ended_ms if a.ended_ms is not None else until_ms
    return any(a.started_ms <= c.created_ms <= end for c in checkpoints)


class StoredCheckpoints(Protocol):  # what the scheduler asks of the stored files (AdapterStore)
    def verify(self, checkpoint: Checkpoint) -> str | None: ...
    def cut_of(self, job_id: str, step: int) -> tuple[tuple[int, int], ...] | None: ...


def kept_cut(checkpoints: list[Checkpoint], cut_of: Callable[[str, int], tuple | None]
             ) -> tuple[tuple[int, int], ...] | None:
    """The layout a job's next attempt keeps: its newest checkpoint's (each pipeline stage's
    blocks; () when data parallel wrote it), or None with no checkpoint (the planner chooses).
    A stage resumes only its own blocks' optimizer state: a restart on workers of other memory
    re-cut the model and every stage refused its checkpoint; a planner that chose data parallel
    there resumed a pipeline's checkpoint from iteration 1, and could not resume the other way."""
    return cut_of(checkpoints[-1].job_id, checkpoints[-1].step) if checkpoints else None


def resume_step(checkpoints: list[Checkpoint], verify: Callable[[Checkpoint], str | None],
                say: Callable[[str], None]) -> int:
    """The newest intact stored checkpoint's step (0: none); a damaged one (``verify`` names its
    problem) is skipped, and ``say`` tells the job's log."""
    for c in reversed(checkpoints):
        problem = verify(c)
        if problem is None:
            return c.step
        say(f"checkpoint {c.step} is damaged ({problem}); skipped, resuming from the one before it")
        logger.warning("checkpoint_damaged", job_id=c.job_id, step=c.step, problem=problem)
    return 0


def decide_restart(history: list[Attempt], checkpoints: list[Checkpoint], now_ms: int,
                   max_restarts: int, retryable: bool, policy: RestartPolicy,
                   interrupted: bool = False) -> RestartDecision:
    """After the last attempt of ``history`` (still open: the one failing now) failed.
    ``interrupted``: it did not fail, the coordinator stopped it (a `herd down`, a restart whose
    ranks were gone): restarted at once, and not counted as a failure (it was: "flapping", with
    a backoff, after an operator's `herd down` and `herd up`: an outside run)."""
    if interrupted:
        return RestartDecision(True, 0.0, 0, 0, False)
    wasted = 0  # ("grown": stopped to grow back, coordinator/elastic.py; "interrupted": above)
    for a in reversed(history):
        if a.outcome not in (None, "restarting", "failed") or made_progress(a, checkpoints,
                                                                            now_ms):
            break
        wasted += 1
    window_start = now_ms - policy.flap_window_s * 1000
    recent = sum(1 for a in history
                 if a.outcome in (None, "restarting", "failed")
                 and (a.ended_ms if a.ended_ms is not None else now_ms) >= window_start)
    recent = max(recent, 1)
    delay = min(policy.cap_s, policy.base_s * 2 ** (recent - 1))
    restart = retryable and max_restarts > 0 and wasted <= max_restarts  # 0: never restart
    return RestartDecision(restart, delay, wasted, recent,
                           recent >= policy.flap_failures)


def stale_ranks(workers: list[WorkerRecord], jobs: dict[str, Job],
                adopting: set[str]) -> list[tuple[WorkerRecord, str, int]]:
    """(worker, job_id, attempt) of every rank a worker runs that no current attempt owns."""
    stale = []
    for w in workers:
        if not w.running_job_id or not w.running_attempt:
            continue  # idle, or its Health has not said which attempt yet
        job = jobs.get(w.running_job_id)
        if job is None:
            continue  # not a job of this coordinator's: not its to stop
        current = ((job.state.active or job.job_id in adopting)
                   and job.attempt == w.running_attempt and w.worker_id in job.worker_ids)
        if not current:
            stale.append((w, w.running_job_id, w.running_attempt))
    return stale


def adoption_missing(job: Job, workers: dict[str, WorkerRecord], finished: set[int]) -> list[str]:
    """What keeps the job's current attempt from being re-adopted (empty: every rank runs on its
    worker or already finished)."""
    missing = []
    for rank, wid in enumerate(job.worker_ids):
        if rank in finished:
            continue
        w = workers.get(wid)
        if w is None:
            missing.append(f"worker {wid} (rank {rank}) has not come back")
        elif w.running_job_id == job.job_id and not w.running_attempt:
            missing.append(f"worker {wid} has not said which attempt it runs yet")
        elif not (w.running_job_id == job.job_id and w.running_attempt == job.attempt):
            missing.append(f"worker {wid} no longer runs rank {rank}")
    return missing


def control_loop(scheduler, stop: threading.Event, interval_s: float = 0.5) -> None:
    """The scheduler's control loop. A database it cannot write is a state (``health``),
    logged once when it starts and once when it ends, with a slower loop meanwhile."""
    degraded, last_error = "", ""
    while not stop.is_set():
        try:
            scheduler.tick()
            last_error = ""
            if degraded and not scheduler.health:
                logger.info("coordinator_recovered", was=degraded)
                degraded = ""
        except StorageError as e:
            if e.message != degraded:
                logger.error("coordinator_degraded", reason=e.message)
            degraded = e.message
        except Exception as e:  # the loop must survive one bad job; logged once per cause
            if repr(e) != last_error:
                logger.exception("scheduler_tick_failed")
            last_error = repr(e)
        stop.wait(max(interval_s, 5.0) if degraded else interval_s)


def wait_until_writable(path: Path, stop: threading.Event, max_delay_s: float = 30.0) -> bool:
    """Before a coordinator starts on its state folder: True once its job database (``path``)
    can be written, False when ``stop`` is set first. A coordinator that exited instead (a full
    or read-only disk) was restarted by its supervisor again and again, and `herd up` stops the
    whole cluster, ranks training fine included, after 5 restarts in a minute. Waiting keeps the
    ranks training (their agents hold their reports) and loses nothing; it says so once per
    cause, in its log and on stdout."""
    delay, said = 1.0, ""
    while True:
        try:
            private_folder(path.parent)
            store = JobStore(path)
            try:
                store.check_writable()
            finally:
                store.close()
            if said:
                logger.info("coordinator_database_writable", path=str(path))
            return True
        except (StorageError, OSError) as e:
            why = e.message if isinstance(e, StorageError) else f"{path.parent}: {e}"
            if why.split(" (")[0] != said.split(" (")[0]:  # (its free-space figure moves)
                print(f"herd coordinator: {why}; waiting until it can be written (the ranks "
                      "train on meanwhile)", flush=True)
                logger.error("coordinator_database_unwritable", reason=why)
            said = why
        if stop.wait(delay):
            return False
        delay = min(max_delay_s, 2 * delay)


DISK_GRACE_S = 600.0


def restarting(attempt: int, reason: str, d, checkpoints: list[Checkpoint],
               policy: RestartPolicy) -> str:
    """The RESTARTING state's message for ``d`` (decide_restart's restart)."""
    start = f"from checkpoint {checkpoints[-1].step}" if checkpoints else "from the start"
    flapping = (f"; flapping: {d.recent} attempts failed in the last "
                f"{policy.flap_window_s / 60:.0f} min" if d.flapping else "")
    return f"attempt {attempt} failed: {reason}; restarting {start} in {d.delay_s:.0f}s{flapping}"


class DiskGrace:
    """Jobs whose checkpoints the coordinator's disk refuses, since when (ms)."""

    def __init__(self, grace_s: float = DISK_GRACE_S):
        self.grace_ms = int(grace_s * 1000)
        self._since: dict[str, int] = {}

    def refused(self, job_id: str, step: int, reason: str, now_ms: int) -> str | None:
        """None: the job fails now (refused for the whole grace); else what to say in its log
        ("" once said)."""
        since = self._since.setdefault(job_id, now_ms)
        if now_ms - since >= self.grace_ms:
            del self._since[job_id]
            return None
        if since != now_ms:
            return ""
        return (f"checkpoint {step} cannot be stored on the coordinator yet: {reason}; the rank "
                "keeps it and sends it again, and the job trains on (it fails if none can be "
                f"stored for {self.grace_ms / 60000:.0f} min)")

    def stored(self, job_id: str) -> None:
        self._since.pop(job_id, None)
