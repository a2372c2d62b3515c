"""The cluster's metrics stream: every job event the scheduler records, followed in order.

One thread tails the JobStore (``events_after``, woken by the scheduler's own change signal) and
keeps, per job, what the dashboard draws and /metrics exports: the latest progress of each rank,
the loss / tok/s / memory series, the step time split, checkpoints, the event log and the
counters. Listeners (the dashboard's live streams, the TensorBoard writer) get each change as a
plain dict. Nothing here runs on the training path: ranks report to their agents as before, and
the agents to the scheduler; this only reads what the scheduler stored.

It starts from the first stored event, so a restarted coordinator's counters and charts come back.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from dataclasses import dataclass, field
from typing import Callable

from coordinator.domain import EventKind, FetchProgress, JobEvent, JobState, RankProgress
from coordinator.store import JobStore
from herd import log
from herd.errors import NotFoundError
from herd.models.source import fetch_line

logger = log.get(__name__)
MAX_POINTS = 4000  # per job and series; older points are thinned, never the newest
LOG_LINES = 300
Listener = Callable[[dict], None]


def split_step_time(windows: dict[int, tuple[int, float, float]]) -> dict[int, dict[str, float]]:
    """Each rank's seconds per iteration as compute / exchange / wait, from one report window of
    every rank: ``{rank: (iterations, seconds, exchange_seconds)}``.

    A collective ends for everyone about when the last rank reaches it, so the rank that spent the
    least time in the exchange arrived last and waited for nobody: its exchange time is the
    transfer itself, and any rank's exchange time beyond it is waiting for the slowest rank.
    (Measured without a barrier, which would cost the training path.)"""
    per = {r: (s / n, x / n) for r, (n, s, x) in windows.items() if n > 0}
    if not per:
        return {}
    transfer = min(x for _, x in per.values())
    return {r: {"compute": max(s - x, 0.0), "exchange": transfer, "wait": x - transfer}
            for r, (s, x) in per.items()}


def _thin(points: list) -> None:
    """Halve the older half of a series (every other point), keeping its shape and its end."""
    if len(points) > MAX_POINTS:
        half = len(points) // 2
        points[:half] = points[:half:2]


@dataclass
class RankCounters:
    step_seconds: float = 0.0
    exchange_seconds: float = 0.0
    exchange_bytes: int = 0


@dataclass
class JobView:
    job_id: str
    name: str = ""
    model: str = ""
    iters: int = 0
    state: str = JobState.QUEUED.value
    message: str = ""
    attempt: int = 0
    created_ms: int = 0
    updated_ms: int = 0
    worker_ids: list[str] = field(default_factory=list)
    ranks: dict[int, RankProgress] = field(default_factory=dict)
    points: list[dict] = field(default_factory=list)  # one per rank report
    timing: list[dict] = field(default_factory=list)  # mean split over ranks, per report window
    split: dict[int, dict[str, float]] = field(default_factory=dict)  # the latest, per rank
    checkpoints: list[dict] = field(default_factory=list)
    fetching: dict[int, FetchProgress] = field(default_factory=dict)  # rank -> its latest fetch
    log: collections.deque = field(default_factory=lambda: collections.deque(maxlen=LOG_LINES))
    # Counters (monotonic): an iteration redone after a restart counts once.
    iterations_done: int = 0
    tokens_done: int = 0
    restarts: int = 0
    checkpoint_bytes: int = 0
    rank_counters: dict[tuple[int, str], RankCounters] = field(default_factory=dict)
    # The current attempt's first and latest (time, iteration), for the ETA.
    _rate_base: tuple[int, int] | None = None
    _rate_last: tuple[int, int] | None = None
    _windows: dict[int, dict[int, tuple[int, float, float]]] = field(default_factory=dict)
    # (rank, iteration) -> the iterations its charted train loss covers (coordinator/reports.py)
    _charted: dict[tuple[int, int], int] = field(default_factory=dict)
    # ``ranks`` are the attempt before's until the new one reports (then only its own: a shrunk
    # job showed its old iteration, and /metrics its gone ranks, for good: a review)
    _old_ranks: bool = False

    @property
    def iteration(self) -> int:
        return max((p.iteration for p in self.ranks.values()), default=0)

    def eta_s(self) -> float | None:
        if self.state not in ("running", "placing") or not (self._rate_base and self._rate_last):
            return None
        (t0, i0), (t1, i1) = self._rate_base, self._rate_last
        if i1 <= i0 or t1 <= t0:
            return None
        return (self.iters - i1) * (t1 - t0) / 1000 / (i1 - i0)

    def summary(self) -> dict:
        loss = next((p.train_loss for r, p in sorted(self.ranks.items()) if p.train_loss), None)
        return {
            "id": self.job_id, "name": self.name, "model": self.model, "state": self.state,
            "message": self.message, "iteration": self.iteration, "iters": self.iters,
            "progress": self.iteration / self.iters if self.iters else 0.0,
            "eta_s": self.eta_s(), "restarts": self.restarts, "attempt": self.attempt,
            "workers": self.worker_ids, "train_loss": loss, "created_ms": self.created_ms,
            "updated_ms": self.updated_ms, "checkpoints": len(self.checkpoints),
            "tokens": self.tokens_done,
        }

    def detail(self) -> dict:
        """A snapshot: the lists are copied (the hub's thread appends to them)."""
        return {**self.summary(), "points": list(self.points), "timing": list(self.timing),
                "split": {str(r): s for r, s in sorted(self.split.items())},
                "ranks": [dataclasses.asdict(p) for _, p in sorted(self.ranks.items())],
                "checkpoint_list": list(self.checkpoints), "log": list(self.log)}


class MetricsHub:
    def __init__(self, store: JobStore, wait_for_events: Callable[[float], None]):
        self.store = store
        self._wait = wait_for_events
        self._lock = threading.Lock()
        self._jobs: dict[str, JobView] = {}
        self._removed: set[str] = set()  # (ids are never reused: a late event finds it here)
        self._listeners: list[Listener] = []
        self.cursor = 0

    # --- reading (any thread) --------------------------------------------------------------

    def jobs(self) -> list[dict]:
        with self._lock:
            return [j.summary() for j in sorted(self._jobs.values(),
                                                key=lambda j: (-j.created_ms, j.job_id))]

    def job(self, job_id: str) -> dict:
        with self._lock:
            view = self._jobs.get(job_id)
            if view is None:
                raise NotFoundError(f"no job {job_id!r}", hint="`herd jobs` lists the jobs")
            return view.detail()

    def views(self) -> list[JobView]:
        """Copies of the job views, for /metrics (scraped from another thread)."""
        with self._lock:
            return [dataclasses.replace(j, ranks=dict(j.ranks),
                                        rank_counters={k: dataclasses.replace(c) for k, c
                                                       in j.rank_counters.items()})
                    for j in self._jobs.values()]

    def subscribe(self, listener: Listener, job_id: str | None = None) -> dict | None:
        """Adds a listener; returns ``job_id``'s detail as of the moment it was added, so the
        listener's first change is the next one (no gap, no repeat)."""
        with self._lock:
            self._listeners.append(listener)
            view = self._jobs.get(job_id) if job_id else None
            return view.detail() if view else None

    def forget(self, job_id: str) -> None:
        """A removed job (herd rm): off the dashboard, its API and /metrics (they listed it, with
        download links that 404, until the coordinator restarted: an outside run)."""
        with self._lock:
            self._jobs.pop(job_id, None)
            self._removed.add(job_id)

    def unsubscribe(self, listener: Listener) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    # --- following the store ---------------------------------------------------------------

    def poll(self) -> int:
        """Applies the events stored since the last call; returns how many."""
        batch = self.store.events_after(self.cursor)
        for cursor, event in batch:
            self._apply(event)
            self.cursor = cursor
        return len(batch)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                if not self.poll():
                    self._wait(1.0)
            except Exception:  # the dashboard must outlive one bad event; logged in full
                logger.exception("metrics_hub_failed")
                stop.wait(1.0)

    def _view(self, job_id: str) -> JobView:
        view = self._jobs.get(job_id)
        if view is None:
            view = self._jobs[job_id] = JobView(job_id)
            self._refresh(view)
        return view

    def _refresh(self, view: JobView) -> None:
        try:
            job = self.store.get_job(view.job_id)
        except NotFoundError:
            return
        view.name, view.model, view.iters = job.name, job.config.model, job.iters
        view.attempt, view.worker_ids = job.attempt, list(job.worker_ids)
        view.created_ms = job.created_ms

    def _apply(self, e: JobEvent) -> None:
        with self._lock:
            if e.job_id in self._removed:  # (a batch read before `herd rm`: no ghost view)
                return
            view = self._view(e.job_id)
            view.updated_ms = e.time_ms
            change = {"job_id": e.job_id, "seq": e.seq, "time_ms": e.time_ms,
                      "kind": e.kind.value}
            if e.kind is EventKind.STATE:
                change.update(self._on_state(view, e))
            elif e.kind is EventKind.PROGRESS and e.progress is not None:
                change.update(self._on_progress(view, e.time_ms, e.progress))
            elif e.kind is EventKind.CHECKPOINT:
                change.update(self._on_checkpoint(view, e))
            elif e.kind is EventKind.FETCH and e.fetch is not None and view.state == "placing":
                # the fetch phase, as `herd watch` sums it (the page said nothing for minutes)
                view.fetching[e.fetch.rank] = e.fetch
                view.message = change["message"] = fetch_line(view.fetching.values())
            elif (e.kind is EventKind.LOG and e.message.startswith("waiting: ")
                  and view.state and JobState(view.state).waiting):
                # why a job waits, as `herd jobs` says it (the page said "submitted by ...")
                view.message = change["message"] = e.message
            text = e.message
            if e.state is not None:
                text = e.state.value + (f": {e.message}" if e.message else "")
            if text:
                line = {"seq": e.seq, "time_ms": e.time_ms, "kind": e.kind.value,
                        "message": text,
                        "level": "error" if e.state is JobState.FAILED else "info"}
                view.log.append(line)
                change["log"] = line
            change["summary"] = view.summary()
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(change)
            except Exception:  # one broken listener must not stop the others
                logger.exception("metrics_listener_failed", job_id=e.job_id)

    def _on_state(self, view: JobView, e: JobEvent) -> dict:
        view.state, view.message = e.state.value, e.message
        view.fetching.clear()  # (a new attempt fetches again; running: done)
        if e.state is JobState.RESTARTING:
            view.restarts += 1
        if e.state in (JobState.PLACING, JobState.QUEUED, JobState.RESTARTING):
            self._refresh(view)  # a new attempt: its workers; the ETA starts over
            view._old_ranks = True
            view._rate_base = view._rate_last = None
            view._windows.clear()
        return {"state": e.state.value, "message": e.message}

    def _on_progress(self, view: JobView, time_ms: int, p: RankProgress) -> dict:
        if view._old_ranks:
            view.ranks.clear()
            view.split.clear()
            view._old_ranks = False
        before = view.ranks.get(p.rank)
        view.ranks[p.rank] = p
        point = {"it": p.iteration, "rank": p.rank, "worker": p.worker_id, "t": time_ms,
                 "loss": p.train_loss or None, "val": None, "tps": p.tokens_per_second,
                 "mem": p.peak_memory_gb, "lr": p.learning_rate}
        # A report carries the last val loss until the next validation: a new one is a val point.
        if p.validation or (p.val_loss and (before is None or p.val_loss != before.val_loss)):
            point.update(loss=None, val=p.val_loss)
        elif view._charted.get((p.rank, p.iteration), 0) > p.window_iterations:
            point = None  # a resumed attempt's short first window: the full one is charted
        else:
            view._charted[(p.rank, p.iteration)] = p.window_iterations
        if point is not None:
            view.points.append(point)
            _thin(view.points)
        # Counters: iterations and tokens move forward only (a redone iteration counts once).
        if p.iteration > view.iterations_done:
            view.iterations_done = p.iteration
        if p.trained_tokens > view.tokens_done:
            view.tokens_done = p.trained_tokens
        change: dict = {"point": point} if point is not None else {}
        if p.window_iterations:
            c = view.rank_counters.setdefault((p.rank, p.worker_id), RankCounters())
            c.step_seconds += p.window_seconds
            c.exchange_seconds += p.window_exchange_seconds
            c.exchange_bytes += p.window_exchange_bytes
            if p.rank == 0:
                base = (time_ms, p.iteration)
                view._rate_base = view._rate_base or base
                view._rate_last = base
            timing = self._on_window(view, p)
            if timing:
                change["timing"] = timing
        return change

    def _on_window(self, view: JobView, p: RankProgress) -> dict | None:
        """Collects the report windows of one iteration; once every rank's is in, the split."""
        windows = view._windows.setdefault(p.iteration, {})
        windows[p.rank] = (p.window_iterations, p.window_seconds, p.window_exchange_seconds)
        if len(windows) < max(p.world_size, 1):
            return None
        del view._windows[p.iteration]
        for it in [i for i in view._windows if i < p.iteration]:  # a rank's report was lost
            del view._windows[it]
        view.split = split_step_time(windows)
        if not view.split:
            return None
        n = len(view.split)
        point = {"it": p.iteration, **{k: sum(s[k] for s in view.split.values()) / n
                                       for k in ("compute", "exchange", "wait")}}
        view.timing.append(point)
        _thin(view.timing)
        return {**point, "split": {str(r): s for r, s in view.split.items()}}

    def _on_checkpoint(self, view: JobView, e: JobEvent) -> dict:
        stored = {c.step: c for c in self.store.checkpoints(e.job_id)}
        c = stored.get(e.step)
        size = sum(f.bytes for f in c.files) if c else 0
        entry = {"step": e.step, "bytes": size, "time_ms": e.time_ms}
        view.checkpoints = [x for x in view.checkpoints if x["step"] != e.step] + [entry]
        view.checkpoint_bytes += size
        return {"checkpoint": entry}
