"""The planner's layout search: the data x pipeline layout, and each stage's blocks, that fits
the workers' memory (coordinator/planner/memory.py) with the fewest pipeline stages."""

from __future__ import annotations

from dataclasses import dataclass, field

from coordinator.planner.memory import (
    HEADROOM,
    MemoryEstimate,
    ModelShape,
    WorkerMemory,
    estimate_memory,
)
from herd.config import JobConfig
from herd.errors import PlacementError
from herd.stage_cut import balanced_split, head_blocks, pipeline_refusal


@dataclass(frozen=True)
class Plan:
    data_parallel: int
    pipeline_stages: int
    stage_layers: list[tuple[int, int]]  # [start, end) per stage
    assignments: list[list[str]]  # [replica][stage] -> worker_id
    peak_bytes_per_worker: dict[str, int]
    microbatches: int = 1  # per replica and optimizer step (1F1B); 1 without pipelining
    estimates: dict[str, MemoryEstimate] = field(default_factory=dict)
    # Data parallel on workers of different memory: the most examples (rows) each rank, in rank
    # order, may take of the global batch (cluster.max_shares); None: any split fits every one.
    max_shares: tuple[int, ...] | None = None

    def cluster_setting(self) -> str:
        """The config lines that run a job as this layout: placement takes cluster.workers (one
        when unset), and a pipeline is spelled out (under auto, a batch smaller than the
        workers is refused before the planner could choose stages)."""
        n = self.data_parallel * self.pipeline_stages
        if self.pipeline_stages > 1:
            return (f"cluster: {{workers: {n}, parallelism: {{data: {self.data_parallel}, "
                    f"pipeline: {self.pipeline_stages}}}}}")
        return f"cluster: {{workers: {n}}}"

    def ring_order(self) -> list[str]:
        """Worker ids in MLX-ring rank order for ``python -m worker.pipeline``: replica 0's
        stages forward, then replica 1's backward, so every pipeline hop and every replica pair
        are ring neighbours (worker/pipeline/topology.py Topology). Data parallel only: replica
        order."""
        if self.pipeline_stages == 1:
            return [rep[0] for rep in self.assignments]
        if self.data_parallel > 2:
            raise PlacementError(
                f"{self.data_parallel} x {self.pipeline_stages} needs a transport that reaches any "
                "peer; the MLX ring carries at most 2 pipelines",
                hint="pin cluster.parallelism.data to 1 or 2",
            )
        order = list(self.assignments[0])
        if self.data_parallel == 2:
            order += list(reversed(self.assignments[1]))
        return order


def _stage_estimate(cfg: dict, job: JobConfig, shape: ModelShape, span: tuple[int, int],
                    stages: int, dp: int, stage: int = 0) -> MemoryEstimate:
    return estimate_memory(
        cfg, job, span,
        has_embed=span[0] == 0, has_head=span[1] == shape.layers,
        microbatches=_microbatches(job, stages, dp), data_parallel=dp, in_flight=stages - stage,
    )


def _microbatches(job: JobConfig, stages: int, dp: int) -> int:
    # One example per microbatch: the most microbatches a replica's batch allows, which is what
    # brings GPipe closest to its bound m / (m + S - 1).
    return 1 if stages == 1 else max(1, job.batch_size // dp)


def _split(cfg: dict, job: JobConfig, shape: ModelShape, mems: list[int], dp: int
           ) -> list[tuple[int, int]] | None:
    """Cut the blocks into len(mems) contiguous stages so that the fullest stage's share of its
    worker's budget is as small as possible (bisection on that share, greedy packing)."""
    stages = len(mems)
    if stages > shape.layers:
        return None

    def pack(share: float) -> list[tuple[int, int]] | None:
        spans, start = [], 0
        for s, mem in enumerate(mems):
            left = stages - s - 1
            end = start
            # Greedy: take blocks while they fit, leaving at least one block per later stage.
            while end < shape.layers - left:
                est = _stage_estimate(cfg, job, shape, (start, end + 1), stages, dp, s)
                if est.total > share * mem:
                    break
                end += 1
            if s == stages - 1 and end < shape.layers:
                return None
            if end == start:
                return None
            spans.append((start, end))
            start = end
        return spans

    lo, hi = 0.0, 1.0
    best = pack(hi)
    if best is None:
        return None
    for _ in range(20):
        mid = (lo + hi) / 2
        spans = pack(mid)
        if spans is None:
            lo = mid
        else:
            hi, best = mid, spans
    return best


def _balanced_if_it_fits(cfg: dict, job: JobConfig, shape: ModelShape, mems: list[int], dp: int
                         ) -> list[tuple[int, int]] | None:
    """The cut of equal compute (herd/stage_cut.py) when every stage fits its worker: a pipeline
    runs at its slowest stage's pace, so memory decides the cut only when it must."""
    stages = len(mems)
    if not 1 < stages <= shape.layers:
        return None  # one stage has nothing to balance
    spans = balanced_split(shape.layers, stages, head_blocks(cfg),
                           job.first_adapted_layer(shape.layers))
    for s, (span, mem) in enumerate(zip(spans, mems)):
        if _stage_estimate(cfg, job, shape, span, stages, dp, s).total > mem:
            return None
    return spans


def max_examples(cfg: dict, job: JobConfig, budget: int) -> int:
    """The most examples (rows, with packing) of the global batch one data-parallel rank holding
    the whole model can take within ``budget`` bytes (0: not even one). Bisection: the estimate
    grows with the examples."""
    def fits(k: int) -> bool:
        one = job.model_copy(update={"batch_size": k})
        return estimate_memory(cfg, one).total <= budget

    lo, hi = 0, job.batch_size
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def _data_parallel_by_memory(cfg: dict, job: JobConfig, shape: ModelShape,
                             used: list[WorkerMemory], budget: dict[str, int]) -> Plan | None:
    """Data parallel without stages, token-weighted: any split of the global batch gives the same
    update, so a worker with less memory may take fewer examples. Each rank's cap is what its
    memory holds; the plan fits when the caps cover the batch. The caps go to the ranks as
    cluster.max_shares (the speed balancer never moves a rank past its own), set only where
    one could be reached: a rank can be given at most batch - (ranks - 1) examples."""
    dp = len(used)
    caps = [max_examples(cfg, job, budget[w.worker_id]) for w in used]
    if min(caps) < 1 or sum(caps) < job.batch_size:
        return None
    binding = min(caps) < job.batch_size - (dp - 1)
    return _make_plan(cfg, job, shape, [[w] for w in used], [(0, shape.layers)], dp, 1,
                      caps=tuple(caps) if binding else None)


def _kept_cut_fits(cfg: dict, job: JobConfig, shape: ModelShape, cut: list[tuple[int, int]],
                   mems: list[int], dp: int) -> list[tuple[int, int]] | None:
    stages = len(cut)
    if all(_stage_estimate(cfg, job, shape, span, stages, dp, s).total <= mem
           for s, (span, mem) in enumerate(zip(cut, mems))):
        return cut
    return None


def layout(cfg: dict, job: JobConfig, workers: list[WorkerMemory],
           cut: tuple[tuple[int, int], ...] | None = None) -> Plan | None:
    """The layout with the fewest stages that fits, on as many replicas as the workers allow.
    ``cut``: the layout a restart keeps (its checkpoint's: the stages' blocks, or () for data
    parallel), only the replicas free; None: any."""
    shape = ModelShape.from_config(cfg)
    budget = {w.worker_id: int(w.memory_bytes * (1 - HEADROOM)) for w in workers}
    pool = asked_for(job, workers)
    fixed_dp = job.cluster.data_parallel()
    fixed_pp = job.cluster.pipeline_stages() if job.cluster.parallelism != "auto" else None
    if cut is not None:
        fixed_pp = max(1, len(cut))
    # (auto plans no stages for a job or model a stage cannot run: herd.stage_cut)
    most = most_stages(cfg, job, len(pool))
    for stages in ([fixed_pp] if fixed_pp else range(1, most + 1)):
        # (the MLX ring carries at most 2 pipelines, Plan.ring_order: 3 x 2 planned on big Macs
        # was then refused, where 2 x 2 fits: a review)
        max_dp = len(pool) // stages if stages == 1 or fixed_dp else min(2, len(pool) // stages)
        if max_dp == 0:
            continue
        for dp in ([fixed_dp] if fixed_dp else range(max_dp, 0, -1)):
            if dp > max_dp or dp > job.batch_size or (
                    job.batch_size % dp and job.cluster.uneven_split_why_not(stages)):
                continue  # (token-weighted data parallelism splits any batch: 4 over 3 ranks)
            used = pool[: dp * stages]
            if stages == 1 and dp > 1 and job.cluster.gradient_average != "mlx_lm":
                if (plan := _data_parallel_by_memory(cfg, job, shape, used, budget)) is not None:
                    return plan
                continue
            # Deal the workers, largest first, so every pipeline gets a similar mix.
            replicas = [used[i::dp] for i in range(dp)]
            # One cut for every replica: data-parallel peers must hold the same blocks to sum
            # their gradients. Each stage is sized for the smallest worker that will run it.
            mems = [min(budget[rep[s].worker_id] for rep in replicas) for s in range(stages)]
            spans = (_kept_cut_fits(cfg, job, shape, list(cut), mems, dp) if cut else
                     _balanced_if_it_fits(cfg, job, shape, mems, dp)
                     or _split(cfg, job, shape, mems, dp))
            if spans is not None:
                return _make_plan(cfg, job, shape, replicas, spans, dp, stages)
    return None


def _make_plan(cfg: dict, job: JobConfig, shape: ModelShape, replicas: list[list[WorkerMemory]],
               spans: list[tuple[int, int]], dp: int, stages: int,
               caps: tuple[int, ...] | None = None) -> Plan:
    peaks, estimates = {}, {}
    for r, rep in enumerate(replicas):
        for s, (w, span) in enumerate(zip(rep, spans)):
            if caps:  # the most this rank may be given
                est = estimate_memory(cfg, job.model_copy(update={"batch_size": caps[r]}))
            else:
                est = _stage_estimate(cfg, job, shape, span, stages, dp, s)
            peaks[w.worker_id], estimates[w.worker_id] = est.total, est
    return Plan(
        data_parallel=dp,
        pipeline_stages=stages,
        stage_layers=list(spans),
        assignments=[[w.worker_id for w in rep] for rep in replicas],
        peak_bytes_per_worker=peaks,
        microbatches=_microbatches(job, stages, dp),
        estimates=estimates,
        max_shares=caps,
    )


def asked_for(job: JobConfig, workers: list[WorkerMemory]) -> list[WorkerMemory]:
    """The workers a layout uses: the largest first, at most cluster.workers of them."""
    return sorted(workers, key=lambda w: -w.memory_bytes)[:job.cluster.workers or None]


def most_stages(cfg: dict, job: JobConfig, workers: int) -> int:
    """The most pipeline stages ``job`` may be cut into on ``workers`` workers (at most its
    cluster.workers): one when no stage can run it (herd.stage_cut: full fine-tuning, a model a
    stage cannot hold)."""
    workers = min(workers, job.cluster.workers or workers)
    return 1 if pipeline_refusal(job, cfg) else min(workers, ModelShape.from_config(cfg).layers)


def least_peak(cfg: dict, job: JobConfig, workers: list[WorkerMemory]) -> int:
    """The smallest per-worker peak any layout over ``workers`` can reach (for the refusal text)."""
    shape = ModelShape.from_config(cfg)
    stages = most_stages(cfg, job, len(workers))
    per_stage = -(-shape.layers // stages)
    spans = [(s, min(s + per_stage, shape.layers)) for s in range(0, shape.layers, per_stage)]
    return max(_stage_estimate(cfg, job, shape, sp, len(spans), 1, s).total
               for s, sp in enumerate(spans))


def why_unused(cfg: dict, job: JobConfig, workers: list[WorkerMemory], plan: Plan) -> str:
    """Why ``plan`` leaves some of ``workers`` idle, the first reason layout() met, for `herd
    plan` ("" when it uses them all; an outside run: "unused: w2" said nothing more)."""
    idle = [w for w in workers if w.worker_id not in plan.peak_bytes_per_worker]
    if not idle:
        return ""
    dp, stages, batch = plan.data_parallel, plan.pipeline_stages, job.batch_size
    if job.cluster.workers and len(workers) > job.cluster.workers:
        return f"the job asks for cluster.workers: {job.cluster.workers}"
    if job.cluster.parallelism != "auto":
        return (f"cluster.parallelism asks for {job.cluster.data_parallel() or dp} x "
                f"{job.cluster.pipeline_stages()} (data x pipeline)")
    if (dp + 1) * stages > len(workers):
        return f"each replica of this {stages}-stage pipeline takes {stages} workers"
    if dp + 1 > batch:
        return f"batch_size {batch} gives at most {batch} replicas an example each"
    if batch % (dp + 1) and (why := job.cluster.uneven_split_why_not(stages)):
        return f"batch_size {batch} does not split evenly over {dp + 1} replicas ({why})"
    if stages == 1 and job.cluster.gradient_average != "mlx_lm":
        one = estimate_memory(cfg, job.model_copy(update={"batch_size": 1})).total
        small = [w for w in idle if w.memory_bytes * (1 - HEADROOM) < one]
        if small:
            who = "" if len(small) == len(idle) else ", ".join(w.worker_id for w in small) + ": "
            return (f"{who}less usable memory than the {one / 1e9:.2f} GB one example of the "
                    f"batch needs (with {HEADROOM:.0%} headroom)")
    return ("with them the layout does not fit: each stage is sized for the smallest worker "
            "that runs it")
