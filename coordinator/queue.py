"""The order waiting jobs are placed in, and the workers the ones ahead keep for themselves.

First in, first out, with the workers a waiting job needs reserved for it: a job that waits for
workers other jobs hold (or a restarting job, in its backoff or waiting for its workers) keeps
later jobs off the workers it needs. Without that, a stream of one-worker jobs took each worker
as it came free and a two-worker job waited for ever, and after a coordinator restart a job that
had been running lost its worker to one that had only been queued (an outside run). Restarting
jobs go first: they were running. A later job starts beside a waiting one only when enough idle
workers are left for both; no job's length is known, so nothing is backfilled on a guess.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from coordinator.domain import Job, JobState, WorkerRecord


def queue_order(waiting: list[Job]) -> list[Job]:
    """Restarting jobs (they were running), then the queue, oldest first."""
    return sorted(waiting, key=lambda j: (j.state is not JobState.RESTARTING, j.created_ms))


@dataclass
class Ahead:
    """The waiting jobs placed before this one in a scheduler pass, per backend."""

    needs: dict[str, list[tuple[str, int]]] = field(default_factory=dict)  # backend -> (id, n)

    def keep(self, job: Job, keeps: bool = True) -> None:
        """``job`` stays waiting and, when it ``keeps`` them, keeps the workers it needs from the
        jobs after it."""
        if keeps:
            self.needs.setdefault(job.config.cluster.backend, []).append(
                (job.job_id, job.workers_needed))

    def holds_back(self, job: Job, workers: list[WorkerRecord]) -> str | None:
        """Why ``job`` may not take its workers now (the jobs ahead need them), or None."""
        ahead = self.needs.get(job.config.cluster.backend)
        if not ahead:
            return None
        idle = sum(1 for w in workers if not w.running_job_id)
        if idle - job.workers_needed >= sum(n for _, n in ahead):
            return None
        names = ", ".join(job_id for job_id, _ in ahead[:3]) + (" ..." if len(ahead) > 3 else "")
        return (f"queued behind {names}: first in, first out (the workers they wait for are "
                "kept for them)")


def same_wait(said: str, reason: str) -> bool:
    """Whether a waiting job's ``reason`` says what it already ``said``: the same words and
    counts in any order, measures (figures with a decimal point) aside. Free memory moves by a
    tenth of a GB each tick and the workers named change order: each made a new event, 28
    four-line ones a minute in `herd watch` (an outside run). Said again when the words or a
    count change (another worker, another cause, "1 verified" to "2")."""
    def words(text: str) -> set[str]:
        return set(re.findall(r"[A-Za-z_][\w.-]*|(?<![\d.])\d+(?![\d.])", text))

    return words(said) == words(f"waiting: {reason}")
