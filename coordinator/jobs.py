"""A new job from a submitted config and dataset: checked the same way whichever door it came in
by (the gRPC SubmitJob, or the HTTP job API of coordinator/web/)."""

from __future__ import annotations

import os
import re
import tempfile
import uuid
from pathlib import Path

from coordinator.artifacts import BlobStore
from coordinator.domain import Job
from coordinator.models import ModelCatalog
from coordinator.placement import workers_needed
from herd.config import config_from_yaml
from herd.dataset import SPLITS, check_job_dataset, reads_hub_dataset
from herd.digest import FileDigest
from herd.errors import DatasetError
from herd.rpc.names import check_name, check_sha

REQUIRED_DATA = "train.jsonl"


def job_name(raw: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", raw).strip("-")[:40] or "job"


def new_job(name: str, config_yaml: str, dataset: list[FileDigest], blobs: BlobStore,
            models: ModelCatalog | None = None, model_digest: str = "") -> Job:
    """The job to queue; ConfigError / DatasetError (naming the fix) when it cannot run. With
    ``models``, the model is pinned: a hub id to its commit, and to the stored model when the
    coordinator's model store holds it (``model_digest``: a stored folder the CLI named)."""
    cfg = config_from_yaml(config_yaml, name or "<submitted config>")
    names = [check_name(d.name, "dataset") for d in dataset]
    for d in dataset:
        check_sha(d.sha256)
    # (a Hugging Face dataset ships no files: each rank loads it through `datasets`)
    if not reads_hub_dataset(cfg) and REQUIRED_DATA not in names:
        raise DatasetError(f"the dataset has no {REQUIRED_DATA}",
                           hint="a dataset folder holds train.jsonl (and valid.jsonl)")
    missing = [d.name for d in dataset if not blobs.has(d.sha256)]
    if missing:
        raise DatasetError(f"dataset files not uploaded: {', '.join(missing)}",
                           hint="`herd submit` uploads them before submitting")
    if not reads_hub_dataset(cfg):
        check_uploaded_dataset(cfg, dataset, blobs)
    if models is not None:
        cfg, model_digest = models.pin(cfg, model_digest)
    name = job_name(name)
    return Job(job_id=f"{name}-{uuid.uuid4().hex[:6]}", name=name, config=cfg, dataset=dataset,
               model_digest=model_digest, workers_needed=workers_needed(cfg), iters=cfg.iters)


def check_uploaded_dataset(cfg, dataset: list[FileDigest], blobs: BlobStore) -> None:
    """The uploaded splits' records, checked as `herd check` checks them without a tokenizer (the
    coordinator holds no model): every bad line is refused here, by file and line, before a worker
    is touched, even when the laptop skipped its own check (`herd submit --no-check`, the HTTP job
    API). The blobs are read in place, through a folder of links named as the splits."""
    splits = {f"{s}.jsonl" for s in SPLITS}
    with tempfile.TemporaryDirectory(prefix="herd-dataset-") as view:
        for d in dataset:
            if d.name in splits:
                os.symlink(blobs.path(d.sha256), Path(view) / d.name)
        check_job_dataset(cfg.model_copy(update={"data": view}), shown_as=str(cfg.data))
