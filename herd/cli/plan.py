"""``herd plan CONFIG``: predicted peak memory per worker and the layout the planner picks, or
the refusal with its fixes. Reads the model's config.json only (a local folder's, or a hub id's
from the local Hugging Face cache: herd/model_config.py).

Which workers it plans for, and it says which: ``--workers`` when given; else the live cluster's
verified workers when a coordinator answers (--coordinator, $HERD_COORDINATOR or zeroconf);
else this machine alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from coordinator.convert import worker_from_pb
from coordinator.placement import usable_bytes, workers_needed
from coordinator.planner import (
    GB_SI,
    GIB,
    Plan,
    WorkerMemory,
    macos_usable_bytes,
    plan_job,
    why_unused,
)
from herd.cli.connection import COORDINATOR_ENV, add_connection_args, client_identity, connect
from herd.config import JobConfig, load_config
from herd.errors import ConfigError, DoesNotFitError, HerdError, PeerLostError
from herd.model_config import check_against_model, resolve_model_config
from herd.usage import HelpFormatter
from protos.v1 import coordinator_pb2


def _given(spec: str, macos: bool) -> list[WorkerMemory]:
    try:
        sizes = [float(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(
            f"--workers {spec!r}: give GB of RAM per worker, e.g. 64,96,192") from None
    out = []
    for i, gb in enumerate(sizes):
        total = int(gb * GIB)  # a "64 GB" Mac has 64 GiB
        out.append(WorkerMemory(f"w{i}-{gb:g}GB", macos_usable_bytes(total) if macos else total))
    return out


def _cluster(args, backend: str = "zeroconf") -> tuple[list[WorkerMemory], str] | None:
    """The verified workers of the coordinator that answers of the job's ``backend`` (a Ray
    node's record carries its Ray resources, an agent's none; all memory counted free, as at
    submit), or None when none answers and none was named."""
    named = args.coordinator or os.environ.get(COORDINATOR_ENV)
    try:
        with connect(args.coordinator, client_identity(args), wait_s=2.0) as coord:
            reply = coord.call("ListWorkers", coordinator_pb2.ListWorkersRequest())
            where = f"the cluster at {coord.target} (found by {coord.found_by})"
    except HerdError:
        if named:
            raise  # asked for that coordinator: say why it did not answer
        return None
    workers = []
    for w in map(worker_from_pb, reply.workers):
        if bool(w.resources) != (backend == "ray"):
            continue  # (another backend's: the job could never run there)
        whole = dataclasses.replace(w, free_memory_bytes=w.memory_bytes, running_job_id="")
        workers.append(WorkerMemory(w.worker_id, usable_bytes(whole)))
    return workers, where


def _this_machine(macos: bool) -> list[WorkerMemory]:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return [WorkerMemory("this-machine", macos_usable_bytes(total) if macos else total)]


def choose_workers(args, backend: str = "zeroconf") -> tuple[list[WorkerMemory], str]:
    if args.workers:
        return _given(args.workers, args.macos), "--workers"
    found = _cluster(args, backend)
    if found is not None:
        if not found[0]:
            raise PeerLostError(f"{found[1]} has no verified workers" + (
                f" of cluster.backend {backend}" if backend != "zeroconf" else ""),
                                hint="start `herd worker` on each machine, or pass --workers "
                                "64,64 to plan for machines of that much memory")
        return found
    return _this_machine(args.macos), ("this machine alone: no coordinator answered (pass "
                                       "--coordinator, or --workers 64,64 for other machines)")


def render(plan: Plan, workers: list[WorkerMemory], job: JobConfig, model_config: dict) -> str:
    mem = {w.worker_id: w.memory_bytes for w in workers}
    width = max(14, *(len(w) for w in plan.estimates))
    lines = [
        f"layout: {plan.data_parallel} x {plan.pipeline_stages} (data x pipeline), "
        f"{plan.microbatches} microbatch(es) per step per pipeline",
        "stages (blocks [start, end)): " + ", ".join(f"{a}:{b}" for a, b in plan.stage_layers),
        "",
        f"{'worker':<{width}} {'stage':>5} {'weights':>8} {'lora':>6} {'grads':>6} {'optim':>6} "
        f"{'activ':>7} {'logits':>7} {'overhd':>7} {'peak':>7} {'usable':>7}",
    ]
    for replica in plan.assignments:
        for stage, wid in enumerate(replica):
            e = plan.estimates[wid]
            cells = [e.weights, e.lora, e.grads, e.optimizer, e.activations, e.logits, e.overhead]
            gb = [c / GB_SI for c in cells] + [e.total / GB_SI, mem[wid] / GB_SI]
            lines.append(
                f"{wid:<{width}} {stage:>5} {gb[0]:>8.2f} {gb[1]:>6.2f} {gb[2]:>6.2f} "
                f"{gb[3]:>6.2f} {gb[4]:>7.2f} {gb[5]:>7.2f} {gb[6]:>7.2f} {gb[7]:>7.2f} "
                f"{gb[8]:>7.2f}")
    if plan.max_shares:  # data parallel on workers of different memory
        ids = [rep[0] for rep in plan.assignments]
        lines.append("examples per step at most (their memory; peak above is at that share): "
                     + ", ".join(f"{c} on {w}" for w, c in zip(ids, plan.max_shares)))
    unused = [w.worker_id for w in workers if w.worker_id not in plan.peak_bytes_per_worker]
    if unused:
        why = why_unused(model_config, job, workers, plan)
        lines.append(f"unused: {', '.join(unused)} ({why})")
    lines.append("(GB = 1e9 bytes; usable = what a job may use: the GPU wired limit on a Mac)")
    return "\n".join(lines)


def plan_dict(plan: Plan, source: str) -> dict:
    return {"workers_from": source, "data_parallel": plan.data_parallel,
            "pipeline_stages": plan.pipeline_stages, "microbatches": plan.microbatches,
            "stage_layers": [list(s) for s in plan.stage_layers],
            "assignments": plan.assignments,
            "max_shares": list(plan.max_shares) if plan.max_shares else None,
            "peak_bytes_per_worker": {k: int(v) for k, v in plan.peak_bytes_per_worker.items()}}


DESCRIPTION = """\
Will a job fit, and how will it be laid out? Predicts each worker's peak memory from the model's
config.json alone (no weights: a local folder's, or a hub id's from the local Hugging Face cache)
and picks a data x pipeline layout, or refuses with the changes that would make it fit (exit 4).

It plans for --workers when given; else for the live cluster when a coordinator answers (its
verified workers' memory); else for this machine alone. The first line says which."""


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="herd plan", description=DESCRIPTION,
                                formatter_class=HelpFormatter)
    p.add_argument("config", help="job YAML (mlx_lm.lora keys + cluster/quantize)")
    p.add_argument("--model", help="plan for this model (a folder or a hub id) instead of the "
                   "config's")
    p.add_argument("--workers", metavar="GB,GB,...",
                   help="plan for machines with this much RAM each, e.g. 64,64,192")
    p.add_argument("--macos", action="store_true",
                   help="with --workers: budget against macOS's default GPU wired limit (~75%% "
                   "of RAM), not all of it")
    p.add_argument("--json", action="store_true", help="the plan as JSON")
    add_connection_args(p)
    args = p.parse_args(argv[1:])
    try:
        job = load_config(args.config, {"model": args.model})
        model_config = resolve_model_config(job.model)
        check_against_model(job, model_config)  # (as `herd submit` refuses them)
        workers, source = choose_workers(args, job.cluster.backend)
        needed = job.cluster.workers
        short = (f"\nnote: the job asks for cluster.workers: {needed}; {len(workers)} "
                 "available: it would wait for more" if needed and needed > len(workers) else "")
        plan = plan_job(model_config, job, workers)
    except HerdError as e:
        print(f"herd plan: {e}", file=sys.stderr)
        return e.exit_code
    asked = workers_needed(job)  # (placement takes cluster.workers, default one)
    n, fits_as_written = plan.data_parallel * plan.pipeline_stages, None
    if n > asked:
        # As written the job takes `asked` workers (the roomiest): does it fit there? Said, and
        # exit 4 when not, as `herd submit` would refuse it (plan said fits, rc 0, and submit
        # refused it, rc 4: an outside run).
        try:
            plan_job(model_config, job, sorted(workers, key=lambda w: -w.memory_bytes)[:asked])
        except DoesNotFitError as e:
            fits_as_written = e
    code = fits_as_written.exit_code if fits_as_written else 0
    if args.json:
        # (a job asking for more workers than there are waits for them: said as in the text)
        unused = [w.worker_id for w in workers if w.worker_id not in plan.peak_bytes_per_worker]
        print(json.dumps({**plan_dict(plan, source), "workers_asked": needed or None,
                          "unused": unused,
                          "unused_why": why_unused(model_config, job, workers, plan) or None,
                          "workers_available": len(workers),
                          "fits_as_written": fits_as_written is None}, indent=2))
        return code
    print(f"planned for {source}: {len(workers)} worker(s) of "
          + ", ".join(f"{w.memory_bytes / GIB:.1f}" for w in workers) + " GiB usable" + short)
    print(render(plan, workers, job, model_config))
    if n > asked:
        # (the refusal's first line only: its list of fixes is for the job as written, and
        # read as advice for the planned layout, two `cluster:` lines in one sentence)
        why = fits_as_written.message.splitlines()[0].removeprefix("the job does not fit: ") \
            if fits_as_written else ""
        written = f"; as written it does not fit ({why})" if fits_as_written else ""
        print(f"note: this layout takes {n} workers; the config asks for {asked} "
              f"(cluster.workers), so `herd submit` would place it on {asked}{written}: add "
              f"`{plan.cluster_setting()}` to run it as planned", file=sys.stderr)
    return code
