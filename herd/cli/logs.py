"""``herd logs JOB [--rank N] [--attempt A] [-f]``: a rank's output, read from the coordinator.

Each worker agent relays its rank's output (rank.log: progress lines, warnings, a traceback) to
the coordinator while the rank runs, so the log is there after the worker is gone, and -f
follows it, across a restart's new attempt, until the job ends.
"""

from __future__ import annotations

import argparse
import codecs
import sys
import time

from herd.cli.connection import CoordinatorConnection, add_connection_args, connect_from_args
from herd.cli.watch import FINAL, Patience
from herd.errors import HerdError, PeerLostError
from herd.terminal import shown
from herd.usage import HelpFormatter
from protos.v1 import coordinator_pb2

POLL_S = 1.0
# To a terminal, a rank's output as text with its control characters escaped (a record quoted in
# an error may carry escape sequences that clear the screen or draw fake lines: herd/terminal.py);
# to a file or a pipe, its bytes as they are. (Incremental: a character may span two reads.)
_TEXT = codecs.getincrementaldecoder("utf-8")(errors="replace")


def _write(data: bytes) -> None:
    if sys.stdout.isatty():
        sys.stdout.write(shown(_TEXT.decode(data)))
    else:
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
    sys.stdout.flush()


def _read(coord: CoordinatorConnection, job_id: str, rank: int, attempt: int, offset: int):
    return coord.call("GetJobLog", coordinator_pb2.GetJobLogRequest(
        job_id=job_id, rank=rank, attempt=attempt, offset=offset))


def _drain(coord, job_id: str, rank: int, attempt: int, offset: int) -> tuple[int, int, int]:
    """Writes everything stored from ``offset``; returns (attempt read, new offset, ranks)."""
    while True:
        reply = _read(coord, job_id, rank, attempt, offset)
        if reply.data:
            _write(reply.data)
        offset = reply.next_offset
        if not reply.data:
            return reply.attempt, offset, reply.ranks


def follow(coord: CoordinatorConnection, job_id: str, rank: int, attempt: int,
           keep_going: bool, clock=time.monotonic, sleep=time.sleep) -> int:
    patience = Patience("logs", clock)
    hint = f"`herd logs {job_id}` once it answers prints the whole log again"
    if keep_going:  # (started while the coordinator restarts: it waits, as below)
        attempt, offset, ranks = patience.call(lambda: _drain(coord, job_id, rank, attempt, 0),
                                               f"following {job_id}", hint, sleep)
    else:
        attempt, offset, ranks = _drain(coord, job_id, rank, attempt, 0)
    if not ranks:
        print(f"({job_id} has no rank output: it was never placed)", file=sys.stderr)
    while keep_going:
        try:
            job = coord.call("GetJob", coordinator_pb2.GetJobRequest(job_id=job_id)).job
            ended = job.state in FINAL
            attempt, offset, ranks = _drain(coord, job_id, rank, attempt, offset)
            if job.attempt > attempt:  # placed, or restarted: the new attempt's output, whole
                if attempt:
                    print(f"--- attempt {job.attempt} ---", flush=True)
                attempt, offset, ranks = _drain(coord, job_id, rank, job.attempt, 0)
            elif ended:
                # A rank's last words may arrive just after the job's final state: one more look.
                sleep(POLL_S)
                _drain(coord, job_id, rank, attempt, offset)
                return 0
            patience.back()
        except PeerLostError as e:
            # A coordinator restart (an upgrade, a crash) ended -f at once, where `herd watch`
            # waits for it (an outside run): the same patience, on from the same offset.
            patience.lost(e, f"following {job_id}", hint)
            sleep(2.0)
            continue
        sleep(POLL_S)
    return 0


DESCRIPTION = """\
Print a rank's output (its rank.log: progress lines, warnings, errors), relayed by its worker to
the coordinator, so it outlives the worker. Rank 0 of the latest attempt unless --rank or
--attempt says otherwise; -f follows it until the job ends (into a restart's new attempt)."""


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="herd logs", description=DESCRIPTION,
                                formatter_class=HelpFormatter)
    p.add_argument("job", metavar="JOB", help="a job id (herd jobs lists them)")
    p.add_argument("--rank", type=int, default=0, help="which rank")
    p.add_argument("--attempt", type=int, default=0, help="which attempt (0 = the latest)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing until the job ends")
    add_connection_args(p)
    args = p.parse_args(argv[1:])
    try:
        with connect_from_args(args) as coord:
            return follow(coord, args.job, args.rank, args.attempt, args.follow)
    except HerdError as e:
        print(f"herd logs: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
