"""Which blobs a worker may read (GetBlob): only what its current attempt needs, the uploaded
files (dataset, resume adapter) of an active job it runs a rank of and the files of that job's
stored model (PrepareRank fetches them). A client (the laptop) is not held to this; it may read
any blob it could upload."""

from __future__ import annotations

from typing import Iterable

from coordinator.domain import Job
from coordinator.models import ModelStore
from herd.errors import AuthError


def check_worker_may_read(jobs: Iterable[Job], models: ModelStore, worker_id: str,
                          sha: str) -> None:
    for job in jobs:
        if not job.state.active or worker_id not in job.worker_ids:
            continue
        if sha in job.blobs():
            return
        model = models.get(job.model_digest) if job.model_digest else None
        if model is not None and any(f.sha256 == sha for f in model.files):
            return
    raise AuthError(f"worker {worker_id} runs no job with blob {sha[:12]}")
