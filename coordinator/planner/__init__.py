"""The memory planner: predicts each worker's peak memory from ``config.json`` alone and picks a
data x pipeline layout, or refuses with the changes that would make the job fit.

``memory`` is the model of one rank's peak bytes, ``layout`` the search for a layout that fits,
``fixes`` the refusal text. Pure arithmetic: no MLX, no grpc, no weights read.
"""

from __future__ import annotations

from coordinator.planner.fixes import fixes, refusal
from coordinator.planner.layout import Plan, layout, why_unused
from coordinator.planner.memory import (
    GB_SI,
    GIB,
    HEADROOM,
    MemoryEstimate,
    ModelShape,
    WorkerMemory,
    estimate_memory,
    macos_usable_bytes,
)
from herd.config import JobConfig
from herd.errors import DoesNotFitError, PlacementError
from herd.stage_cut import check_stages

__all__ = ["GB_SI", "GIB", "HEADROOM", "MemoryEstimate", "ModelShape", "Plan", "WorkerMemory",
           "estimate_memory", "fixes", "macos_usable_bytes", "plan_job", "why_unused"]


def plan_job(model_config: dict, job: JobConfig, workers: list[WorkerMemory],
             cut: tuple[tuple[int, int], ...] | None = None) -> Plan:
    """The layout with the fewest pipeline stages that fits, using as many data-parallel replicas
    as the workers allow; or PlacementError listing changes that fit, with their numbers.
    ``cut``: the layout a restart keeps (layout.layout)."""
    if not workers:
        raise PlacementError("no workers to place the job on", hint="start `herd worker` on a Mac")
    check_stages(model_config, job)
    plan = layout(model_config, job, workers, cut)
    if plan is not None:
        return plan
    if cut is not None:
        kept = (f"by {len(cut)} pipeline stages with blocks "
                + ",".join(f"{a}:{b}" for a, b in cut) if cut else "data parallel")
        raise PlacementError(
            f"its checkpoint was written {kept}, the layout every later attempt keeps (a stage "
            f"resumes only its own blocks' optimizer state), and these {len(workers)} workers "
            "cannot hold it", hint="it waits for workers with the memory of its last attempt's")
    fixed = job.cluster.data_parallel() or 1, job.cluster.pipeline_stages()
    if job.cluster.parallelism != "auto" and fixed[0] * fixed[1] > len(workers):
        raise PlacementError(
            f"cluster.parallelism asks for {fixed[0]} x {fixed[1]} (data x pipeline) = "
            f"{fixed[0] * fixed[1]} workers; {len(workers)} available",
            hint="add workers, or set cluster.parallelism: auto to let the planner choose",
        )
    raise DoesNotFitError(refusal(model_config, job, workers), hint="apply one of the fixes above")


