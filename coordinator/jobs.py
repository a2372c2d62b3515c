"""A new job from a submitted config and dataset: checked the same way whichever door it came in
by (the gRPC SubmitJob, or the HTTP job API of coordinator/web/)."""

from __future__ import annotations

import json
import os
import re
import tempfile
import uuid
from pathlib import Path

from coordinator.artifacts import AdapterStore, BlobStore, disk_errors, require_free
from coordinator.domain import Checkpoint, Job, JobState
from coordinator.models import ModelCatalog
from coordinator.placement import workers_needed
from herd.config import config_from_yaml
from herd.dataset import SPLITS, check_job_dataset
from herd.digest import FileDigest
from herd.errors import ConfigError, DatasetError, NotFoundError
from herd.hf_dataset import check_cluster_source
from herd.model_config import looks_like_hub_id
from herd.rpc.names import check_job_id, check_name, check_sha

REQUIRED_DATA = "train.jsonl"


def job_name(raw: str) -> str:
    # (a leading "_" made an id every call refused: herd/rpc/names.py check_job_id)
    return re.sub(r"[^A-Za-z0-9_-]+", "-", raw).lstrip("-_").rstrip("-")[:40] or "job"


def new_job(name: str, config_yaml: str, dataset: list[FileDigest], blobs: BlobStore,
            models: ModelCatalog | None = None, model_digest: str = "",
            resume_adapter: FileDigest | None = None, model_config_json: str = "") -> Job:
    """The job to queue; ConfigError / DatasetError (naming the fix) when it cannot run. With
    ``models``, the model is pinned: a hub id to its commit, and to the stored model when the
    coordinator's model store holds it (``model_digest``: a stored folder the CLI named).
    ``resume_adapter``: the config's resume_adapter_file, uploaded (``check_resume_adapter``).
    ``model_config_json``: the model's config.json as the laptop read it."""
    cfg = config_from_yaml(config_yaml, name or "<submitted config>")
    cfg.check_trains_on_a_cluster()  # (the HTTP job API's evaluate-only config was trained)
    names = [check_name(d.name, "dataset") for d in dataset]
    for d in dataset:
        check_sha(d.sha256)
    if len(set(names)) < len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise DatasetError(f"dataset files listed twice: {', '.join(twice)}")
    missing = [d.name for d in dataset if not blobs.has(d.sha256)]
    if missing:
        raise DatasetError(f"dataset files not uploaded: {', '.join(missing)}",
                           hint="`herd submit` uploads them before submitting")
    # What the laptop shipped decides (herd/dataset.py reads_hub_dataset there, on its own
    # folders): files, or a Hugging Face dataset that each rank loads through `datasets`, which
    # must then be a hub dataset, never a path or a file loader on the workers.
    if cfg.hf_dataset or not dataset:
        check_cluster_source(cfg, shipped=bool(dataset))
    elif REQUIRED_DATA not in names:
        raise DatasetError(f"the dataset has no {REQUIRED_DATA}",
                           hint="a dataset folder holds train.jsonl (and valid.jsonl)")
    else:
        check_uploaded_dataset(cfg, dataset, blobs)
    if resume_adapter is not None:
        check_resume_adapter(cfg, resume_adapter, blobs)
    elif cfg.resume_adapter_file:  # read on the workers, it would be any file of theirs
        raise ConfigError(f"resume_adapter_file {cfg.resume_adapter_file} was not sent with the "
                          "job", hint="`herd submit` sends it when the file exists where it runs")
    if models is not None:
        cfg, model_digest = models.pin(cfg, model_digest)
    if not model_digest:
        check_model_reference(cfg.model)
    name = job_name(name)
    return Job(job_id=f"{name}-{uuid.uuid4().hex[:6]}", name=name, config=cfg, dataset=dataset,
               model_digest=model_digest, workers_needed=workers_needed(cfg), iters=cfg.iters,
               resume_adapter=resume_adapter, model_config=sent_model_config(model_config_json))


MAX_MODEL_CONFIG = 1 << 20  # a config.json is a few KB; a vision model's, tens


def sent_model_config(text: str) -> dict | None:
    """The model's config.json a laptop sent (None: none): a JSON object the planner can read,
    else ConfigError (it decides whether the job fits)."""
    if not text:
        return None
    if len(text) > MAX_MODEL_CONFIG:
        raise ConfigError(f"the model's config.json sent with the job is {len(text)} bytes, "
                          f"over {MAX_MODEL_CONFIG}")
    try:
        parsed = json.loads(text)
    except (ValueError, RecursionError) as e:  # (RecursionError: nested deeper than Python reads)
        raise ConfigError(f"the model's config.json sent with the job is not JSON: {e}") from None
    if not isinstance(parsed, dict):
        raise ConfigError("the model's config.json sent with the job is not a JSON object")
    return parsed


def check_resume_adapter(cfg, f: FileDigest, blobs: BlobStore) -> None:
    """A shipped resume adapter: for a config that names one, a .safetensors file, uploaded
    with the size it claims (its bytes were checked against its sha256 on upload)."""
    if not cfg.resume_adapter_file:
        raise ConfigError("a resume adapter was sent with a config that has no "
                          "resume_adapter_file")
    if not check_name(f.name, "checkpoint").endswith(".safetensors"):
        raise ConfigError(f"resume adapter {f.name!r} is not a .safetensors file")
    if not blobs.has(check_sha(f.sha256)) or blobs.path(f.sha256).stat().st_size != f.bytes:
        raise DatasetError(f"resume_adapter_file {cfg.resume_adapter_file} was not uploaded",
                           hint="`herd submit` uploads it before submitting")


def check_uploaded_dataset(cfg, dataset: list[FileDigest], blobs: BlobStore) -> None:
    """The uploaded splits' records, checked as `herd check` checks them without a tokenizer (the
    coordinator holds no model): every bad line is refused here, by file and line, before a worker
    is touched, even when the laptop skipped its own check (`herd submit --no-check`, the HTTP job
    API). The blobs are read in place, through a folder of links named as the splits, made in
    the state folder: a service's /tmp may be read-only (systemd's ProtectSystem=strict, where
    every submit failed: an outside run)."""
    splits, state = {f"{s}.jsonl" for s in SPLITS}, blobs.root.parent
    # A full disk is a StorageError (exit 8) here too: the links need a few blocks, and a
    # coordinator's disk that rank logs had filled failed the submit as "Exception calling
    # application" (CI, after a checkpoint had been refused for want of room).
    require_free(state, 0, "a new job (its dataset is checked through links written there)")
    with disk_errors(state, "the links to check the uploaded dataset"), \
            tempfile.TemporaryDirectory(prefix=".dataset-view-", dir=state) as view:
        for d in dataset:
            if d.name in splits:
                os.symlink(blobs.path(d.sha256), Path(view) / d.name)
        # (a config without `data`, as the HTTP job API's, holds mlx-lm's default: not the user's)
        shown = str(cfg.data) if "data" in cfg.model_fields_set else "uploaded with the job"
        check_job_dataset(cfg.model_copy(update={"data": view}), shown_as=shown)


# What a checkpoint's adapter and optimizer state are shaped by: a job starting from another's
# checkpoint must keep them (its rank would refuse the checkpoint, after placement).
SAME_SHAPE = ("model", "fine_tune_type", "num_layers", "lora_parameters", "quantize", "optimizer",
              "cluster.packing")


def no_checkpoint(job: Job, step: int, have: list[int]) -> NotFoundError:
    """A job has no stored checkpoint (at ``step``, when given); the hint says which it has, or
    why it has none."""
    if have:
        hint = f"stored steps: {have}"
    elif job.state.final:
        hint = f"it {job.state.value} before saving one"
    elif job.state is JobState.QUEUED:
        hint = "it has not started yet"
    else:
        hint = f"it has not saved one yet (one every {job.config.save_every} steps)"
    return NotFoundError(f"job {job.job_id} has no checkpoint"
                         + (f" at step {step}" if step else ""), hint=hint)


def start_from(job: Job, ref: str, store, adapters: AdapterStore, now_ms: int) -> Checkpoint:
    """``herd submit --resume-from JOB[@STEP]``: that job's stored checkpoint (the latest, or
    STEP) copied as ``job``'s own, so that its first attempt resumes from it exactly, as a
    restart does. ConfigError / NotFoundError naming what does not fit, before anything runs."""
    source_id, at, step = ref.partition("@")
    source = store.get_job(check_job_id(source_id))  # NotFoundError naming it
    stored = store.checkpoints(source.job_id)
    have = [c.step for c in stored]
    if at and not step.isdigit():
        raise ConfigError(f"--resume-from {ref}: the step after @ is a number")
    picked = [c for c in stored if not step or c.step == int(step)]
    if not picked:
        raise no_checkpoint(source, int(step or 0), have)
    checkpoint = picked[-1]
    for key in SAME_SHAPE:
        mine, theirs = _get(job.config, key), _get(source.config, key)
        if mine != theirs:
            raise ConfigError(f"--resume-from {ref}: {key} is {mine!r} here but {theirs!r} in "
                              f"{source.job_id}; its checkpoint holds an adapter and optimizer "
                              "state of that shape", hint=f"set {key} as {source.job_id} had it")
    cfg = job.config
    if checkpoint.step >= cfg.last_step() or checkpoint.step % cfg.grad_accumulation_steps:
        raise ConfigError(f"--resume-from {ref}: checkpoint {checkpoint.step} must fall before "
                          f"the last optimizer step ({cfg.last_step()}) and on an optimizer step "
                          f"of grad_accumulation_steps {cfg.grad_accumulation_steps}",
                          hint="raise iters to train on from there")
    _check_layout(ref, source, checkpoint.step, adapters.stages_of(source.job_id, checkpoint.step),
                  cfg)
    if problem := adapters.verify(checkpoint):
        raise NotFoundError(f"checkpoint {checkpoint.step} of {source.job_id} is damaged "
                            f"({problem})", hint=f"stored steps: {have}")
    adapters.copy_step(checkpoint, job.job_id)
    return Checkpoint(job.job_id, checkpoint.step, checkpoint.files, now_ms)


def _check_layout(ref: str, source: Job, step: int, stages: int, cfg) -> None:
    """A pipeline's checkpoint keeps its optimizer state and step in its stage pieces: another
    layout resumed its weights only, from iteration 1 with a fresh optimizer, while `herd watch`
    said "resuming from checkpoint N"; and a pipeline could not start from a data-parallel
    checkpoint at all, failing on a worker (an outside run). Refused here instead."""
    pinned = cfg.cluster.pipeline_stages() if cfg.cluster.parallelism != "auto" else None
    if stages > 1 and pinned != stages:
        raise ConfigError(
            f"--resume-from {ref}: checkpoint {step} of {source.job_id} was written by "
            f"{stages} pipeline stages, which hold its optimizer state and position; this job's "
            f"layout is {'auto' if pinned is None else f'{pinned} stage(s)'}",
            hint=f"pin cluster.parallelism: {{data: N, pipeline: {stages}}} as "
            f"{source.job_id} ran")
    if stages <= 1 and pinned and pinned > 1:
        raise ConfigError(
            f"--resume-from {ref}: checkpoint {step} of {source.job_id} was not written by "
            f"pipeline stages; a job cut into {pinned} stages cannot resume from it",
            hint="resume it data parallel (cluster.parallelism: auto, or {data: N, pipeline: 1})")


def _get(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg.model_dump() if hasattr(cfg, "model_dump") else cfg


def check_model_reference(model: str) -> None:
    """A model the workers can name: an absolute path, one in their user's home (``~/``), or a
    hub id (``org/name``, or a legacy ``name``). Refused at submit otherwise: `../x` or
    `~root/x` were queued, then every worker's policy refused them as the job started (an
    outside run)."""
    legacy = re.fullmatch(r"[A-Za-z0-9][\w.-]*(@[\w.-]+)?", model)  # a hub id without org: gpt2
    if (os.path.isabs(model) or model == "~" or model.startswith("~/")
            or looks_like_hub_id(model) or legacy):
        return
    raise ConfigError(f"model = {model!r}: the workers load a model from an absolute path, from "
                      "~/ (their own user's home) or by hub id (org/name)",
                      hint="`herd submit` resolves a relative path from the current folder; "
                      "send that absolute path")
