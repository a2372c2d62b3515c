"""``herd watch``: follows a job's event stream to its end.

On a terminal: a progress bar and one line of figures (loss, validation loss, tok/s over all
workers), both within the terminal's width however many workers; plain lines otherwise (scripts,
CI). Validation lines carry the iteration they ran at and their own figure. A dropped stream
resumes from the last event seen.
"""

from __future__ import annotations

import sys
import time

from herd.cli.connection import CoordinatorConnection
from herd.errors import PeerLostError
from herd.models.source import describe_fetch, fetch_line
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
        who = f"iter {p.iteration}/{iters} rank {p.rank} ({p.worker_id})"
        if p.validation:  # its own figure only: the train figures it carries are older
            return f"{who}: val_loss {p.val_loss:.4f}"
        via = f" [{p.exchange} x{p.world_size}]" if p.exchange else ""
        # (a pipeline stage that holds no loss says its memory instead)
        loss = (f"loss {p.train_loss:.4f}" if p.train_loss else
                f"peak {p.peak_memory_gb:.2f} GB")
        return f"{who}: {loss} tok/s {p.tokens_per_second:.1f}{_share(p)}{via}"
    if e.kind == KIND.KIND_CHECKPOINT:
        return f"checkpoint {e.step} stored"
    if e.kind == KIND.KIND_FETCH:
        return describe_fetch(e.fetch)
    return e.message


def _share(p: common_pb2.RankProgress) -> str:
    """A data-parallel rank's share of each global batch and its measured speed (balancing)."""
    if not p.share:
        return ""
    return f" share {p.share}" + (f" ({p.items_per_second:.1f}/s)" if p.items_per_second else "")


# How long a dropped stream is tried again: a coordinator restarted by hand, or by launchd or
# systemd on a loaded Mac, is back well within it (its ranks train on meanwhile).
PATIENCE_S = 180.0


class Patience:
    """A coordinator that stops answering a command that follows a job (`herd watch`, `herd
    logs -f`) is waited for, said once, for up to PATIENCE_S without an answer."""

    def __init__(self, command: str, clock=time.monotonic):
        self.command, self.clock, self.since = command, clock, None

    def lost(self, e: PeerLostError, doing: str, hint: str) -> None:
        """Returns to try again; raises PeerLostError once PATIENCE_S have passed."""
        if self.since is None:
            self.since = self.clock()
            print(f"herd {self.command}: {e.message}; trying again for up to {PATIENCE_S:.0f}s",
                  file=sys.stderr)
        elif self.clock() - self.since > PATIENCE_S:
            raise PeerLostError(f"{e.message}; gave up {doing} after {PATIENCE_S:.0f}s",
                                hint=hint) from None

    def back(self) -> None:
        self.since = None

    def call(self, fn, doing: str, hint: str, sleep=time.sleep):
        """``fn()``, tried again every 2 s while the coordinator is away (a command started in
        the seconds a coordinator restarts exited 5 at once, where one already running waits:
        an outside run)."""
        while True:
            try:
                result = fn()
            except PeerLostError as e:
                self.lost(e, doing, hint)
                sleep(2.0)
                continue
            self.back()
            return result


def _watch_hint(job_id: str) -> str:
    # (not "is the coordinator running?": cut off from this laptop, it and the job may be fine,
    # the ranks training on: an outside run read it as a dead job)
    return ("the job may still be training (ranks train on while the coordinator is away): run "
            f"`herd watch {job_id}` again once it answers; nothing is missed, it starts from the "
            "job's first event")


def _events(coord: CoordinatorConnection, job_id: str, clock=time.monotonic, sleep=time.sleep):
    """Every event of the job, from where a dropped stream left off, for as long as the
    coordinator comes back within PATIENCE_S."""
    after, patience = 0, Patience("watch", clock)
    while True:
        try:
            stream = coord.stub.WatchJob(
                coordinator_pb2.WatchJobRequest(job_id=job_id, after_seq=after), timeout=24 * 3600)
            with rpc_errors(coord.target):
                for e in stream:
                    after = e.seq
                    patience.back()
                    yield e
            return
        except PeerLostError as e:
            patience.lost(e, f"watching {job_id}", _watch_hint(job_id))
            sleep(2.0)


def _shown(e: common_pb2.JobEvent, seen_val: set[int]) -> bool:
    """Every rank validates on the same (all-reduced) data: one line per validation is enough."""
    if e.kind != KIND.KIND_PROGRESS or not e.progress.validation:
        return True
    if e.progress.iteration in seen_val:
        return False
    seen_val.add(e.progress.iteration)
    return True


def stats_line(ranks: dict[int, common_pb2.RankProgress], val: float) -> str:
    """The figures under the bar. Every rank reports the job's loss and tok/s (summed over all
    ranks), so the lowest rank's stand for all of them and the line does not grow with the
    number of workers."""
    # (a pipeline's stages before the last report their own speed and memory, not the loss)
    p = next((ranks[r] for r in sorted(ranks) if ranks[r].train_loss), ranks[min(ranks)])
    parts = [f"loss {p.train_loss:.3f}" if p.train_loss else "loss -"]
    if val:
        parts.append(f"val {val:.3f}")
    parts.append(f"{p.tokens_per_second:,.0f} tok/s")
    n = p.world_size or len(ranks)
    parts.append(f"{n} worker{'s' if n != 1 else ''}" + (f" ({p.exchange})" if p.exchange else ""))
    if any(r.share for r in ranks.values()):  # data parallel: the split and each rank's speed
        parts.append("split " + ":".join(str(ranks[r].share) for r in sorted(ranks)))
    return "  ".join(parts)


def watch(coord: CoordinatorConnection, job_id: str, plain: bool, clock=time.monotonic,
          sleep=time.sleep) -> tuple[int, str]:
    """Follows the job to a final state; returns (state, message)."""
    job = Patience("watch", clock).call(
        lambda: coord.call("GetJob", coordinator_pb2.GetJobRequest(job_id=job_id)).job,
        f"watching {job_id}", _watch_hint(job_id), sleep)
    iters = job.iters
    state, message = job.state, job.message
    seen_val: set[int] = set()
    if plain:
        for e in _events(coord, job_id, clock, sleep):
            if _shown(e, seen_val):
                print(f"{job_id}: {describe(e, iters)}", flush=True)
            if e.kind == KIND.KIND_STATE:
                state, message = e.state, e.message
        return state, message
    from rich.console import Group
    from rich.live import Live
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.text import Text

    # Two lines, each within the terminal's width: the bar (it takes what the others leave),
    # and the figures below it, cut with an ellipsis rather than wrapped.
    bar = Progress(TextColumn("{task.description}"), BarColumn(bar_width=None),
                   MofNCompleteColumn(), TimeElapsedColumn(), expand=True)
    task = bar.add_task(escape(job_id if len(job_id) <= 24 else job_id[:23] + "~"), total=iters)
    stats = Text("waiting for the first report", no_wrap=True, overflow="ellipsis")
    ranks: dict[int, common_pb2.RankProgress] = {}
    val = 0.0
    fetching: dict[int, common_pb2.FetchProgress] = {}  # rank -> its latest fetch report
    with Live(Group(bar, stats), refresh_per_second=4, transient=False) as live:
        for e in _events(coord, job_id):
            if e.kind == KIND.KIND_FETCH:
                fetching[e.fetch.rank] = e.fetch
                if e.fetch.done:
                    live.console.print(escape(describe_fetch(e.fetch)))
                if not ranks:  # the fetch phase: its sum in the figures line
                    stats.plain = fetch_line(fetching.values())
            elif e.kind == KIND.KIND_PROGRESS:
                if e.progress.validation:
                    val = e.progress.val_loss
                    if _shown(e, seen_val):
                        live.console.print(escape(describe(e, iters)))
                else:
                    ranks[e.progress.rank] = e.progress
                    bar.update(task, completed=max(p.iteration for p in ranks.values()))
                if ranks:
                    stats.plain = stats_line(ranks, val)
            else:
                live.console.print(escape(describe(e, iters)))
            if e.kind == KIND.KIND_STATE:
                state, message = e.state, e.message
    return state, message
