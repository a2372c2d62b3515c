"""A rank's heartbeat: where it is in its collectives, for its agent's watchdog.

MLX's ring has no deadline (shared/FACTS.md; mlx 0.32 exposes no timeout for it): a peer that is
stopped, or a link that drops packets silently, leaves ``all_sum`` waiting forever, and the
accepting side of ``mx.distributed.init`` waits forever for a peer that never dials. A hang is
always inside a collective, so the rank records, around every one, that it entered it and when,
and the agent (worker/agent/watchdog.py) kills a rank that stays inside one longer than its bound.
The bound comes from the rank's own measured step time (``step_s``), which it writes with every
beat.

The beat is one fixed-size line that the rank rewrites in place (``pwrite`` at offset 0: no
allocation, no rename, a couple of microseconds per collective)::

    <seq> <inside 0|1> <what> <count> <since: time.monotonic()> <step_s>

``since`` is the time the rank entered (inside) or last left (outside) a collective, on
CLOCK_MONOTONIC, which every process of one machine shares, so the agent compares it with its own
``time.monotonic()``. Pure Python: the agent reads it without loading MLX.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

HEARTBEAT_ENV = "HERD_HEARTBEAT_FILE"
_WIDTH = 120  # bytes per record; a record is padded to it, so a shorter one never leaves a tail
# The step time is the longest of the last STEP_WINDOW intervals between leaving one collective
# and leaving the next (a step, or the load before the first): long enough to cover the steps
# that save or validate, short enough that the load before the first step stops counting.
STEP_WINDOW = 32


@dataclass(frozen=True)
class Beat:
    seq: int
    inside: bool     # inside a collective (or forming the group)
    what: str        # "group" (forming it), "all_sum", or "ready" (outside, loaded)
    count: int       # collectives entered so far
    since: float     # time.monotonic() when it entered (inside) or left (outside)
    step_s: float    # the rank's measured step time (0 before the first)


def parse(raw: bytes) -> Beat | None:
    """A beat back from its line; None for an empty or torn one (read again next poll)."""
    try:
        seq, inside, what, count, since, step = raw.split()[:6]
        return Beat(int(seq), inside == b"1", what.decode(), int(count), float(since), float(step))
    except ValueError:
        return None


def read(path: Path) -> Beat | None:
    try:
        with open(path, "rb") as f:
            return parse(f.read(_WIDTH))
    except OSError:
        return None


class Heartbeat:
    """Writes this rank's beats to ``path`` (or nowhere: a process no agent watches)."""

    def __init__(self, path: Path | None):
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600) if path else None
        self._seq = 0
        self._count = 0
        self._left: float | None = None
        self._intervals: deque[float] = deque(maxlen=STEP_WINDOW)

    @classmethod
    def from_env(cls) -> "Heartbeat":
        path = os.environ.get(HEARTBEAT_ENV)
        return cls(Path(path) if path else None)

    @property
    def step_s(self) -> float:
        return max(self._intervals, default=0.0)

    def _write(self, inside: bool, what: str, since: float) -> None:
        if self._fd is None:
            return
        self._seq += 1
        line = f"{self._seq} {int(inside)} {what} {self._count} {since:.3f} {self.step_s:.3f}"
        os.pwrite(self._fd, line.ljust(_WIDTH - 1).encode() + b"\n", 0)

    def enter(self, what: str) -> None:
        self._count += 1
        self._write(True, what, time.monotonic())

    def leave(self, what: str = "all_sum") -> None:
        now = time.monotonic()
        if self._left is not None:
            self._intervals.append(now - self._left)
        self._left = now
        self._write(False, what, now)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class WatchedExchange:
    """A GradientExchange whose every collective is a heartbeat: entered, then left."""

    def __init__(self, inner, heartbeat: Heartbeat):
        self.inner, self.heartbeat = inner, heartbeat
        self.name, self.rank, self.size = inner.name, inner.rank, inner.size

    def all_sum(self, flat, donate: bool = False):
        self.heartbeat.enter("all_sum")
        try:
            return self.inner.all_sum(flat, donate=donate)
        finally:
            self.heartbeat.leave()

    def close(self) -> None:
        self.inner.close()
