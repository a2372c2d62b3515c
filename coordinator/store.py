"""JobStore: jobs, attempts, events and checkpoints in SQLite in the coordinator's state dir.

A coordinator restarted on the same state dir sees everything it knew, including which ranks of
a running attempt already finished. Schema changes go through the small migration table below:
append a step, never edit one.

SQLite errors (a full disk, an I/O error) become StorageError naming the database and its disk's
free space, and ``health`` says so until a write succeeds again: the coordinator reports a state,
not a traceback per call.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import sqlite3
import threading
from pathlib import Path

from coordinator.domain import (
    Checkpoint,
    EventKind,
    FetchProgress,
    FileDigest,
    Job,
    JobEvent,
    JobState,
    RankProgress,
)
from herd.config import JobConfig, config_from_yaml, config_to_yaml
from herd.errors import NotFoundError, StorageError
from herd.terminal import shown

_MIGRATIONS = [
    """
    CREATE TABLE jobs (
        job_id TEXT PRIMARY KEY, name TEXT NOT NULL, config_yaml TEXT NOT NULL,
        dataset TEXT NOT NULL, workers_needed INTEGER NOT NULL, iters INTEGER NOT NULL,
        state TEXT NOT NULL, message TEXT NOT NULL, created_ms INTEGER NOT NULL,
        updated_ms INTEGER NOT NULL, attempt INTEGER NOT NULL, worker_ids TEXT NOT NULL);
    CREATE TABLE attempts (
        job_id TEXT NOT NULL, attempt INTEGER NOT NULL, worker_ids TEXT NOT NULL,
        started_ms INTEGER NOT NULL, ended_ms INTEGER, outcome TEXT,
        PRIMARY KEY (job_id, attempt));
    CREATE TABLE events (
        job_id TEXT NOT NULL, seq INTEGER NOT NULL, time_ms INTEGER NOT NULL, kind TEXT NOT NULL,
        state TEXT, message TEXT NOT NULL, progress TEXT, step INTEGER NOT NULL,
        PRIMARY KEY (job_id, seq));
    CREATE TABLE checkpoints (
        job_id TEXT NOT NULL, step INTEGER NOT NULL, files TEXT NOT NULL,
        created_ms INTEGER NOT NULL, PRIMARY KEY (job_id, step));
    """,
    """
    ALTER TABLE jobs ADD COLUMN model_digest TEXT NOT NULL DEFAULT '';
    ALTER TABLE events ADD COLUMN fetch TEXT;
    """,
    # Ranks that finished, so a restarted coordinator still knows which ranks of an attempt it
    # re-adopts are done.
    """
    CREATE TABLE rank_exits (
        job_id TEXT NOT NULL, attempt INTEGER NOT NULL, rank INTEGER NOT NULL,
        exit_code INTEGER NOT NULL, time_ms INTEGER NOT NULL,
        PRIMARY KEY (job_id, attempt, rank));
    """,
    # A resume_adapter_file shipped with the job (JSON of its FileDigest; '' = none).
    "ALTER TABLE jobs ADD COLUMN resume_adapter TEXT NOT NULL DEFAULT ''",
    # The model's config.json as the laptop read it at submit (JSON; '' = none sent).
    "ALTER TABLE jobs ADD COLUMN model_config TEXT NOT NULL DEFAULT ''",
    # The cursor the dashboard and /metrics follow every job's events by (events_after): a
    # rowid was reused once `herd rm` deleted the newest rows, and the next job's events, below
    # a cursor already passed, never reached them (an outside run). AUTOINCREMENT never reuses.
    """
    CREATE TABLE events_by_cursor (
        cursor INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id TEXT NOT NULL, seq INTEGER NOT NULL, time_ms INTEGER NOT NULL, kind TEXT NOT NULL,
        state TEXT, message TEXT NOT NULL, progress TEXT, step INTEGER NOT NULL, fetch TEXT,
        UNIQUE (job_id, seq));
    INSERT INTO events_by_cursor
        (cursor, job_id, seq, time_ms, kind, state, message, progress, step, fetch)
        SELECT rowid, job_id, seq, time_ms, kind, state, message, progress, step, fetch
        FROM events ORDER BY rowid;
    DROP TABLE events;
    ALTER TABLE events_by_cursor RENAME TO events;
    """,
    # The pipeline stages an attempt was laid out in (1: data parallel; 0: recorded before
    # this), so a stage piece is taken only from a pipeline's stage (an outside run: rank 1 of a
    # data-parallel job stored "stage 1" pieces, and --resume-from read the job as a pipeline's).
    "ALTER TABLE attempts ADD COLUMN stages INTEGER NOT NULL DEFAULT 0",
]


@dataclasses.dataclass(frozen=True)
class Attempt:
    attempt: int
    worker_ids: list[str]
    started_ms: int
    ended_ms: int | None
    outcome: str | None
    stages: int = 0  # pipeline stages (1: data parallel; 0: not recorded)


def _guarded(write: bool):
    """SQLite errors as StorageError; a write that succeeds again clears ``health``."""

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(self, *args, **kw):
            try:
                result = fn(self, *args, **kw)
            except sqlite3.Error as e:
                raise self._storage_error(e) from None
            if write and self.health:
                self.health = ""
            return result

        return wrapper

    return deco


def _job(row: sqlite3.Row, config: JobConfig) -> Job:
    return Job(
        job_id=row["job_id"], name=row["name"], config=config,
        dataset=[FileDigest(**d) for d in json.loads(row["dataset"])],
        workers_needed=row["workers_needed"], iters=row["iters"], state=JobState(row["state"]),
        message=row["message"], created_ms=row["created_ms"], updated_ms=row["updated_ms"],
        attempt=row["attempt"], worker_ids=json.loads(row["worker_ids"]),
        model_digest=row["model_digest"],
        resume_adapter=FileDigest(**json.loads(row["resume_adapter"]))
        if row["resume_adapter"] else None,
        model_config=json.loads(row["model_config"]) if row["model_config"] else None,
    )


def _event(row: sqlite3.Row) -> JobEvent:
    return JobEvent(
        job_id=row["job_id"], seq=row["seq"], time_ms=row["time_ms"], kind=EventKind(row["kind"]),
        state=JobState(row["state"]) if row["state"] else None, message=row["message"],
        progress=RankProgress(**json.loads(row["progress"])) if row["progress"] else None,
        step=row["step"],
        fetch=FetchProgress(**json.loads(row["fetch"])) if row["fetch"] else None,
    )


DATABASE = "herd.db"  # the job database's file name in the coordinator's state folder


class JobStore:
    """Thread-safe: one connection, one lock (the coordinator's write rate is tiny)."""

    def __init__(self, path: Path):
        self.path = path
        self.health = ""  # why the database cannot be written, while it cannot
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # Configs parsed once, by their text: the control loop loads every job several times a
        # tick, and a stored job's config never changes (a JobConfig is never changed in place).
        self._configs: dict[str, JobConfig] = {}
        try:  # (a full or read-only disk: a StorageError naming it, not sqlite's traceback)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._migrate()
        except sqlite3.Error as e:
            raise self._storage_error(e) from None

    def _migrate(self) -> None:
        with self._lock:
            self._db.execute("CREATE TABLE IF NOT EXISTS migrations (version INTEGER PRIMARY KEY)")
            done = {r[0] for r in self._db.execute("SELECT version FROM migrations")}
            for version, sql in enumerate(_MIGRATIONS, start=1):
                if version in done:
                    continue
                self._db.executescript(
                    f"BEGIN; {sql}; INSERT INTO migrations VALUES ({version}); COMMIT;")

    def _storage_error(self, e: sqlite3.Error) -> StorageError:
        try:
            free = f"{shutil.disk_usage(self.path.parent).free / 1e6:.1f} MB free"
        except OSError:
            free = "its disk unreadable"
        self.health = (f"the job database {self.path} cannot be written: {e} ({free} on its "
                       "disk)")
        return StorageError(self.health, hint=f"free space on the disk holding {self.path.parent} "
                            "(the coordinator's --state-dir); it carries on once it can write")

    @_guarded(write=True)
    def check_writable(self) -> None:
        """A write that reaches the disk (a WAL frame), or StorageError."""
        with self._lock:
            self._db.execute("CREATE TABLE IF NOT EXISTS writable (at INTEGER)")
            self._db.execute("INSERT INTO writable VALUES (1)")
            self._db.execute("DELETE FROM writable")

    def schema_version(self) -> int:
        with self._lock:
            return self._db.execute("SELECT MAX(version) FROM migrations").fetchone()[0] or 0

    # --- jobs ------------------------------------------------------------------------------

    @_guarded(write=True)
    def put_job(self, job: Job) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO jobs VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (job.job_id, job.name, config_to_yaml(job.config),
                 json.dumps([dataclasses.asdict(d) for d in job.dataset]), job.workers_needed,
                 job.iters, job.state.value, shown(job.message), job.created_ms, job.updated_ms,
                 job.attempt, json.dumps(job.worker_ids), job.model_digest,
                 json.dumps(dataclasses.asdict(job.resume_adapter)) if job.resume_adapter
                 else "", json.dumps(job.model_config) if job.model_config else ""),
            )

    def _config(self, row: sqlite3.Row) -> JobConfig:
        text = row["config_yaml"]
        if (config := self._configs.get(text)) is None:
            config = self._configs[text] = config_from_yaml(text, f"job {row['job_id']}",
                                                            stored=True)
        return config

    @_guarded(write=False)
    def get_job(self, job_id: str) -> Job:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE job_id=?", (job_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no job {job_id!r}", hint="`herd jobs` lists the jobs")
        return _job(row, self._config(row))

    @_guarded(write=False)
    def list_jobs(self) -> list[Job]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM jobs ORDER BY created_ms DESC, job_id").fetchall()
        return [_job(r, self._config(r)) for r in rows]

    @_guarded(write=True)
    def delete_job(self, job_id: str) -> None:
        """Forgets the job: its row, attempts, events, checkpoint records and rank exits (files
        are the AdapterStore's), all or none. A DELETE that failed used to leave the shared
        connection inside the transaction: every later write went into it, lost at the next
        stop, and every later `herd rm` failed (a review)."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                for table in ("jobs", "attempts", "events", "checkpoints", "rank_exits"):
                    self._db.execute(f"DELETE FROM {table} WHERE job_id=?", (job_id,))
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    # --- attempts --------------------------------------------------------------------------

    @_guarded(write=True)
    def start_attempt(self, job_id: str, attempt: int, worker_ids: list[str], now_ms: int,
                      stages: int = 0) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO attempts VALUES (?,?,?,?,NULL,NULL,?)",
                             (job_id, attempt, json.dumps(worker_ids), now_ms, stages))

    @_guarded(write=True)
    def end_attempt(self, job_id: str, attempt: int, outcome: str, now_ms: int) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE attempts SET ended_ms=?, outcome=? WHERE job_id=? AND attempt=? "
                "AND ended_ms IS NULL", (now_ms, outcome, job_id, attempt))

    @_guarded(write=False)
    def attempts(self, job_id: str) -> list[tuple[int, list[str], str | None]]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM attempts WHERE job_id=? ORDER BY attempt",
                                    (job_id,)).fetchall()
        return [(r["attempt"], json.loads(r["worker_ids"]), r["outcome"]) for r in rows]

    @_guarded(write=False)
    def attempt_history(self, job_id: str) -> list[Attempt]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM attempts WHERE job_id=? ORDER BY attempt",
                                    (job_id,)).fetchall()
        return [Attempt(r["attempt"], json.loads(r["worker_ids"]), r["started_ms"], r["ended_ms"],
                        r["outcome"], r["stages"]) for r in rows]

    @_guarded(write=True)
    def add_rank_exit(self, job_id: str, attempt: int, rank: int, exit_code: int,
                      now_ms: int) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO rank_exits VALUES (?,?,?,?,?)",
                             (job_id, attempt, rank, exit_code, now_ms))

    @_guarded(write=False)
    def finished_ranks(self, job_id: str, attempt: int) -> set[int]:
        """Ranks of the attempt that exited with 0."""
        with self._lock:
            rows = self._db.execute("SELECT rank FROM rank_exits WHERE job_id=? AND attempt=? "
                                    "AND exit_code=0", (job_id, attempt)).fetchall()
        return {r[0] for r in rows}

    # --- events ----------------------------------------------------------------------------

    @_guarded(write=True)
    def add_event(self, job_id: str, time_ms: int, kind: EventKind, *,
                  state: JobState | None = None, message: str = "",
                  progress: RankProgress | None = None, step: int = 0,
                  fetch: FetchProgress | None = None) -> JobEvent:
        message = shown(message)  # (peers' text, for other users' terminals: herd/terminal.py)
        with self._lock:
            seq = self._db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE job_id=?",
                                   (job_id,)).fetchone()[0]
            self._db.execute(
                "INSERT INTO events (job_id, seq, time_ms, kind, state, message, progress, step, "
                "fetch) VALUES (?,?,?,?,?,?,?,?,?)",
                (job_id, seq, time_ms, kind.value, state.value if state else None, message,
                 json.dumps(dataclasses.asdict(progress)) if progress else None, step,
                 json.dumps(dataclasses.asdict(fetch)) if fetch else None),
            )
        return JobEvent(job_id, seq, time_ms, kind, state, message, progress, step, fetch)

    @_guarded(write=False)
    def events(self, job_id: str, after_seq: int = 0, limit: int = 1000) -> list[JobEvent]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM events WHERE job_id=? AND seq>? ORDER BY seq LIMIT ?",
                (job_id, after_seq, limit)).fetchall()
        return [_event(r) for r in rows]

    @_guarded(write=False)
    def events_after(self, cursor: int, limit: int = 1000) -> list[tuple[int, JobEvent]]:
        """Every job's events in the order they were recorded, after ``cursor`` (0 = from the
        first), each with its cursor, which only grows, even past the events of a removed job
        (AUTOINCREMENT). The dashboard and /metrics follow the whole cluster with it."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM events WHERE cursor>? ORDER BY cursor LIMIT ?",
                (cursor, limit)).fetchall()
        return [(r["cursor"], _event(r)) for r in rows]

    @_guarded(write=False)
    def shown_progress(self, job_id: str, attempt: int) -> list[RankProgress]:
        """Each rank's last progress in ``attempt``, as `herd jobs` shows it; before that attempt
        reports, the job's last (where the attempt before it got). Every attempt's mixed, a
        shrunk job showed its old iteration and its gone ranks (a review)."""
        started = next((a.started_ms for a in reversed(self.attempt_history(job_id))
                        if a.attempt == attempt), 0)
        return self.latest_progress(job_id, started) or self.latest_progress(job_id)

    @_guarded(write=False)
    def latest_progress(self, job_id: str, attempt_start_ms: int = 0) -> list[RankProgress]:
        """The last progress of each rank (rebuilt from events, so it survives a restart)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT progress FROM events WHERE job_id=? AND kind=? AND time_ms>=? ORDER BY seq",
                (job_id, EventKind.PROGRESS.value, attempt_start_ms)).fetchall()
        latest: dict[int, RankProgress] = {}
        for r in rows:
            p = RankProgress(**json.loads(r["progress"]))
            latest[p.rank] = p
        return [latest[k] for k in sorted(latest)]

    # --- checkpoints -----------------------------------------------------------------------

    @_guarded(write=True)
    def add_checkpoint(self, c: Checkpoint) -> None:
        with self._lock:
            files = json.dumps([dataclasses.asdict(f) for f in c.files])
            self._db.execute("INSERT OR REPLACE INTO checkpoints VALUES (?,?,?,?)",
                             (c.job_id, c.step, files, c.created_ms))

    @_guarded(write=False)
    def checkpoints(self, job_id: str) -> list[Checkpoint]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM checkpoints WHERE job_id=? ORDER BY step",
                                    (job_id,)).fetchall()
        return [Checkpoint(r["job_id"], r["step"],
                           [FileDigest(**f) for f in json.loads(r["files"])], r["created_ms"])
                for r in rows]

    @_guarded(write=True)
    def delete_checkpoint(self, job_id: str, step: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM checkpoints WHERE job_id=? AND step=?", (job_id, step))

    def close(self) -> None:
        with self._lock:
            self._db.close()
