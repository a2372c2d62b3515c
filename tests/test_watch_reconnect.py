"""`herd watch` through a coordinator restart: the stream drops, the coordinator is away for a
minute (restarted by hand, or by launchd on a loaded Mac), and the watch goes on from the event
it had reached; it gives up, exit 5, only past watch.PATIENCE_S. The network is the edge here (a
stream that fails while the coordinator is "down") and so is the clock; a real restart under a
running watch is tests/test_faults_multihost.py's."""

from __future__ import annotations

import pytest

from herd.cli import watch
from herd.errors import PeerLostError
from protos.v1 import common_pb2


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


class RestartingCoordinator:
    """Sends events 1..3; after the first, it is killed and comes back ``away_s`` later."""

    target = "c:7450"

    def __init__(self, clock: Clock, away_s: float):
        self.clock, self.back_at, self.stub = clock, None, self
        self.away_s = away_s

    def WatchJob(self, request, timeout):  # noqa: N802 (the rpc's name)
        def stream():
            if self.back_at is not None and self.clock.t < self.back_at:
                raise PeerLostError("c:7450 is unreachable: Connection refused")
            for seq in range(request.after_seq + 1, 4):
                yield common_pb2.JobEvent(seq=seq)
                if self.back_at is None:
                    self.back_at = self.clock.t + self.away_s
                    raise PeerLostError("c:7450 is unreachable: Socket closed")
        return stream()


def _seqs(away_s: float) -> list[int]:
    clock = Clock()
    coord = RestartingCoordinator(clock, away_s)
    return [e.seq for e in watch._events(coord, "j", clock=clock, sleep=clock.sleep)]


def test_a_watch_goes_on_through_a_coordinator_away_for_a_minute(capsys):
    assert _seqs(away_s=60) == [1, 2, 3]  # nothing missed, nothing twice
    assert "trying again for up to" in capsys.readouterr().err


def test_a_watch_gives_up_once_the_coordinator_stays_away():
    with pytest.raises(PeerLostError) as gone:
        _seqs(away_s=watch.PATIENCE_S + 30)
    # (saying the job may train on, not that the coordinator died: it may only be cut off)
    assert "gave up watching j after 180s" in gone.value.message
    assert "the job may still be training" in gone.value.hint
