"""What the planner says when a job does not fit: how far off it is, and the changes that would
make it fit, each with the layout and peak it would give."""

from __future__ import annotations

from typing import Iterable, Iterator

from coordinator.planner.layout import Plan, asked_for, layout, least_peak, most_stages
from coordinator.planner.memory import GB_SI, HEADROOM, ModelShape, WorkerMemory
from herd.config import JobConfig, Quantize
from herd.errors import ConfigError
from herd.stage_cut import pipeline_refusal


def _fits(cfg: dict, job: JobConfig, workers: list[WorkerMemory]) -> Plan | None:
    try:
        return layout(cfg, job, workers)
    except ConfigError:
        return None


def _describe(plan: Plan | None, cfg: dict, job: JobConfig, workers: list[WorkerMemory]) -> str:
    if plan is None:
        return f"still too big (needs {least_peak(cfg, job, workers) / GB_SI:.1f} GB per worker)"
    peak = max(plan.peak_bytes_per_worker.values())
    return (f"fits: {plan.data_parallel} x {plan.pipeline_stages} (data x pipeline), "
            f"peak {peak / GB_SI:.1f} GB per worker")


def halvings(value: int, floor: int) -> Iterator[int]:
    """value // 2, value // 4, ... while the previous one was above ``floor``."""
    while value > floor:
        value //= 2
        yield value


def first_fit(model_config: dict, job: JobConfig, workers: list[WorkerMemory], field: str,
              candidates: Iterable[int], **also) -> tuple[int, JobConfig, Plan] | None:
    """The first candidate value of ``field`` (with the ``also`` changes) that fits the workers:
    (value, the changed job, its plan); None when none does."""
    for value in candidates:
        changed = job.model_copy(update={field: value, **also})
        if (plan := _fits(model_config, changed, workers)) is not None:
            return value, changed, plan
    return None


def fixes(model_config: dict, job: JobConfig, workers: list[WorkerMemory]) -> list[str]:
    """Changes that would make the job fit, each with the layout and peak it would give."""
    shape = ModelShape.from_config(model_config)
    out: list[str] = []
    if job.cluster.workers and len(workers) > job.cluster.workers:
        # (idle verified workers: "1 more worker" read as buying a Mac: an outside run)
        j = job.model_copy(update={"cluster": job.cluster.model_copy(
            update={"workers": len(workers)})})
        fit = _describe(_fits(model_config, j, workers), model_config, j, workers)
        out.append(f"cluster.workers: {len(workers)} ({len(workers)} are verified) -> {fit}")
    if shape.bits is None and job.quantize is None:
        # (full fine-tuning cannot train a quantized base: LoRA on it, then; it was offered as
        # QLoRA alone, which the config check refuses: an outside run)
        lora = {"fine_tune_type": "lora"} if job.fine_tune_type == "full" else {}
        j = job.model_copy(update={"quantize": Quantize(bits=4, group_size=64), **lora})
        fit = _describe(_fits(model_config, j, workers), model_config, j, workers)
        what = "LoRA on a 4-bit base (fine_tune_type: lora, quantize: {bits: 4})" if lora \
            else "QLoRA (quantize: {bits: 4})"
        out.append(f"{what} -> {fit}")
    if not job.grad_checkpoint:
        j = job.model_copy(update={"grad_checkpoint": True})
        fit = _describe(_fits(model_config, j, workers), model_config, j, workers)
        out.append(f"grad_checkpoint: true -> {fit}")
    adapted = shape.layers if job.num_layers == -1 else min(job.num_layers, shape.layers)
    if hit := first_fit(model_config, job, workers, "num_layers", halvings(adapted, 1)):
        n, j, p = hit
        out.append(f"num_layers {n} -> {_describe(p, model_config, j, workers)}")
    auto = job.cluster.model_copy(update={"parallelism": "auto"})
    if hit := first_fit(model_config, job, workers, "batch_size", halvings(job.batch_size, 1),
                        cluster=auto):
        batch, j, p = hit
        out.append(f"batch_size {batch} (raise grad_accumulation_steps to keep the batch) -> "
                   f"{_describe(p, model_config, j, workers)}")
    if hit := first_fit(model_config, job, workers, "max_seq_length",
                        halvings(job.max_seq_length, 128)):
        seq, j, p = hit
        out.append(f"max_seq_length {seq} -> {_describe(p, model_config, j, workers)}")
    if found := more_workers(model_config, job, workers):
        extra, j, more, p = found
        out.append(f"{extra} more worker(s) of {max(w.memory_bytes for w in workers) / GB_SI:.0f}"
                   f" GB ({p.cluster_setting()}) -> {_describe(p, model_config, j, more)}")
    return out


def more_workers(model_config: dict, job: JobConfig, workers: list[WorkerMemory],
                 most: int = 32) -> tuple[int, JobConfig, list[WorkerMemory], Plan] | None:
    """The fewest extra workers (up to ``most``) like the largest one that make the job fit:
    doubling, then halving the gap (a layout of many workers is costly to search, and more
    workers like these never make a fitting job stop fitting)."""
    biggest = max(w.memory_bytes for w in workers)
    j = job.model_copy(update={"cluster": job.cluster.model_copy(update={"workers": None})})

    def attempt(extra: int):
        more = workers + [WorkerMemory(f"new-{i}", biggest) for i in range(extra)]
        return more, _fits(model_config, j, more)

    if attempt(0)[1] is not None:
        return None  # (the workers there hold it: cluster.workers is the fix, said first)
    low, high, hit = 0, 1, None  # low: known not to fit
    while high <= most and (hit := attempt(high))[1] is None:
        low, high = high, min(2 * high, most) if high < most else most + 1
    if high > most:
        return None
    while high - low > 1:
        mid = (low + high) // 2
        if (tried := attempt(mid))[1] is not None:
            high, hit = mid, tried
        else:
            low = mid
    return high, j, hit[0], hit[1]


def _gb(n: float) -> str:
    """GB with a figure that shows below one (tiny test models read "needs 0.0 GB ... offers 0.0
    GB": an outside run)."""
    gb = n / GB_SI
    return f"{gb:.1f} GB" if gb >= 1 else f"{gb:.3g} GB"


def refusal(cfg: dict, job: JobConfig, workers: list[WorkerMemory]) -> str:
    shape = ModelShape.from_config(cfg)
    mems = ", ".join(f"{w.worker_id} {_gb(w.memory_bytes)}" for w in workers)
    every = workers  # (the fixes weigh them all)
    workers = asked_for(job, workers)  # the figures are of those the job asks for, as layout's
    need = least_peak(cfg, job, workers)
    stages = most_stages(cfg, job, len(workers))
    uncut = pipeline_refusal(job, cfg) if stages == 1 and len(workers) > 1 else None
    low, top = (min(workers, key=lambda w: w.memory_bytes),
                max(workers, key=lambda w: w.memory_bytes))
    # Every worker holds a stage of an even cut: the smallest binds, not the largest (a 64 and a
    # 128 GB Mac read "needs 78.0 GB ... the largest worker offers 92.8 GB": an outside run).
    offers = (f"the smallest of them, {low.worker_id}, offers "
              if stages > 1 and low.memory_bytes < top.memory_bytes else
              "each worker offers " if stages > 1 else "the largest worker offers ")
    worker = low if stages > 1 else top
    lines = [
        f"the job does not fit: its {shape.layers}-block {shape.model_type} model needs "
        + (f"{_gb(need)} on one worker (it cannot be cut into pipeline stages: {uncut[0]})"
           if uncut else f"{_gb(need)} on the fullest worker even cut into {stages} pipeline "
           "stage(s)" + (", and no uneven cut fits either" if stages > 1 else ""))
        + (f" (cluster.workers: {len(workers)})" if len(every) > len(workers) else "")
        + f"; {offers}{_gb(worker.memory_bytes * (1 - HEADROOM))} ({_gb(worker.memory_bytes)} "
        f"usable less {HEADROOM:.0%} headroom). Workers: {mems}",
        "changes that would fit:",
    ]
    lines += [f"  - {f}" for f in fixes(cfg, job, every)] or ["  - none found"]
    return "\n".join(lines)
