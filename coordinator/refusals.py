"""Workers that refused a job's rank for a reason of their own, so that its next attempt goes
to others.

A worker checks a rank before it fetches anything (worker/agent/service.py ``prepare``): its
disk or model cache may not hold the model, its owner's policy may refuse the model's path (one
the coordinator could not tell: placement.policy_refusal), or another job took it meanwhile.
Such a refusal is about that worker, not the job: an outside run had a 2-worker job fail for
good on the one Mac of three whose model cache could not hold the model, while the third sat
idle. So the attempt ends, the worker is left out of the job's later placements (named while it
waits: placement.decide_queued), and the job is placed again at once without counting a
restart, while enough other idle verified workers remain; else it fails as before, with the
reason (a model path missing on every worker is not waited on behind other jobs). A refusal
lasts FORGET_S: a worker that was busy, or whose cache has room again, is asked again later (a
review: a job that lost a worker failed while the one that had once been busy sat idle).
Kept in memory, as FailedPaths: a restarted coordinator asks every worker again.
"""

from __future__ import annotations

import time

from coordinator.domain import Job, RankLaunch, WorkerRecord
from coordinator.placement import policy_refusal, workers_needed
from herd.errors import HerdError, PlacementError

FORGET_S = 300.0


class Refusals:
    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._by_job: dict[str, dict[str, tuple[str, float]]] = {}  # job -> worker -> (why, when)

    def of(self, job_id: str) -> dict[str, str]:
        """The workers that refused the job within FORGET_S, each with its reason ("refused
        attempt N: ...")."""
        now = self._clock()
        return {w: why for w, (why, at) in self._by_job.get(job_id, {}).items()
                if now - at < FORGET_S}

    def place_elsewhere(self, job: Job, failed: list[tuple[RankLaunch, HerdError]],
                        workers: list[WorkerRecord]) -> bool:
        """Records the workers that refused ``job``'s attempt in their own checks (PlacementError
        before any rank started); True when enough other idle verified workers remain for
        another attempt (``workers``: those other jobs hold marked so: placement.mark_held).
        False, recording nothing, when any rank failed for another reason."""
        if not all(isinstance(err, PlacementError) for _, err in failed):
            return False
        now = self._clock()
        self._by_job.setdefault(job.job_id, {}).update({
            launch.worker.worker_id: (f"refused attempt {job.attempt}: {err.message}", now)
            for launch, err in failed})
        mine = self.of(job.job_id)
        others = [w for w in workers if w.worker_id not in mine and not policy_refusal(job, w)
                  and w.running_job_id in ("", job.job_id)]
        return len(others) >= workers_needed(job.config)
