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


class RestartingLogs:
    """GetJob and GetJobLog of a running job whose rank writes a line per call; away (calls
    refused) from the third call for ``away_s``, then the job ends."""

    target = "c:7450"

    def __init__(self, clock: Clock, away_s: float):
        from protos.v1 import coordinator_pb2

        self.pb, self.clock, self.away_s = coordinator_pb2, clock, away_s
        self.calls, self.back_at, self.log = 0, None, b""

    def call(self, name, request):
        self.calls += 1
        if self.calls == 3:
            self.back_at = self.clock.t + self.away_s
        if self.back_at is not None and self.clock.t < self.back_at:
            raise PeerLostError("c:7450 is unreachable: Connection refused")
        if name == "GetJob":
            self.log += f"line {self.calls}\n".encode()
            ended = self.back_at is not None and self.calls > 8
            return self.pb.GetJobReply(job=common_pb2.JobStatus(
                job_id="j", attempt=1, state=common_pb2.JOB_STATE_SUCCEEDED if ended
                else common_pb2.JOB_STATE_RUNNING))
        data = self.log[request.offset:]
        return self.pb.GetJobLogReply(data=data, next_offset=request.offset + len(data),
                                      attempt=1, ranks=1)


@pytest.mark.parametrize("away_s, code", [(60.0, 0), (watch.PATIENCE_S + 30, 5)])
def test_logs_follow_goes_on_through_a_coordinator_restart(capsys, away_s, code):
    """`herd logs -f` ended at once (exit 5) when the coordinator restarted, where `herd watch`
    waits for it (an outside run): now it waits as long, and goes on from its offset, each line
    once."""
    from herd.cli import logs

    clock = Clock()
    coord = RestartingLogs(clock, away_s)
    if code:
        with pytest.raises(PeerLostError, match="gave up following j after 180s"):
            logs.follow(coord, "j", 0, 0, True, clock=clock, sleep=clock.sleep)
        return
    assert logs.follow(coord, "j", 0, 0, True, clock=clock, sleep=clock.sleep) == 0
    out = capsys.readouterr()
    lines = out.out.splitlines()
    # each once, the one written after the restart too
    assert len(lines) == len(set(lines)) >= 2 and int(lines[-1].split()[1]) > 3, lines
    assert "trying again for up to 180s" in out.err


def test_a_watch_started_while_the_coordinator_restarts_waits_for_it(capsys):
    """A `herd watch` started in the seconds a coordinator restarts exited 5 at once, where one
    already running waits (an outside run): its first call waits the same way."""
    from protos.v1 import coordinator_pb2

    clock = Clock()

    class Starting(RestartingCoordinator):
        def call(self, name, request):
            if clock.t < 30:
                raise PeerLostError("c:7450 is unreachable: Connection refused")
            return coordinator_pb2.GetJobReply(job=common_pb2.JobStatus(job_id="j", iters=3))

    coord = Starting(clock, away_s=0)
    watch.watch(coord, "j", plain=True, clock=clock, sleep=clock.sleep)
    out = capsys.readouterr()
    assert clock.t >= 30 and "trying again for up to 180s" in out.err, out.err
    assert out.out.count("j: ") == 3  # then every event, once


class Terminal:
    """A stdout that says it is a terminal (or not), keeping what was written to it."""

    def __init__(self, tty: bool):
        import io

        self.tty, self.buffer, self.text = tty, io.BytesIO(), []

    def isatty(self) -> bool:
        return self.tty

    def write(self, text: str) -> None:
        self.text.append(text)

    def flush(self) -> None:
        pass


def test_logs_escape_a_ranks_control_characters_on_a_terminal_and_keep_its_bytes_in_a_file(
        monkeypatch):
    """A record quoted in a rank's error may carry an escape sequence (clear the screen, set the
    title): shown escaped on a terminal, as `herd jobs` shows events; `herd logs > f` keeps the
    bytes. A character split over two reads arrives whole."""
    from herd.cli import logs

    data = "bad record: \x1b]0;pwned\x07\x1b[2J é\n".encode()
    tty = Terminal(True)
    monkeypatch.setattr("sys.stdout", tty)
    cut = data.index("é".encode()) + 1  # (between the two bytes of é)
    logs._write(data[:cut])
    logs._write(data[cut:])
    text = "".join(tty.text)
    assert "\x1b" not in text and "\x07" not in text
    assert text == "bad record: \\x1b]0;pwned\\x07\\x1b[2J é\n"
    pipe = Terminal(False)
    monkeypatch.setattr("sys.stdout", pipe)
    logs._write(data)
    assert pipe.buffer.getvalue() == data and not pipe.text
