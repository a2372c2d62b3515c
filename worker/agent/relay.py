"""What a rank reports, relayed to the coordinator.

A relay thread tails the rank's metrics file (worker/rank/events.py), forwards progress, uploads
each completed checkpoint (rank 0's, or each stage's piece of a pipeline's replica 0), and
reports the exit last, after every upload, so a job is never marked done before its final
adapter is stored.
"""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable

from herd.errors import HerdError
from herd.stage_cut import StagePiece
from worker.agent import convert
from worker.agent.coordinator_client import MANIFEST, CoordinatorClient
from worker.agent.domain import Progress, RankSpec
from worker.pipeline.topology import saved_piece
from worker.rank import events
from worker.rank.events import CheckpointSaved, LinkProbe, RankFailed, TrainReport, ValReport


class Relay:
    """Relays one rank process's events until it exits, then reports the exit."""

    def __init__(self, spec: RankSpec, worker_id: str, folder: Path, client: CoordinatorClient,
                 stopping: threading.Event, stop: Callable[[], object], log):
        self.spec, self.worker_id, self.dir = spec, worker_id, folder
        self._client = client
        self._stopping = stopping  # set when the agent stops the rank itself
        self._stop = stop  # stops the rank (when the coordinator says so)
        self.log = log
        self.progress = Progress()
        self.error = ""  # the rank's own error event, the best reason to report

    def _send(self, request) -> None:
        try:
            if self._client.report(request) and not self._stopping.is_set():
                self.log.info("rank_stop_requested_by_coordinator")
                threading.Thread(target=self._stop, daemon=True).start()
        except HerdError as e:
            # The coordinator may be restarting; progress is best effort, the exit is retried.
            self.log.warning("report_failed", error=str(e))

    def handle(self, event: events.Event) -> None:
        spec = self.spec
        match event:
            case TrainReport():
                self.progress = dataclasses.replace(
                    self.progress, iteration=event.iteration, train_loss=event.train_loss,
                    learning_rate=event.learning_rate, tokens_per_second=event.tokens_per_second,
                    trained_tokens=event.trained_tokens, peak_memory_gb=event.peak_memory_gb,
                    exchange=event.exchange, world_size=event.world_size)
                self._send(convert.progress_report(spec, self.worker_id, self.progress))
            case ValReport():
                self.progress.val_loss = event.val_loss
                self.progress.iteration = max(self.progress.iteration, event.iteration)
                self._send(convert.progress_report(spec, self.worker_id, self.progress))
            case CheckpointSaved() if spec.pipelined:
                piece = saved_piece(spec.rank, spec.world_size, spec.data_parallel,
                                    spec.stage_layers)
                if piece is not None:  # replica 0's stages each upload their own piece
                    self._upload(event.step, event.path, piece)
            case CheckpointSaved() if spec.rank == 0:
                self._upload(event.step, event.path)
            case LinkProbe():
                rate = (f"{event.bits_per_second / 1e9:.2f} Gbit/s over {event.seconds:.2f} s"
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
        for attempt in range(3):
            try:
                self._client.put_checkpoint(self.spec.job_id, self.spec.attempt, step, folder,
                                            piece)
                self.log.info("checkpoint_uploaded", step=step,
                              seconds=round(time.monotonic() - t0, 2),
                              stage=piece.index if piece is not None else None)
                return
            except HerdError as e:
                self.log.warning("checkpoint_upload_failed", step=step, try_=attempt, error=str(e))
                time.sleep(1.0 + attempt)
        self._send(convert.log_report(self.spec, self.worker_id,
                                      f"checkpoint {step} could not be uploaded"))

    def run(self, proc: subprocess.Popen, metrics: Path) -> None:
        """Tails ``metrics`` until ``proc`` exits, then reports the exit."""
        offset, buf = 0, b""
        while True:
            exited = proc.poll() is not None
            if metrics.exists():
                with open(metrics, "rb") as f:
                    f.seek(offset)
                    data = f.read()
                offset += len(data)
                buf += data
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    try:
                        event = events.parse(line)
                    except ValueError:
                        self.log.warning("bad_metrics_line", line=line[:200])
                        continue
                    self.handle(event)
            if exited:
                break
            time.sleep(0.2)
        self._report_exit(proc.returncode)

    def _last_error(self) -> str:
        """The rank's last plain stderr line (its structured log lines are not an error)."""
        try:
            lines = (self.dir / "rank.log").read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        plain = [ln for ln in lines if ln.strip() and not ln.lstrip().startswith("{")]
        errs = [ln for ln in plain if "Error" in ln or "error" in ln]
        return (errs[-1] if errs else (plain[-1] if plain else ""))[-500:]

    def _report_exit(self, code: int) -> None:
        error = "" if code == 0 else (self.error or self._last_error())
        if code < 0 and not self.error:
            error = f"killed by {signal.Signals(-code).name}"
        if self._stopping.is_set() and code != 0:
            error = "stopped by the agent"
        self.log.info("rank_exited", exit_code=code, error=error)
        request = convert.exit_report(self.spec, self.worker_id, code, error)
        for attempt in range(5):
            try:
                self._client.report(request)
                break
            except HerdError as e:
                self.log.warning("exit_report_failed", try_=attempt, error=str(e))
                time.sleep(1.0)
