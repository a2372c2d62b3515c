"""What a rank reports, as typed events: one JSON line each in its ``--metrics-file``.

The rank writes them (``EventLog.append``); its agent tails the file and reads them back
(``parse``), relaying progress and uploading checkpoints (worker/agent/relay.py). The same lines
are the metrics file a user gets from ``herd train --metrics-file``, so the JSON keys are a
contract: ``{"event": <kind>, <field>: ...}``, a field that is None left out. Pure Python, so the
agent reads them without loading MLX.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from herd.errors import DISK_ERRNOS, StorageError


@dataclass(frozen=True)
class TrainReport:
    """Training progress every ``steps_per_report`` iterations (and at the last one)."""

    kind: ClassVar[str] = "train"
    rank: int
    iteration: int
    train_loss: float
    learning_rate: float
    tokens_per_second: float
    trained_tokens: int
    peak_memory_gb: float
    exchange: str
    world_size: int
    # The data-parallel loop's timings (a pipeline stage reports none of them).
    iterations_per_second: float | None = None
    exchange_seconds: float | None = None
    step_seconds: float | None = None
    exchange_bytes: int | None = None  # gradient bytes all-reduced in the window (payload)
    # Data parallel: each rank's examples (or packed rows) of every global batch in the window,
    # and each rank's measured items per second of compute (worker/rank/balance.py).
    shares: list[int] | None = None
    rank_rates: list[float] | None = None


@dataclass(frozen=True)
class ValReport:
    """A validation loss. ``iteration``: the iteration it ran at, before that iteration's step
    (after ``iteration - 1`` updates), as mlx-lm validates and labels it."""

    kind: ClassVar[str] = "val"
    rank: int
    iteration: int
    val_loss: float
    val_time: float


@dataclass(frozen=True)
class TestReport:
    """The test set's loss (``test: true``), after training or of an existing adapter."""

    kind: ClassVar[str] = "test"
    __test__: ClassVar[bool] = False  # a report, not a pytest class
    rank: int
    test_loss: float
    test_ppl: float


@dataclass(frozen=True)
class CheckpointSaved:
    """A complete checkpoint folder (it has its manifest). A pipeline stage's names its stage."""

    kind: ClassVar[str] = "checkpoint"
    rank: int
    step: int
    path: str
    stage: int | None = None
    stages: int | None = None
    layers: list[int] | None = None  # [start, end) of the stage's blocks


@dataclass(frozen=True)
class Done:
    kind: ClassVar[str] = "done"
    rank: int
    iteration: int
    seconds: float | None = None


@dataclass(frozen=True)
class RankFailed:
    """The rank's own reason for failing: the best error to show for its exit."""

    kind: ClassVar[str] = "error"
    message: str


@dataclass(frozen=True)
class StageDone:
    """A pipeline stage's timings and memory, for benchmarks and tests."""

    kind: ClassVar[str] = "stage_done"
    rank: int
    stage: int
    replica: int
    layers: list[int]
    losses: list[float]
    step_seconds: list[float]
    link_seconds: float
    step_compute_seconds: list[float]
    compute_seconds: float
    load_peak_bytes: int
    peak_bytes: int
    adapter: str


@dataclass(frozen=True)
class LinkProbe:
    """The measured rate of the link to the next rank, before the ring formed
    (worker/exchange/probe.py); ``error`` instead when the probe failed."""

    kind: ClassVar[str] = "link"
    rank: int
    peer: int
    address: str
    bits_per_second: float | None = None
    seconds: float | None = None
    error: str | None = None


Event = (TrainReport | ValReport | TestReport | CheckpointSaved | Done | RankFailed | StageDone
         | LinkProbe)
_KINDS: dict[str, type] = {cls.kind: cls for cls in Event.__args__}


def to_line(event: Event) -> str:
    fields = {k: v for k, v in dataclasses.asdict(event).items() if v is not None}
    return json.dumps({"event": event.kind, **fields})


def parse(line: str | bytes) -> Event:
    """One line back as its event; ValueError for a line that is not one."""
    try:
        raw = json.loads(line)
        cls = _KINDS[raw.pop("event")]
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})
    except (json.JSONDecodeError, AttributeError, KeyError, TypeError) as e:
        raise ValueError(f"not a rank event: {e}") from None


class EventLog:
    """Appends events to a file, one line per write (ranks of one machine may share the file;
    the agent reads it while it grows). A log without a path drops them."""

    def __init__(self, path: Path | None):
        self.path = path

    def append(self, event: Event) -> None:
        if self.path is None:
            return
        try:
            with open(self.path, "a") as f:
                f.write(to_line(event) + "\n")
        except OSError as e:  # a full (or failing) disk: the rank's exit 8 names it
            if e.errno not in DISK_ERRNOS:
                raise
            free = shutil.disk_usage(self.path.parent).free / 1e6
            raise StorageError(f"the worker's disk holding {self.path.parent} cannot be "
                               f"written: {e.strerror} ({free:.1f} MB free)",
                               hint="free space on the worker's disk (its --state-dir)") from None
