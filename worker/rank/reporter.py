"""The trainer's callback in a rank process: progress lines, events, checkpoints written off the
step path, and mlx-lm's own reporting callbacks (``report_to``) on rank 0."""

from __future__ import annotations

import sys
from pathlib import Path

from herd.config import JobConfig
from worker.rank.events import CheckpointSaved, EventLog, TrainReport, ValReport


class Reporter:
    """The trainer's callback: progress lines, events, checkpoints (rank 0 writes them on a
    background thread: training goes on from the snapshot; ``close`` waits for the last), and
    mlx-lm's own reporting callbacks (``report_to``: wandb, swanlab) on rank 0."""

    def __init__(self, job: JobConfig, model, optimizer, adapter_path: Path, rank: int,
                 world: int, events: EventLog, quiet: bool, reporting=None):
        from worker.rank.checkpoint import BackgroundWriter
        from worker.rank.model import adapter_config

        self.job, self.model, self.optimizer = job, model, optimizer
        self.adapter_path, self.rank, self.world = Path(adapter_path), rank, world
        self.adapter_config = adapter_config(job)
        self.events = events
        self.quiet = quiet or rank != 0
        self.writer = BackgroundWriter()
        self.reporting = reporting if rank == 0 else None

    def on_train_report(self, info: dict) -> None:
        self.events.append(TrainReport(rank=self.rank, **info))
        if self.reporting is not None:  # the dict mlx-lm's trainer reports
            keys = ("iteration", "train_loss", "learning_rate", "iterations_per_second",
                    "tokens_per_second", "trained_tokens")
            self.reporting.on_train_loss_report(
                {**{k: info[k] for k in keys}, "peak_memory": info["peak_memory_gb"]})
        if not self.quiet:
            print(train_line(info, self.job.iters), flush=True)

    def on_val_report(self, info: dict) -> None:
        self.events.append(ValReport(rank=self.rank, **info))
        if self.reporting is not None:  # mlx-lm's trainer passes it - 1 (before the step)
            self.reporting.on_val_loss_report({**info, "iteration": info["iteration"] - 1})
        if not self.quiet:
            print(val_line(info, self.job.iters), flush=True)

    def on_save(self, progress) -> None:
        if self.rank != 0:
            return
        from worker.rank.checkpoint import TrainerState, snapshot, write_checkpoint

        iteration = progress.iteration
        state = TrainerState(iteration, progress.trained_tokens, self.job.seed, self.world,
                             random_key=progress.random_key,
                             shares=list(progress.shares) if progress.shares else None,
                             packing=self.job.cluster.packing)
        snap = snapshot(self.model, self.optimizer, self.adapter_config, state)

        def write() -> None:
            path = write_checkpoint(self.adapter_path, snap)
            self.events.append(CheckpointSaved(rank=self.rank, step=iteration, path=str(path)))
            if not self.quiet:
                print(f"iter {iteration:>6}/{self.job.iters}  saved {path}", flush=True)

        self.writer.submit(write)

    def close(self) -> None:
        """Waits for the last checkpoint (raises its error)."""
        self.writer.wait()


def train_line(info: dict, iters: int) -> str:
    """A train report as the rank prints it (its log, `herd logs`)."""
    loss = f"{info['train_loss']:.4f}" if info["train_loss"] else "-"  # (a stage before last)
    return (f"iter {info['iteration']:>6}/{iters}  loss {loss}  "
            f"tok/s {info['tokens_per_second']:8.1f}  lr {info['learning_rate']:.2e}  "
            f"peak {info['peak_memory_gb']:.3f} GB")


def val_line(info: dict, iters: int) -> str:
    return f"iter {info['iteration']:>6}/{iters}  val loss {info['val_loss']:.4f}"


def skip_unused_reporters(report_to: str | None) -> None:
    """mlx-lm imports wandb and swanlab when its trainer module loads, whether or not a run
    reports to them (wandb: ~1.2 s per process here). A fresh rank process that does not
    report to one blocks its import (mlx-lm then treats it as not installed). A process that
    already loaded mlx-lm (a test, an embedding program) is left alone."""
    if "mlx_lm" in sys.modules:
        return
    wanted = {s.strip().lower() for s in (report_to or "").split(",")}
    for name in ("wandb", "swanlab"):
        if name not in wanted:
            sys.modules.setdefault(name, None)


def window_loss(total: float, summed: list[float], step_targets: list[int]) -> float:
    """The mean over a report window's micro-batches of each one's mean loss over every rank
    (gradient_average tokens). ``summed``: the micro-batches' losses, each its share of its
    step's mean, then their target counts, both summed over the ranks; ``step_targets``: the
    target count of each one's step; ``total``: the losses' sum as the window summed them.

    A micro-batch that is a whole step (no accumulation) is its loss as summed, so the figure
    is ``total`` over the count: mlx-lm's, to the bit with one rank. With accumulation a
    micro-batch's mean is its loss x its step's targets / its own; summing shares per window
    instead was right only for windows of whole steps (a window cutting a step scaled each
    micro-batch by its part of the step's tokens: an outside run)."""
    k = len(step_targets)
    losses, counts = summed[:k], summed[k:]
    if all(n == t for n, t in zip(counts, step_targets)):
        return total / k if k else 0.0
    means = [v * t / n for v, n, t in zip(losses, counts, step_targets) if n]
    return sum(means) / len(means) if means else 0.0
