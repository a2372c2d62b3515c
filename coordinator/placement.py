"""Placement policy: pure functions from (job needs, verified free workers) to a placement or a
PlacementError that says what is missing.

When the memory planner (coordinator/planner.py) is present and the model's config.json is
readable here, it decides the layout; otherwise every rank holds the whole model (data parallel)
and the need is estimated from the weight files' size.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path

from coordinator.domain import WorkerRecord
from herd.config import JobConfig
from herd.errors import PlacementError

# Weights plus LoRA state, activations and the allocator's slack, as a multiple of weight bytes.
OVERHEAD = 1.3
GB = 1024**3


@dataclass(frozen=True)
class Placement:
    worker_ids: list[str]   # rank order
    bytes_per_worker: int


def workers_needed(cfg: JobConfig) -> int:
    """cluster.workers, else data x pipeline when fixed, else one."""
    if cfg.cluster.workers:
        return cfg.cluster.workers
    dp = cfg.cluster.data_parallel()
    return (dp or 1) * cfg.cluster.pipeline_stages()


def model_bytes(model: str) -> int:
    """Size of the weight files when the model folder is readable here; 0 when unknown."""
    path = Path(model).expanduser()
    if not path.is_dir():
        return 0
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def _planner():
    try:
        return importlib.import_module("coordinator.planner")
    except ImportError:
        return None


def usable_bytes(w: WorkerRecord) -> int:
    """What a job may use on this worker: free memory, and on a Mac no more than the GPU may
    wire (iogpu.wired_limit_mb, or macOS's default share of RAM)."""
    free = w.free_memory_bytes or w.memory_bytes
    planner = _planner()
    if w.os.startswith("macOS") and planner is not None:
        return min(free, planner.macos_usable_bytes(w.memory_bytes, w.wired_limit_mb or None))
    return free


def _fmt(n: int) -> str:
    return f"{n / GB:.1f} GB"


def place(cfg: JobConfig, workers: list[WorkerRecord]) -> Placement:
    """Chooses workers for every rank, most free memory first, or raises PlacementError."""
    need = workers_needed(cfg)
    idle = [w for w in workers if not w.running_job_id]
    if len(idle) < need:
        busy = len(workers) - len(idle)
        raise PlacementError(
            f"needs {need} workers, {len(workers)} verified"
            + (f" ({busy} busy)" if busy else "")
            + f": missing {need - len(idle)}",
            hint="start more `herd worker`s with the cluster secret, or lower cluster.workers",
        )
    dp = cfg.cluster.data_parallel() or need // cfg.cluster.pipeline_stages()
    if dp and cfg.batch_size % dp:
        raise PlacementError(
            f"batch_size {cfg.batch_size} does not split over {dp} data-parallel ranks",
            hint=f"use a batch_size that is a multiple of {dp}",
        )
    ranked = sorted(idle, key=lambda w: (-usable_bytes(w), w.worker_id))
    planner = _planner()
    config_json = Path(cfg.model).expanduser() / "config.json"
    if planner is not None and config_json.exists():
        return _place_with_planner(planner, cfg, ranked[:need], json.loads(config_json.read_text()))
    per_worker = int(model_bytes(cfg.model) * OVERHEAD)
    chosen = ranked[:need]
    short = [w for w in chosen if per_worker > usable_bytes(w)]
    if short:
        w = short[0]
        raise PlacementError(
            f"needs {_fmt(per_worker)} per worker; {w.worker_id} has {_fmt(usable_bytes(w))} usable",
            hint="quantize the model (quantize: {bits: 4}), use pipeline stages, or add memory",
        )
    return Placement([w.worker_id for w in chosen], per_worker)


def _place_with_planner(planner, cfg: JobConfig, chosen: list[WorkerRecord],
                        model_config: dict) -> Placement:
    mem = [planner.WorkerMemory(worker_id=w.worker_id, memory_bytes=usable_bytes(w)) for w in chosen]
    plan = planner.plan_job(model_config, cfg, mem)
    if plan.pipeline_stages > 1:
        # The rank process trains data-parallel only for now; never start a layout it cannot run.
        raise PlacementError(
            f"the model fits only cut into {plan.pipeline_stages} pipeline stages, and pipeline "
            "training is not available in this version",
            hint="quantize the base (quantize: {bits: 4}), enable grad_checkpoint, or use "
            "workers with more memory",
        )
    ids = [replica[0] for replica in plan.assignments]
    peak = max(plan.peak_bytes_per_worker.values(), default=0)
    return Placement(ids, int(peak))
