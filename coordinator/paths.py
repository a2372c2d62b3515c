"""Data paths a job's attempts failed on, so that its next attempt takes another.

The planner (coordinator/planner/network.py) picks a job's data path from the interfaces the
workers reported, which say nothing of a cable pulled or a switch gone: a dead fast subnet would
be picked again by every restart until the job runs out of them, though the control network
works (an outside review: one bad ring cable failed every job). So an attempt that fails on a
dedicated data subnet after every rank started but before any reported a step (the ring never
formed, or its link never carried a step) marks that subnet bad for the job, and its later
attempts take the next path the planner has: another shared subnet, else the control network. A
failure after progress proves nothing about the link (its restart tries the same path first).
Kept in memory: a restarted coordinator tries the fast path again, once.
"""

from __future__ import annotations

from coordinator.domain import Job, JobState, WorkerRecord
from coordinator.placement import Fail, Placement, with_path
from coordinator.planner.network import CONTROL, choose_path
from coordinator.recovery import retryable
from coordinator.store import JobStore
from herd.errors import PlacementError


class FailedPaths:
    def __init__(self):
        self._avoid: dict[str, set[str]] = {}  # job_id -> subnets its attempts failed on
        self._used: dict[str, str] = {}  # job_id -> the subnet its current attempt runs on

    def reroute(self, job: Job, placement: Placement,
                workers: list[WorkerRecord]) -> Placement | Fail:
        """``placement`` with a data path off the subnets the job failed on."""
        avoid = self._avoid.get(job.job_id, set())
        path = placement.path
        if path is not None and path.network in avoid:
            by_id = {w.worker_id: w for w in workers}
            cluster = job.config.cluster
            try:
                path = choose_path([by_id[w] for w in placement.worker_ids], cluster.exchange,
                                   cluster.allow_wifi, placement.pipeline_stages > 1,
                                   avoid=frozenset(avoid))
            except PlacementError as e:
                return Fail(f"{e.message} (data subnets its attempts failed on: "
                            f"{', '.join(sorted(avoid))})")
            placement = with_path(placement, path)
        if path is not None:
            self._used[job.job_id] = path.network
        return placement

    def on_failed(self, job: Job, store: JobStore, exit_code: int | None) -> str:
        """The job's current attempt failed with a rank's ``exit_code``: its subnet is avoided
        from now on when every rank started (the ring forms after) and none reported a step.
        Returns what to add to the failure's message. The link is not in question when a rank
        refused its config or data (exit 2 or 3), nor when a worker itself was lost (None: its
        agent killed or gone while the ranks loaded a large dataset moved the job off its fast
        subnet for good: an outside run)."""
        network = self._used.pop(job.job_id, None)
        if (network is None or network == CONTROL or job.state is not JobState.RUNNING
                or exit_code is None or not retryable(exit_code)):
            return ""
        started = next((a.started_ms for a in reversed(store.attempt_history(job.job_id))
                        if a.attempt == job.attempt), 0)
        if store.latest_progress(job.job_id, started):
            return ""
        self._avoid.setdefault(job.job_id, set()).add(network)
        return (f"; no rank made a step on its data subnet {network}: the next attempt takes "
                "another path")
