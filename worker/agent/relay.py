"""What a rank reports, relayed to the coordinator.

A relay thread tails the rank's metrics file (worker/rank/events.py), forwards progress, uploads
each completed checkpoint (rank 0's, or each stage's piece of a pipeline's replica 0), relays the
rank's output (rank.log, for `herd logs`), and reports the exit last, after every upload, so a
job is never marked done before its final adapter is stored.

The coordinator may be restarting (or unreachable) meanwhile; the rank trains on, and nothing it
reports is lost: checkpoints and the exit are re-delivered until the coordinator takes them (both
are idempotent there), and reports (progress and logs) are kept in order and all sent once it is
back, so `herd watch`, the dashboard and the pulled metrics.jsonl have no gap. Only the
coordinator's own word ends the retries: a StopJob for this rank (it no longer wants its reports),
or a refusal that another try cannot change (a full disk, an unknown job).
"""

from __future__ import annotations

import dataclasses
import shutil
import signal
import subprocess
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable

from herd.errors import HerdError, PeerLostError, StorageError
from herd.stage_cut import StagePiece
from worker.agent import convert
from worker.agent.coordinator_client import MANIFEST, CoordinatorClient
from worker.agent.domain import Progress, RankSpec
from worker.pipeline.topology import saved_piece
from worker.rank import events
from worker.rank.events import (
    CheckpointSaved,
    LinkProbe,
    RankFailed,
    TestReport,
    TrainReport,
    ValReport,
)


def _window_iterations(event: TrainReport) -> int:
    """The iterations a train report's timings cover (none for a pipeline stage's report)."""
    if not event.iterations_per_second or not event.step_seconds:
        return 0
    return round(event.iterations_per_second * event.step_seconds)

# Re-delivery: the wait between tries doubles up to this cap while the coordinator is away.
RETRY_CAP_S = 10.0
# Refusals that another try cannot change get this many tries (a transient disk error may pass).
REFUSED_TRIES = 3
# Reports kept while the coordinator is away: a report every ~10 s for ~14 h (a few hundred bytes
# each); beyond it the oldest go, counted.
MAX_PENDING_REPORTS = 5000
EXIT_READ_S = 60.0  # after the rank exited: how long failed turns may delay its exit report
TROUBLE_LOG_S = 30.0


def _share(event: TrainReport) -> dict:
    """This rank's part of the data-parallel split the report names, and its measured speed."""
    shares, rates, r = event.shares or [], event.rank_rates or [], event.rank
    return {"share": shares[r] if r < len(shares) else 0,
            "items_per_second": rates[r] if r < len(rates) else 0.0}


def drop_older(delivered: Path) -> None:
    """Once the coordinator holds checkpoint ``delivered``, the worker's own copies of the older
    ones go: the coordinator keeps every checkpoint it took (and serves a restart's resume), and
    a second copy of each, kept per attempt, filled a worker's disk on a long job until the job
    failed (an outside run). The newest stays: it is the rank's ``latest``."""
    if not delivered.name.isdigit():
        return
    for old in delivered.parent.iterdir():
        if old.is_dir() and old.name.isdigit() and int(old.name) < int(delivered.name):
            shutil.rmtree(old, ignore_errors=True)


def link_rate(bits_per_second: float) -> str:
    """Gbit/s, or Mbit/s below one (a 5 Mbit/s link read "0.00 Gbit/s": an outside run)."""
    if bits_per_second >= 1e9:
        return f"{bits_per_second / 1e9:.2f} Gbit/s"
    return f"{bits_per_second / 1e6:.3g} Mbit/s"


class Relay:
    """Relays one rank process's events until it exits, then reports the exit."""

    def __init__(self, spec: RankSpec, worker_id: str, folder: Path, client: CoordinatorClient,
                 stopping: threading.Event, stop: Callable[[], object], log,
                 stop_reason: Callable[[], str] = lambda: "",
                 abandoned: threading.Event | None = None):
        self.spec, self.worker_id, self.dir = spec, worker_id, folder
        self._client = client
        self._stopping = stopping  # set when the agent stops the rank itself
        self._stop = stop  # stops the rank (when the coordinator says so)
        self._stop_reason = stop_reason  # why the agent stopped it (its watchdog, say)
        self._abandoned = abandoned or threading.Event()  # the coordinator wants no more
        self.log = log
        self.progress = Progress()
        self.error = ""  # the rank's own error event, the best reason to report
        self._flush_wait, self._next_flush = 0.5, 0.0  # backoff while the coordinator is away
        self.last_refusal = ""
        self._pending: deque = deque()  # reports the coordinator has not taken, in order
        self._dropped = 0  # reports lost because the queue was full
        self._log_sent = 0  # bytes of rank.log relayed so far
        self._log_at = 0.0
        self._log_refused = ""  # why the coordinator last refused a log piece, said once
        self._troubled_since = self._troubled_said = 0.0  # failed turns of run(), for the log

    def _deliver(self, what: str, call: Callable[[], object]) -> bool:
        """Calls until the coordinator takes it: True when it did, False when it refused for good
        or the coordinator no longer wants this rank's reports."""
        wait, refused = 0.5, 0
        while not self._abandoned.is_set():
            try:
                call()
                return True
            except (PeerLostError, StorageError, OSError) as e:
                # Unreachable or restarting, or its disk full: it comes back, or it fails the
                # job and says so (a StopJob, which ends this). OSError: this machine's own
                # trouble reading the files (out of file descriptors): it passes.
                self.log.warning("delivery_retry", what=what, error=str(e),
                                 retry_in=round(wait, 1))
            except HerdError as e:
                refused += 1
                self.log.warning("delivery_refused", what=what, try_=refused, error=e.message)
                if refused >= REFUSED_TRIES:
                    self.last_refusal = e.message
                    return False
            self._abandoned.wait(wait)
            wait = min(RETRY_CAP_S, wait * 2)
        self.log.info("delivery_abandoned", what=what)
        return False

    def _answer(self, stop: bool) -> None:
        if stop and not self._stopping.is_set():
            self.log.info("rank_stop_requested_by_coordinator")
            threading.Thread(target=self._stop, daemon=True).start()

    def _flush(self, force: bool = False) -> None:
        """Sends what is pending, in order, once; what fails stays pending (tried again after a
        growing wait, or with the next report)."""
        if not force and time.monotonic() < self._next_flush:
            return
        try:
            self._send_pending()
            self._flush_wait, self._next_flush = 0.5, 0.0
        except HerdError as e:
            # The coordinator may be restarting: kept, and sent later.
            self.log.warning("report_failed", error=str(e), pending=len(self._pending),
                             retry_in=round(self._flush_wait, 1))
            self._next_flush = time.monotonic() + self._flush_wait
            self._flush_wait = min(RETRY_CAP_S, self._flush_wait * 2)

    def _send(self, request) -> None:
        if len(self._pending) >= MAX_PENDING_REPORTS:
            self._pending.popleft()
            self._dropped += 1
            if self._dropped == 1:
                self.log.warning("reports_dropped", kept=MAX_PENDING_REPORTS,
                                 reason="the coordinator has been away for long")
        self._pending.append(request)
        self._flush(force=request.WhichOneof("report") != "progress")

    def handle(self, event: events.Event) -> None:
        spec = self.spec
        match event:
            case TrainReport():
                self.progress = dataclasses.replace(
                    self.progress, iteration=event.iteration, train_loss=event.train_loss,
                    learning_rate=event.learning_rate, tokens_per_second=event.tokens_per_second,
                    trained_tokens=event.trained_tokens, peak_memory_gb=event.peak_memory_gb,
                    exchange=event.exchange, world_size=event.world_size,
                    window_iterations=_window_iterations(event),
                    window_seconds=event.step_seconds or 0.0,
                    window_exchange_seconds=event.exchange_seconds or 0.0,
                    window_exchange_bytes=event.exchange_bytes or 0,
                    **_share(event))
                self._send(convert.progress_report(spec, self.worker_id, self.progress))
            case ValReport():
                # A window is counted once, with its train report (the coordinator sums them).
                self.progress = dataclasses.replace(
                    self.progress, val_loss=event.val_loss, window_iterations=0,
                    window_seconds=0.0, window_exchange_seconds=0.0, window_exchange_bytes=0)
                # Its own iteration, flagged: `herd watch` shows it as a validation line.
                val = dataclasses.replace(self.progress, iteration=event.iteration)
                self._send(convert.progress_report(spec, self.worker_id, val, validation=True))
            case CheckpointSaved() if spec.pipelined:
                piece = saved_piece(spec.rank, spec.world_size, spec.data_parallel,
                                    spec.stage_layers)
                if piece is not None:  # replica 0's stages each upload their own piece
                    self._upload(event.step, event.path, piece)
            case CheckpointSaved() if spec.rank == 0:
                self._upload(event.step, event.path)
            case TestReport() if spec.rank == 0:  # `test: true`: every rank holds the same sum
                self._send(convert.log_report(
                    spec, self.worker_id, f"test loss {event.test_loss:.3f}, test ppl "
                    f"{event.test_ppl:.3f} (mlx_lm.lora's figures for the test set)"))
            case LinkProbe():
                rate = (f"{link_rate(event.bits_per_second)} over {event.seconds:.2f} s"
                        if event.bits_per_second is not None else f"failed: {event.error}")
                self._send(convert.log_report(
                    spec, self.worker_id, f"link probe: rank {event.rank} ({self.worker_id}) -> "
                    f"rank {event.peer} at {event.address}: {rate}"))
            case RankFailed():
                self.error = event.message
                self._send(convert.log_report(spec, self.worker_id,
                                              f"rank {spec.rank}: {event.message}"))
            case _:
                pass  # other ranks' checkpoints, done, stage timings: nothing to relay

    def _upload(self, step: int, path: str | None, piece: StagePiece | None = None) -> None:
        folder = Path(path) if path else None
        if folder is None or not (folder / MANIFEST).exists():
            folder = self.dir / "adapters" / "checkpoints" / f"{step:07d}"
        if not (folder / MANIFEST).exists():
            self._send(convert.log_report(self.spec, self.worker_id,
                                          f"checkpoint {step} has no manifest.json; not uploaded"))
            return
        t0 = time.monotonic()
        self.last_refusal = ""
        if self._deliver(f"checkpoint {step}", lambda: self._client.put_checkpoint(
                self.spec.job_id, self.spec.attempt, step, folder, piece)):
            self.log.info("checkpoint_uploaded", step=step,
                          seconds=round(time.monotonic() - t0, 2),
                          stage=piece.index if piece is not None else None)
            drop_older(folder)
        elif self.last_refusal:
            self._send(convert.log_report(
                self.spec, self.worker_id,
                f"checkpoint {step} could not be uploaded: {self.last_refusal}"))

    def run(self, proc: subprocess.Popen, metrics: Path) -> None:
        """Tails ``metrics`` until ``proc`` exits, then reports the exit. Every checkpoint,
        progress line and the exit itself travel here, so a failed turn never ends it: it is
        tried again (an outside run: a flood of connections used up the agent's file
        descriptors, an open() failed, and every later checkpoint stayed on the worker).
        After the rank exited, ``EXIT_READ_S`` of failed turns at most, then the exit is
        reported anyway."""
        offset, buf, todo, exited_at = 0, b"", deque(), None
        while True:
            exited = proc.poll() is not None
            if exited and exited_at is None:
                exited_at = time.monotonic()
            try:
                if metrics.exists():
                    with open(metrics, "rb") as f:
                        f.seek(offset)
                        data = f.read()
                    offset += len(data)
                    *lines, buf = (buf + data).split(b"\n")
                    todo.extend(lines)
                while todo:  # a line leaves only once handled: a failed one is tried again
                    try:
                        event = events.parse(todo[0])
                    except ValueError:
                        self.log.warning("bad_metrics_line", line=todo[0][:200])
                    else:
                        self.handle(event)
                    todo.popleft()
                self._relay_log(final=exited)
                self._troubled_since = 0.0
                if exited:
                    break
                if self._pending:
                    self._flush()
            except OSError as e:
                self._trouble(e)
                if exited and time.monotonic() - exited_at > EXIT_READ_S:
                    break
            time.sleep(0.2 if not self._troubled_since else 1.0)
        self.report_exit(proc.returncode)

    def _trouble(self, error: OSError) -> None:
        """A failed turn, logged once per ``TROUBLE_LOG_S`` (a flood may last minutes)."""
        now = time.monotonic()
        if not self._troubled_since or now - self._troubled_said >= TROUBLE_LOG_S:
            self.log.warning("relay_turn_failed", error=str(error), retry_s=1.0,
                             failing_for_s=round(now - (self._troubled_since or now), 1))
            self._troubled_said = now
        self._troubled_since = self._troubled_since or now

    def _relay_log(self, final: bool, every_s: float = 1.0, chunk: int = 256 * 1024) -> None:
        """Sends what the rank wrote to rank.log since the last call (at most every ``every_s``
        while it runs; everything once it has exited)."""
        if not final and time.monotonic() - self._log_at < every_s:
            return
        self._log_at = time.monotonic()
        try:
            self._send_log(final, chunk)
        except OSError:
            pass
        except HerdError as e:  # the coordinator may be restarting: the next call resends
            # (once per kind of refusal: a full disk lasts minutes, its free MB change)
            if type(e).__name__ != self._log_refused:
                self.log.warning("rank_log_relay_failed", error=str(e))
            self._log_refused = type(e).__name__
        else:
            self._log_refused = ""

    def _send_log(self, final: bool, chunk: int = 256 * 1024) -> None:
        """rank.log from where the last piece the coordinator stored ended (one piece, or all
        of it when ``final``); HerdError when the coordinator does not take one."""
        with open(self.dir / "rank.log", "rb") as f:
            f.seek(self._log_sent)
            while data := f.read(chunk):
                self._client.report(convert.rank_log_report(self.spec, self.worker_id,
                                                            self._log_sent, data))
                self._log_sent += len(data)  # only once stored: a failed piece is resent
                if not final:
                    break

    def _send_pending(self) -> None:
        """Every pending report, in order; HerdError (the rest kept) when one is not taken."""
        while self._pending:
            self._answer(self._client.report(self._pending[0]))
            self._pending.popleft()

    def _last_error(self) -> str:
        """The rank's last plain stderr line (its structured log lines are not an error)."""
        try:
            lines = (self.dir / "rank.log").read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        plain = [ln for ln in lines if ln.strip() and not ln.lstrip().startswith("{")]
        errs = [ln for ln in plain if "Error" in ln or "error" in ln]
        return (errs[-1] if errs else (plain[-1] if plain else ""))[-500:]

    def report_exit(self, code: int) -> None:
        error = "" if code == 0 else (self.error or self._last_error())
        if code < 0 and not self.error:
            error = f"killed by {_signal_name(-code)}"
        if self._stopping.is_set() and code != 0 and (code < 0 or not error):
            # (stopped: a signal; a rank that exited with a code of its own said why itself)
            error = self._stop_reason() or "stopped by the agent"
        self.log.info("rank_exited", exit_code=code, error=error)
        # What the rank reported and wrote while the coordinator was away, then its exit: each
        # retried until taken (tried once, the reports of a rank that ended during a coordinator
        # restart or cut were lost, though the README promises them: an outside run).
        self._deliver("reports", self._send_pending)
        self._deliver("rank log", self._final_log)
        request = convert.exit_report(self.spec, self.worker_id, code, error)
        self._deliver("exit report", lambda: self._client.report(request))

    def _final_log(self) -> None:
        try:
            self._send_log(final=True)
        except OSError as e:  # (none written, or unreadable: it must not hold up the exit)
            self.log.warning("rank_log_unreadable", error=str(e))


def _signal_name(number: int) -> str:
    """SIGKILL, or "signal 40" for one Python has no name for (a real-time signal: it raised,
    and the exit report went out only through the relay's fallback: a review)."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
