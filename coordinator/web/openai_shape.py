"""herd's jobs in the shape of OpenAI's fine-tuning API (jobs, events, checkpoints, files), and a
create request back into herd's terms. Pure functions: the handlers are in openai_api.py.

Where the shapes differ: a file id is ``file-<sha256>`` (herd's blobs are content-addressed); the
job's mlx-lm YAML and its ``cluster:`` section ride as extra fields (``config``, ``cluster``), and
so does herd's own state (``herd``); ``hyperparameters.n_epochs`` becomes ``iters`` (epochs x
training examples / batch size); ``learning_rate_multiplier`` has no base rate to multiply in
mlx-lm, so only "auto" is accepted and ``learning_rate`` is set in ``config``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import yaml

from coordinator.domain import Checkpoint, Job, JobEvent, JobState
from herd.config import config_to_yaml, did_you_mean, read_yaml
from herd.digest import FileDigest
from herd.errors import ConfigError, DatasetError, HerdError, NotFoundError, PlacementError
from herd.models.source import describe_fetch

FILE_PREFIX = "file-"
STATUS = {JobState.QUEUED: "queued", JobState.PLACING: "running", JobState.RUNNING: "running",
          JobState.RESTARTING: "running", JobState.SUCCEEDED: "succeeded",
          JobState.FAILED: "failed", JobState.CANCELLED: "cancelled"}


def file_id(sha256: str) -> str:
    return FILE_PREFIX + sha256


def sha_of(fid: Any, key: str) -> str:
    if not isinstance(fid, str) or not fid.startswith(FILE_PREFIX) or len(fid) != 69:
        raise DatasetError(f"{key} = {fid!r} is not a herd file id",
                           hint="upload the JSONL first (POST /v1/files, purpose fine-tune); "
                           "its id is file-<sha256>")
    return fid[len(FILE_PREFIX):]


def file_object(sha256: str, size: int, created_s: int, filename: str = "") -> dict:
    return {"object": "file", "id": file_id(sha256), "bytes": size, "created_at": created_s,
            "filename": filename or f"{sha256[:12]}.jsonl", "purpose": "fine-tune",
            "status": "processed"}


# --- create ----------------------------------------------------------------------------------

# The fields a create request may hold (OpenAI's, and herd's own config and cluster): another is
# refused by name, as OpenAI refuses it ("clustr" was dropped without a word and the job ran on
# one worker with default hyperparameters: an outside run).
FIELDS = {"model", "training_file", "validation_file", "hyperparameters", "method", "suffix",
          "seed", "integrations", "metadata", "config", "cluster"}
HYPERPARAMETERS = {"n_epochs", "batch_size", "learning_rate_multiplier"}
METHOD = {"type", "supervised", "dpo", "reinforcement"}


def _known(given: Any, known: set[str], where: str) -> dict:
    if given is None:
        return {}
    if not isinstance(given, dict):
        raise ConfigError(f"{where or 'the request body'} is not a JSON object")
    for key in given:
        if key not in known:
            raise ConfigError(f"unknown field {where + '.' if where else ''}{key}"
                              + did_you_mean(str(key), known),
                              hint=f"known: {', '.join(sorted(known))}")
    return given


def _hyperparameters(body: dict) -> dict:
    hp = dict(_known(body.get("hyperparameters"), HYPERPARAMETERS, "hyperparameters"))
    method = _known(body.get("method"), METHOD, "method")
    _known(method.get("supervised"), {"hyperparameters"}, "method.supervised")
    _known((method.get("supervised") or {}).get("hyperparameters"), HYPERPARAMETERS,
           "method.supervised.hyperparameters")
    if method.get("type", "supervised") != "supervised":  # (it trained supervised, unsaid)
        raise ConfigError(f"method.type {method['type']!r} is not available in herd",
                          hint="herd trains LoRA/QLoRA adapters by supervised fine-tuning")
    for kind in ("supervised", "dpo", "reinforcement"):
        if kind in method and kind != "supervised":
            raise ConfigError(f"method.type {kind!r} is not available in herd",
                              hint="herd trains LoRA/QLoRA adapters by supervised fine-tuning")
    hp.update((method.get("supervised") or {}).get("hyperparameters") or {})
    return hp


def job_request(body: Any, count_examples: Callable[[str], int]) -> tuple[str, str,
                                                                          list[FileDigest]]:
    """A create request as herd's (name, config YAML, dataset). ``count_examples(sha)``: the
    training examples in an uploaded file (for ``n_epochs``)."""
    if not isinstance(body, dict):  # (`null` was an AttributeError, a 500: an outside run)
        raise ConfigError("the request body is not a JSON object",
                          hint='{"model": ..., "training_file": ...}')
    _known(body, FIELDS, "")
    config = body.get("config") or {}
    if isinstance(config, str):
        config = read_yaml(config, "config") or {}
    if not isinstance(config, dict):
        raise ConfigError("config must be an mlx_lm.lora YAML mapping (text or an object)")
    for key, instead in (("data", "training_file and validation_file"),
                         ("adapter_path", "GET .../checkpoints (or `herd pull`)")):
        if key in config:  # (it was dropped without a word: an outside run)
            raise ConfigError(f"config.{key}: the job API takes {instead} instead",
                              hint=f"remove {key} from config")
    model = body.get("model")
    if not model:
        raise ConfigError("model is required", hint="a model folder or hub id the workers load")
    if config.get("model") not in (None, model):
        raise ConfigError(f"model = {model!r} but config.model = {config['model']!r}",
                          hint="give the model once (either is fine)")
    config["model"] = model
    if body.get("cluster") is not None:
        config["cluster"] = body["cluster"]
    if body.get("seed") is not None:
        config["seed"] = body["seed"]
    if body.get("integrations"):
        raise ConfigError("integrations are not available in herd's job API",
                          hint="set report_to in config (mlx-lm's key)")
    hp = _hyperparameters(body)
    if hp.get("learning_rate_multiplier", "auto") != "auto":
        raise ConfigError("hyperparameters.learning_rate_multiplier has no base rate in mlx-lm",
                          hint="set learning_rate in config instead")
    if hp.get("batch_size", "auto") != "auto":
        config["batch_size"] = hp["batch_size"]
    train = sha_of(body.get("training_file"), "training_file")
    if hp.get("n_epochs", "auto") != "auto":
        epochs = hp["n_epochs"]
        if not isinstance(epochs, int) or epochs < 1:
            raise ConfigError(f"hyperparameters.n_epochs = {epochs!r}: a whole number >= 1")
        batch = config.get("batch_size", 4)
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:  # (0: a 500)
            raise ConfigError(f"batch_size = {batch!r}: a whole number >= 1")
        # An mlx-lm epoch is examples // batch_size batches (iterate_batches drops the rest); a
        # file smaller than one batch is refused by the dataset check with the figures.
        config["iters"] = max(1, epochs * (count_examples(train) // batch))
    dataset = [FileDigest("train.jsonl", train, 0)]
    if body.get("validation_file"):
        dataset.append(FileDigest("valid.jsonl", sha_of(body["validation_file"],
                                                        "validation_file"), 0))
    name = str(body.get("suffix") or "api")
    return name, yaml.safe_dump(config, sort_keys=False), dataset


# --- replies ---------------------------------------------------------------------------------

def job_object(job: Job, summary: dict | None, now_s: float, epochs: int | None = None) -> dict:
    """``epochs``: the whole epochs the job's iters make of its training file, when known."""
    cfg = job.config
    summary = summary or {}
    files = {d.name: file_id(d.sha256) for d in job.dataset}
    status = STATUS[job.state]
    eta = summary.get("eta_s")
    hp = {"n_epochs": epochs or "auto", "batch_size": cfg.batch_size,
          "learning_rate_multiplier": "auto"}
    model_name = cfg.model.rstrip("/").rsplit("/", 1)[-1]
    return {
        "object": "fine_tuning.job", "id": job.job_id, "model": cfg.model,
        "created_at": job.created_ms // 1000,
        "finished_at": job.updated_ms // 1000 if job.state.final else None,
        "fine_tuned_model": (f"ft:{model_name}:herd:{job.job_id}"
                             if job.state is JobState.SUCCEEDED else None),
        "organization_id": "herd", "result_files": [], "status": status,
        "training_file": files.get("train.jsonl"), "validation_file": files.get("valid.jsonl"),
        "hyperparameters": hp,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hp}},
        "trained_tokens": summary.get("tokens") or None,
        "error": ({"code": "job_failed", "message": job.message, "param": None}
                  if job.state is JobState.FAILED else None),
        "estimated_finish": int(now_s + eta) if eta is not None else None,
        "seed": cfg.seed, "integrations": [], "metadata": None, "user_provided_suffix": job.name,
        # herd's own fields
        "config": config_to_yaml(cfg),
        "cluster": cfg.cluster.model_dump(mode="json"),
        "herd": {"state": job.state.value, "message": job.message, "attempt": job.attempt,
                 "iteration": summary.get("iteration", 0), "iters": job.iters,
                 "workers": list(job.worker_ids), "restarts": summary.get("restarts", 0)},
    }


def event_object(e: JobEvent, iters: int) -> dict:
    out = {"object": "fine_tuning.job.event", "id": f"ftevent-{e.seq}",
           "created_at": e.time_ms // 1000, "level": "info", "message": e.message,
           "type": "message", "data": {"kind": e.kind.value}}
    if e.state is not None:
        out["data"]["state"] = e.state.value
        out["message"] = f"job {e.state.value}" + (f": {e.message}" if e.message else "")
        if e.state is JobState.FAILED:
            out["level"] = "error"
        elif e.state is JobState.RESTARTING:
            out["level"] = "warn"
    if (p := e.progress) is not None:
        # A validation's report carries the last window's training loss too: said once, by that
        # window's own report (a step showed two training losses: an outside run).
        train = None if p.val_loss else p.train_loss or None
        out["type"] = "metrics"
        out["data"] = {"step": p.iteration, "total_steps": iters, "rank": p.rank,
                       "worker_id": p.worker_id, "train_loss": train,
                       "valid_loss": p.val_loss or None,
                       "tokens_per_second": p.tokens_per_second,
                       "peak_memory_gb": p.peak_memory_gb}
        out["message"] = (f"Step {p.iteration}/{iters}: "
                          + (f"validation loss={p.val_loss:.4f}" if p.val_loss else
                             f"training loss={train:.4f}" if train else
                             f"peak memory={p.peak_memory_gb:.2f} GB")
                          + f" (rank {p.rank})")
    if (f := e.fetch) is not None:  # (its message was empty: an outside run)
        out["message"] = describe_fetch(f)
        out["data"].update(dataclasses.asdict(f))
    if e.step and e.progress is None:
        out["data"]["step"] = e.step
    return out


def checkpoint_object(c: Checkpoint, job: Job, metrics: dict) -> dict:
    model_name = job.config.model.rstrip("/").rsplit("/", 1)[-1]
    return {"object": "fine_tuning.job.checkpoint", "id": f"ftckpt-{c.step}",
            "created_at": c.created_ms // 1000, "fine_tuning_job_id": job.job_id,
            "fine_tuned_model_checkpoint": f"ft:{model_name}:herd:{job.job_id}:ckpt-step-{c.step}",
            "step_number": c.step, "metrics": {"step": c.step, **metrics},
            "bytes": sum(f.bytes for f in c.files),
            "download_url": f"/api/jobs/{job.job_id}/checkpoints/{c.step}/adapter.tar.gz"}


def page(items: list[dict], after: str | None, limit: int) -> dict:
    """OpenAI's cursor page: ``items`` newest first; ``after`` an id from an earlier page."""
    start = 0
    if after:
        ids = [i["id"] for i in items]
        if after not in ids:
            raise NotFoundError(f"after = {after!r} is not an id of this list")
        start = ids.index(after) + 1
    chunk = items[start:start + limit]
    return {"object": "list", "data": chunk, "has_more": start + limit < len(items)}


class TooLargeError(DatasetError):
    """A request body over its bound: 413."""


def error_status(e: HerdError) -> int:
    if isinstance(e, NotFoundError):
        return 404
    if isinstance(e, TooLargeError):
        return 413
    if isinstance(e, (ConfigError, DatasetError, PlacementError)):
        return 400
    return 500


def error_object(e: HerdError | str, code: str = "invalid_request_error") -> dict:
    if isinstance(e, str):
        return {"error": {"message": e, "type": code, "param": None, "code": code}}
    kind = "invalid_request_error" if error_status(e) < 500 else "server_error"
    return {"error": {"message": e.message, "hint": e.hint, "type": kind, "param": None,
                      "code": type(e).__name__}}
