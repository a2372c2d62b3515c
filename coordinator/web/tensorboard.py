"""TensorBoard event files from the metrics stream (``herd coordinator --tensorboard DIR``): one run
folder per job, ``DIR/<job_id>/``, written with tensorboardX (no TensorFlow needed). Point
``tensorboard --logdir DIR`` at it.
"""

from __future__ import annotations

import time
from pathlib import Path

from herd.errors import ConfigError


class TensorBoardWriter:
    """A metrics hub listener (coordinator/web/hub.py): each change in, scalars out."""

    def __init__(self, root: Path):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise ConfigError("--tensorboard needs the tensorboardX package",
                              hint="pip install 'herd[tensorboard]'") from None
        self._make = SummaryWriter
        self.root = Path(root)
        self._writers: dict = {}
        self._loss_done: dict[str, set[int]] = {}
        # A restarted coordinator replays its stored events into the hub: those were written
        # by the coordinator that saw them first.
        self._since_ms = int(time.time() * 1000)

    def _writer(self, job_id: str):
        if job_id not in self._writers:
            self._writers[job_id] = self._make(logdir=str(self.root / job_id), flush_secs=5)
        return self._writers[job_id]

    def __call__(self, change: dict) -> None:
        job_id = change["job_id"]
        if change["time_ms"] < self._since_ms:
            return
        if point := change.get("point"):
            w, it, rank = self._writer(job_id), point["it"], point["rank"]
            if point["val"] is not None:
                w.add_scalar("loss/val", point["val"], it)
            elif point["loss"] is not None and it not in self._loss_done.setdefault(job_id, set()):
                self._loss_done[job_id].add(it)  # every rank reports the same global loss
                w.add_scalar("loss/train", point["loss"], it)
                w.add_scalar("learning_rate", point["lr"], it)
            if point["val"] is None:
                w.add_scalar(f"tokens_per_second/rank{rank}", point["tps"], it)
                w.add_scalar(f"peak_memory_gb/rank{rank}", point["mem"], it)
        if timing := change.get("timing"):
            w = self._writer(job_id)
            for part in ("compute", "exchange", "wait"):
                w.add_scalar(f"step_seconds/{part}", timing[part], timing["it"])
        if change.get("state") in ("succeeded", "failed", "cancelled"):
            w = self._writers.pop(job_id, None)
            self._loss_done.pop(job_id, None)
            if w is not None:
                w.close()

    def close(self) -> None:
        for w in self._writers.values():
            w.close()
        self._writers.clear()
