"""Placement policy: pure functions from (job needs, verified free workers) to a placement or a
PlacementError that says what is missing.

When the model's config.json is readable here (its folder, the model store, or the hub: the
scheduler passes it in), the memory planner (coordinator/planner/) decides
the layout: data parallel, pipeline stages, or data x pipeline (ranks
in the MLX ring order the pipeline's topology expects, each stage's blocks); otherwise every rank
holds the whole model (data parallel), the need is estimated from the weight files' size, and a
pipeline is refused (its cut needs the block count).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

from coordinator import planner
from coordinator.domain import Job, JobState, WorkerRecord
from coordinator.planner.network import DataPath, choose_path
from herd.config import JobConfig
from herd.errors import ConfigError, DoesNotFitError, HerdError, PlacementError
from herd.model_config import check_against_model

# Weights plus LoRA state, activations and the allocator's slack, as a multiple of weight bytes.
OVERHEAD = 1.3


class TooFewWorkers(PlacementError):
    """Fewer idle workers than the job needs. ``busy_only``: enough are verified, other jobs
    hold them: a queue, where a job waits with no deadline (decide_queued)."""

    def __init__(self, message: str, hint: str | None = None, busy_only: bool = False):
        super().__init__(message, hint)
        self.busy_only = busy_only


@dataclass(frozen=True)
class Placement:
    worker_ids: list[str]   # rank order (for pipelines: the MLX ring order, Plan.ring_order)
    bytes_per_worker: int
    # Pipelines: blocks [start, end) per stage, in stage order; empty: data parallel only (or an
    # even cut the rank makes itself when no config.json is readable here).
    stage_layers: list[tuple[int, int]] = field(default_factory=list)
    data_parallel: int = 1  # pipelines (replicas) when stage_layers is set
    path: DataPath | None = None  # where the ranks exchange (None: not chosen yet)
    # Data parallel on workers of different memory: each rank's most examples (Plan.max_shares)
    max_shares: tuple[int, ...] | None = None

    @property
    def pipeline_stages(self) -> int:
        return max(1, len(self.stage_layers))


def workers_needed(cfg: JobConfig) -> int:
    """cluster.workers, else data x pipeline when fixed, else one."""
    if cfg.cluster.workers:
        return cfg.cluster.workers
    dp = cfg.cluster.data_parallel()
    return (dp or 1) * cfg.cluster.pipeline_stages()


def stages_of(cfg: JobConfig, cut: tuple | None) -> int:
    """The pipeline stages a placement has: the kept layout's (``cut``), else the config's."""
    return max(1, len(cut)) if cut is not None else cfg.cluster.pipeline_stages()


def model_bytes(model: str) -> int:
    """Size of the weight files when the model folder is readable here; 0 when unknown."""
    path = Path(model).expanduser()
    if not path.is_dir():
        return 0
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def usable_bytes(w: WorkerRecord) -> int:
    """What a job may use on this worker: free memory, and on a Mac no more than the GPU may
    wire (iogpu.wired_limit_mb, or macOS's default share of RAM)."""
    free = w.free_memory_bytes or w.memory_bytes
    if w.os.startswith("macOS"):
        return min(free, planner.macos_usable_bytes(w.memory_bytes, w.wired_limit_mb or None))
    return free


def _fmt(n: int) -> str:
    return f"{n / planner.GIB:.1f} GB"


def place(cfg: JobConfig, workers: list[WorkerRecord], model_config: dict | None = None,
          model_digest: str = "", cut: tuple[tuple[int, int], ...] | None = None) -> Placement:
    """Chooses workers for every rank, most free memory first, and the data path between them
    (coordinator/planner/network.py), or raises PlacementError. ``model_config``: the model's
    config.json (default: read from its folder, when one is here). ``model_digest``: the stored
    model's; among workers of the same memory (to the GiB), those whose cache holds it whole
    go first (a warm pair was passed over and another re-fetched 40 GB each: an outside run).
    ``cut``: the layout a restart keeps (``kept_cut``); None: the planner's choice."""
    placement = _place_by_memory(cfg, workers, model_config, model_digest, cut)
    by_id = {w.worker_id: w for w in workers}
    path = choose_path([by_id[w] for w in placement.worker_ids], cfg.cluster.exchange,
                       cfg.cluster.allow_wifi, pipeline=placement.pipeline_stages > 1)
    return with_path(placement, path)


def with_path(placement: Placement, path: DataPath) -> Placement:
    """``placement`` on ``path``, its ranks reordered when the path follows cables between pairs
    of workers (DataPath.order; data parallel only: a rank's place in a data-parallel ring
    changes which examples it reads, not the update)."""
    if list(path.order) in ([], list(range(len(placement.worker_ids)))):
        return replace(placement, path=path)
    caps = placement.max_shares
    return replace(placement, worker_ids=[placement.worker_ids[i] for i in path.order],
                   max_shares=caps and tuple(caps[i] for i in path.order), path=path)


def _place_by_memory(cfg: JobConfig, workers: list[WorkerRecord], model_config: dict | None,
                     model_digest: str = "", cut: tuple | None = None) -> Placement:
    need = workers_needed(cfg)
    idle = [w for w in workers if not w.running_job_id]
    if len(idle) < need:
        holders = sorted({w.running_job_id for w in workers if w.running_job_id})
        busy = len(workers) - len(idle)
        queued = len(workers) >= need
        # ("missing 5" for a 5-worker job on 2 busy workers read as if none existed: an
        # outside run; with busy ones, what is free and what must still join)
        short = (f": {len(idle)} free" + (f", {need - len(workers)} more to join"
                                          if len(workers) < need else "")
                 if busy else f": missing {need - len(idle)}")
        raise TooFewWorkers(
            f"needs {need} workers, {len(workers)} verified"
            + (f" ({busy} busy: running {', '.join(holders)})" if busy else "") + short,
            hint="it starts when they are free" if queued else
            "`herd join` and start more `herd worker`s, or lower cluster.workers",
            busy_only=queued)
    stages = stages_of(cfg, cut)
    dp = cfg.cluster.data_parallel() or need // stages
    if dp and not cfg.cluster.shares and (cfg.batch_size < dp or cfg.batch_size % dp and (
            why := cfg.cluster.uneven_split_why_not())):  # (shares split any batch)
        raise PlacementError(
            f"batch_size {cfg.batch_size} does not split over {dp} data-parallel ranks"
            + (f" ({why})" if cfg.batch_size >= dp else ""),
            hint=f"use a batch_size that is a multiple of {dp}",
        )
    # (the memory to the GiB first: a cache never costs the job memory it would have had)
    ranked = sorted(idle, key=lambda w: (-(usable_bytes(w) // planner.GIB),
                                         model_digest not in w.cached_models,
                                         -usable_bytes(w), w.worker_id))
    config_json = Path(cfg.model).expanduser() / "config.json"
    if model_config is None and config_json.exists():
        model_config = json.loads(config_json.read_text())
    if model_config is not None:
        return _place_with_planner(cfg, ranked[:need], model_config, cut)
    if stages > 1:
        # The cut, the ring order and the stage pieces' merge all need the block count.
        raise PlacementError(
            f"cutting {cfg.model} into {stages} pipeline stages needs its config.json, which the "
            "coordinator cannot read",
            hint="keep the model folder at the same path on the coordinator as on the workers")
    per_worker = int(model_bytes(cfg.model) * OVERHEAD)
    chosen = ranked[:need]
    short = [w for w in chosen if per_worker > usable_bytes(w)]
    if short:
        w = short[0]
        raise DoesNotFitError(
            f"needs {_fmt(per_worker)} per worker; {w.worker_id} has {_fmt(usable_bytes(w))} "
            "usable",
            hint="quantize the model (quantize: {bits: 4}), use pipeline stages, or add memory",
        )
    return Placement([w.worker_id for w in chosen], per_worker)


def policy_refusal(job: Job, w: WorkerRecord) -> str:
    """Why worker ``w`` would refuse ``job`` at its owner's policy check (worker/agent/policy.py
    Policy.check_job), as far as what it reported tells; "" when it would run it, or reported no
    policy (an older agent, a Ray node). A local model folder (not the coordinator's stored copy)
    is held to its model roots as the path reads: the CLI sends it resolved, the worker resolves
    it again on its own disk."""
    cfg = job.config
    if not w.model_roots:
        return ""
    if cfg.trust_remote_code and not w.allow_remote_code:
        return "it runs no code from jobs (the job sets trust_remote_code: true)"
    if job.model_digest or not os.path.isabs(cfg.model):  # stored, a hub id, or ~ (its home)
        return ""
    path = PurePosixPath(os.path.normpath(cfg.model))
    if any(path.is_relative_to(r) for r in w.model_roots):
        return ""
    return f"the model folder is outside its model roots ({', '.join(w.model_roots)})"


def policy_refusals(job: Job, workers: list[WorkerRecord]) -> dict[str, str]:
    """worker id -> why it would refuse ``job`` (policy_refusal), for those that would."""
    return {w.worker_id: f"would refuse it: {why}" for w in workers
            if (why := policy_refusal(job, w))}


def refusals_text(refused: dict[str, str]) -> str:
    return "; ".join(f"{w} {why}" for w, why in sorted(refused.items()))


def check_policies(job: Job, workers: list[WorkerRecord]) -> None:
    """At submit: PlacementError when enough workers are verified for the job and too few of
    them would run it (their owners' policies), naming each refusal and its fix; a job only
    short of workers waits, as in check_fits."""
    need, refused = workers_needed(job.config), policy_refusals(job, workers)
    if not refused or len(workers) < need or len(workers) - len(refused) >= need:
        return
    code = job.config.trust_remote_code and any("code" in why for why in refused.values())
    raise PlacementError(
        f"{job.config.model}: {len(workers) - len(refused)} of the {len(workers)} verified "
        f"workers would run this job, and it needs {need}: {refusals_text(refused)}",
        hint="remove trust_remote_code, or start those workers with --allow-remote-code if "
        "their owners trust every job submitter and model" if code else
        f"`herd models add {job.config.model}` (workers then fetch it from the coordinator), "
        "or keep it under a model root on every worker (herd worker --model-root FOLDER)")


def checkpoints_held(cfg: JobConfig, keep: int) -> int:
    """The most checkpoints of a job the coordinator holds at once: every one it saves (each
    save_every steps, and the final), or with ``keep`` (--keep-checkpoints) that many and the
    one written beside them before the oldest goes."""
    last = cfg.last_step()
    saves = last // cfg.save_every + (last % cfg.save_every != 0) if cfg.save_every else 1
    return max(1, min(saves, keep + 1) if keep else saves)


def checkpoint_bytes(cfg: JobConfig, model_config: dict | None = None) -> int:
    """One checkpoint's size on the coordinator: adapter and optimizer state, and for a pipeline
    also the adapter merged from its stages' pieces (left out, a pipeline job passed submit and
    failed on its last checkpoint: an outside run). ``model_config``: its config.json (default:
    the model folder's, when readable here); 0 when unknown."""
    try:
        if model_config is None:
            model_config = json.loads((Path(cfg.model).expanduser() / "config.json").read_text())
        est = planner.estimate_memory(model_config, cfg)
    except (OSError, ValueError, KeyError, TypeError, HerdError):
        return 0
    return est.lora + est.optimizer + (est.lora if cfg.cluster.pipeline_stages() > 1 else 0)


def check_submit(job: Job, workers: list[WorkerRecord], model_config: dict | None) -> None:
    """At submit: refused now, with numbers and fixes, if no set of the verified workers could
    ever hold the job (check_fits) or their owners would not run it (check_policies)."""
    check_fits(job.config, workers, model_config)
    check_policies(job, workers)


def check_fits(cfg: JobConfig, workers: list[WorkerRecord],
               model_config: dict | None = None) -> None:
    """At submit: raise DoesNotFitError when the job could not be placed even if every verified
    worker were idle with all its memory free. A job that is only short of workers (or whose model
    this coordinator cannot read) is not refused here: workers may join, and placement decides.
    Stages the model cannot have, or that cannot be cut without its config.json, are refused
    (ConfigError) whatever the workers: no placement could ever run them."""
    config_json = Path(cfg.model).expanduser() / "config.json"
    if model_config is None and config_json.is_file():
        model_config = json.loads(config_json.read_text())
    if model_config is not None:  # (the job API's jobs too: the CLI checked them on the laptop)
        check_against_model(cfg, model_config)
    elif cfg.cluster.parallelism != "auto" and cfg.cluster.pipeline_stages() > 1:
        raise ConfigError(
            f"cutting {cfg.model} into {cfg.cluster.pipeline_stages()} pipeline stages needs "
            "its config.json, which neither the coordinator nor `herd submit` could read",
            hint="submit from a machine that holds the model folder (or its config.json), or "
            "`herd models add` it to the coordinator's store")
    if len(workers) < workers_needed(cfg):
        return
    everyone = [replace(w, running_job_id="", free_memory_bytes=w.memory_bytes) for w in workers]
    try:
        place(cfg, everyone, model_config)
    except DoesNotFitError:
        raise
    except PlacementError:
        return


def _place_with_planner(cfg: JobConfig, chosen: list[WorkerRecord], model_config: dict,
                        cut: tuple | None = None) -> Placement:
    mem = [planner.WorkerMemory(worker_id=w.worker_id, memory_bytes=usable_bytes(w))
           for w in chosen]
    try:
        plan = planner.plan_job(model_config, cfg, mem, cut)
    except DoesNotFitError as e:
        # Submit and `herd plan` count a worker's whole memory (an app open then refuses no
        # job); placement, what is free now. Said, or it read as a plan that lied (an outside run).
        whole = [replace(m, memory_bytes=usable_bytes(replace(w, free_memory_bytes=0)))
                 for m, w in zip(mem, chosen)]
        try:
            if whole == mem or not planner.plan_job(model_config, cfg, whole, cut):
                raise
        except (PlacementError, ConfigError):
            raise e from None
        raise DoesNotFitError("it fits these workers' whole memory, not what is free on them "
                              f"now (other programs hold the rest): {e.message}",
                              hint="it starts once that memory is free") from None
    peak = int(max(plan.peak_bytes_per_worker.values(), default=0))
    ids = plan.ring_order()  # PlacementError for a layout the MLX ring cannot carry
    if plan.pipeline_stages == 1:
        return Placement(ids, peak, max_shares=plan.max_shares)
    if cfg.cluster.exchange == "grpc":
        raise PlacementError(
            f"{plan.data_parallel} x {plan.pipeline_stages} (data x pipeline): pipeline stages "
            "pass activations over the MLX ring, and cluster.exchange is grpc",
            hint="use cluster.exchange: mlx (or auto) for pipeline jobs")
    return Placement(ids, peak, [tuple(s) for s in plan.stage_layers], plan.data_parallel)


# --- what to do with a waiting job (the scheduler applies it) ------------------------------

@dataclass(frozen=True)
class Wait:
    reason: str
    busy: bool = False  # for workers other jobs hold: a queue (coordinator/queue.py)


@dataclass(frozen=True)
class Fail:
    reason: str


def decide_queued(job: Job, workers: list[WorkerRecord], now_ms: int,
                  placement_timeout_s: float, model_config: dict | None = None,
                  since_ms: int = 0, refused: dict[str, str] | None = None,
                  cut: tuple | None = None) -> Placement | Wait | Fail:
    """What to do with a queued (or restarting) job now. ``workers``: every verified one, those
    other jobs hold marked as running them (mark_held); those whose owners' policies refuse
    the job, and ``refused`` (worker id -> why: coordinator/refusals.py), are left out, and
    named while it waits. ``cut``: the layout its checkpoint keeps (``kept_cut``)."""
    refused = {**policy_refusals(job, workers), **(refused or {})}
    workers = [w for w in workers if w.worker_id not in refused]
    try:
        return place(job.config, workers, model_config, job.model_digest, cut)
    except PlacementError as e:
        reason = e.message + (f" ({refusals_text(refused)})" if refused else "")
        # A peer lost mid-job is first seen as the survivors' ranks failing ("lost a peer"):
        # here the waiting line names the worker of the last attempt that is not back.
        idle = {w.worker_id for w in workers if not w.running_job_id}
        gone = [w for w in job.worker_ids if w not in idle] if job.attempt else []
        if gone and isinstance(e, TooFewWorkers):
            reason += (f" (of attempt {job.attempt}'s workers, {', '.join(gone)} "
                       + ("is" if len(gone) == 1 else "are") + " gone or busy" + (
                           "; cluster.parallelism pins data: it waits, never shrinks"
                           if job.config.cluster.data_parallel() else "") + ")")
        if isinstance(e, TooFewWorkers) and e.busy_only:
            return Wait(reason, busy=True)  # a queue behind other jobs: as long as they run
        return wait_or_fail(job, Wait(reason), now_ms, placement_timeout_s, since_ms)
    except HerdError as e:
        return Fail(e.message)


def mark_held(workers: list[WorkerRecord], jobs: list[Job],
              job: Job | None = None) -> list[WorkerRecord]:
    """``workers``, each one an active job holds marked as running it (placement takes idle ones
    and names the jobs that hold the rest). For ``job``, a worker still running a rank of one of
    its own failed attempts is idle (the job is waiting, so every rank of it is stale): starting
    the new attempt's rank there stops the old one."""
    held = {w: j.job_id for j in jobs if j.state.active for w in j.worker_ids}
    return [replace(w, running_job_id=held[w.worker_id]) if w.worker_id in held
            else replace(w, running_job_id="", running_attempt=0)
            if job is not None and w.running_job_id == job.job_id else w for w in workers]


def wait_limit_s(job: Job, placement_timeout_s: float, elastic_grace_s: float) -> float:
    """How long a job waits for missing workers: a restarting one at least until it may shrink
    onto fewer (coordinator/elastic.py), with time for a few ticks."""
    if job.state is JobState.RESTARTING and elastic_grace_s:
        return max(placement_timeout_s, elastic_grace_s + 30.0)
    return placement_timeout_s


def wait_or_fail(job: Job, wait: Wait, now_ms: int, placement_timeout_s: float,
                 since_ms: int = 0) -> Wait | Fail:
    """Wait, until the job has waited ``placement_timeout_s`` since submit or its last attempt,
    and since ``since_ms`` (the coordinator's start: its own downtime is not the job's wait)."""
    since = max(since_ms, job.created_ms if job.state is JobState.QUEUED else job.updated_ms)
    if (now_ms - since) / 1000 >= placement_timeout_s:
        return Fail(f"could not be placed within {placement_timeout_s:.0f}s: {wait.reason}")
    return wait


def placing_text(placement: Placement, resume: int, note: str) -> str:
    """The placing line: where the ranks start, the layout, from which checkpoint."""
    layout = (f" as {placement.data_parallel} x {placement.pipeline_stages} (data x pipeline), "
              f"blocks {cut_text(placement.stage_layers)}" if placement.stage_layers else "")
    return (f"starting {len(placement.worker_ids)} ranks on " + ", ".join(placement.worker_ids)
            + layout + caps_text(placement)
            + (f", resuming from checkpoint {resume}" if resume else "") + note)


def caps_text(placement: Placement) -> str:
    """The placing line's note on each rank's memory cap (coordinator/planner/layout.py)."""
    if not placement.max_shares:
        return ""
    return (", examples per step at most " + ", ".join(
        f"{c} on {w}" for w, c in zip(placement.worker_ids, placement.max_shares))
        + " (their memory)")


def cut_text(spans) -> str:
    return ",".join(f"{a}:{b}" for a, b in spans)
