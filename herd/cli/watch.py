"""``herd watch``: follows a job's event stream to its end.

A progress bar with loss and tok/s per worker on a terminal, plain lines otherwise (scripts, CI).
A dropped stream resumes from the last event seen.
"""

from __future__ import annotations

import time

from herd.cli.connection import CoordinatorConnection
from herd.errors import PeerLostError
from herd.rpc.status import rpc_errors
from protos.v1 import common_pb2, coordinator_pb2

STATE = {v: k.removeprefix("JOB_STATE_").lower() for k, v in common_pb2.JobState.items()}
FINAL = {common_pb2.JOB_STATE_SUCCEEDED, common_pb2.JOB_STATE_FAILED,
         common_pb2.JOB_STATE_CANCELLED}
KIND = common_pb2.JobEvent


def describe(e: common_pb2.JobEvent, iters: int) -> str:
    """One event as one plain line."""
    if e.kind == KIND.KIND_STATE:
        return f"state {STATE[e.state]}" + (f": {e.message}" if e.message else "")
    if e.kind == KIND.KIND_PROGRESS:
        p = e.progress
        val = f" val_loss {p.val_loss:.4f}" if p.val_loss else ""
        via = f" [{p.exchange} x{p.world_size}]" if p.exchange else ""
        return (f"iter {p.iteration}/{iters} rank {p.rank} ({p.worker_id}): loss "
                f"{p.train_loss:.4f}{val} tok/s {p.tokens_per_second:.1f}{via}")
    if e.kind == KIND.KIND_CHECKPOINT:
        return f"checkpoint {e.step} stored"
    return e.message


def _events(coord: CoordinatorConnection, job_id: str):
    """Every event of the job, reconnecting a few times if the stream drops."""
    after, retries = 0, 0
    while True:
        try:
            stream = coord.stub.WatchJob(
                coordinator_pb2.WatchJobRequest(job_id=job_id, after_seq=after), timeout=24 * 3600)
            with rpc_errors(coord.target):
                for e in stream:
                    after = e.seq
                    retries = 0
                    yield e
            return
        except PeerLostError:
            retries += 1
            if retries > 5:
                raise
            time.sleep(min(2.0 * retries, 10.0))


def watch(coord: CoordinatorConnection, job_id: str, plain: bool) -> tuple[int, str]:
    """Follows the job to a final state; returns (state, message)."""
    job = coord.call("GetJob", coordinator_pb2.GetJobRequest(job_id=job_id)).job
    iters = job.iters
    state, message = job.state, job.message
    if plain:
        for e in _events(coord, job_id):
            print(f"{job_id}: {describe(e, iters)}", flush=True)
            if e.kind == KIND.KIND_STATE:
                state, message = e.state, e.message
        return state, message
    from rich.markup import escape
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    ranks: dict[int, common_pb2.RankProgress] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(bar_width=24),
                  TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                  TextColumn("{task.fields[stats]}"), transient=False) as bar:
        task = bar.add_task(escape(job_id), total=iters, stats="")
        for e in _events(coord, job_id):
            if e.kind == KIND.KIND_PROGRESS:
                ranks[e.progress.rank] = e.progress
                stats = "  ".join(f"{p.worker_id} loss {p.train_loss:.3f} "
                                  f"{p.tokens_per_second:.0f} tok/s"
                                  for _, p in sorted(ranks.items()))
                bar.update(task, completed=max(p.iteration for p in ranks.values()),
                           stats=escape(stats))
            else:
                bar.console.print(escape(describe(e, iters)))
            if e.kind == KIND.KIND_STATE:
                state, message = e.state, e.message
    return state, message
