"""The agent's watchdog: kills a rank that stays inside a collective past its bound.

Every collective of a rank is bounded here, whatever its transport: MLX's ring has no deadline of
its own, and the gRPC exchange's own (``exchange_timeout_s``) fires first where it has one. The
rank writes a heartbeat around each collective (worker/rank/heartbeat.py); a rank inside one for
longer than

    bound = 2 x step_s + exchange_timeout_s - REPORT_S    (+ GROUP_FLOOR_S while forming the group)

is stalled (REPORT_S: what noticing it, stopping the rank and telling the coordinator take, kept
out of the bound so that the job's state changes within 2 x step_s + exchange_timeout_s, the bound
the user is promised; never more than half of exchange_timeout_s): a peer is stopped or gone, or
the link between them drops packets silently. ``step_s`` is the rank's own measured step time (the
longest of its recent steps, which include waiting for the slowest peer, a checkpoint save and
validation), so a peer that is merely slower never trips it. Outside a collective nothing is
bounded: computing always ends, and a rank stopped while computing leaves its peers inside the
next collective, where their watchdogs see it.

A pipeline stage beats around each send and receive (worker/pipeline/link.py WatchedLink): its
waits for a stopped neighbour are bounded the same way. A rank that has not written a beat yet
(starting) is not watched.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable

from worker.rank import heartbeat
from worker.rank.heartbeat import Beat

# Forming the group: MLX's ring dials its peers for ~31 s (5 tries, doubling from 1 s), and ranks
# start a few seconds apart (each fetches the dataset and its checkpoint first).
GROUP_FLOOR_S = 60.0
POLL_S = 0.25
REPORT_S = 1.0  # POLL_S, then SIGTERM, the rank's exit, and the agent's report (~0.5 s measured)


def report_s(exchange_timeout_s: float) -> float:
    return min(REPORT_S, exchange_timeout_s / 2)


def bound_s(beat: Beat, exchange_timeout_s: float) -> float:
    floor = GROUP_FLOOR_S if beat.what == "group" else 0.0
    return floor + 2 * beat.step_s + exchange_timeout_s - report_s(exchange_timeout_s)


def stalled(beat: Beat | None, now: float, exchange_timeout_s: float) -> str | None:
    """Why the rank is stalled, or None while it is not (pure: tests step it with any clock)."""
    if beat is None or not beat.inside:
        return None
    waited, bound = now - beat.since, bound_s(beat, exchange_timeout_s)
    if waited <= bound:
        return None
    what = ("forming its group" if beat.what == "group"
            else f"{beat.what} #{beat.count}")
    return (f"stalled: {what} got no further in {waited:.0f}s (bound {bound:.0f}s = 2 x "
            f"{beat.step_s:.1f}s step + {exchange_timeout_s:g}s exchange_timeout_s"
            + (f" + {GROUP_FLOOR_S:.0f}s to form the group" if beat.what == "group" else "")
            + f" - {report_s(exchange_timeout_s):g}s to report it"
            + "): a peer is stopped or unreachable")


class Watchdog:
    """Polls one rank's heartbeat file; calls ``on_stall(reason)`` once when it stalls."""

    def __init__(self, path: Path, exchange_timeout_s: float,
                 on_stall: Callable[[str], object], clock: Callable[[], float] = time.monotonic):
        self.path, self.exchange_timeout_s = path, exchange_timeout_s
        self._on_stall, self._clock = on_stall, clock
        self._stop = threading.Event()
        self.fired: str | None = None

    def check(self) -> str | None:
        reason = stalled(heartbeat.read(self.path), self._clock(), self.exchange_timeout_s)
        if reason and self.fired is None:
            self.fired = reason
            self._on_stall(reason)
        return reason

    def run(self) -> None:
        while not self._stop.wait(POLL_S) and self.fired is None:
            self.check()

    def start(self) -> threading.Thread:
        t = threading.Thread(target=self.run, daemon=True, name=f"watchdog-{self.path.parent.name}")
        t.start()
        return t

    def stop(self) -> None:
        self._stop.set()
