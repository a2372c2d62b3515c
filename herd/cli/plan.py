"""``herd plan CONFIG [--workers 64,96,192] [--macos]``: predicted peak memory per worker and the
layout the planner picks, or the refusal with its fixes. Reads the model's config.json only."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from coordinator.planner import GB_SI, GIB, Plan, WorkerMemory, macos_usable_bytes, plan_job
from herd.config import load_config
from herd.errors import ConfigError, HerdError


def _model_config(model: str) -> dict:
    path = Path(model) / "config.json"
    if not path.is_file():
        raise ConfigError(
            f"{path} does not exist",
            hint="herd plan reads the model's config.json; give a local model folder "
            "(weights are not needed: config.json alone is enough)",
        )
    return json.loads(path.read_text())


def _workers(spec: str | None, macos: bool) -> list[WorkerMemory]:
    if spec:
        try:
            sizes = [float(s) for s in spec.split(",") if s.strip()]
        except ValueError:
            raise ConfigError(
                f"--workers {spec!r}: give GB of RAM per worker, e.g. 64,96,192") from None
    else:
        sizes = [os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB]
    out = []
    for i, gb in enumerate(sizes):
        total = int(gb * GIB)  # a "64 GB" Mac has 64 GiB
        usable = macos_usable_bytes(total) if macos else total
        out.append(WorkerMemory(f"w{i}-{gb:.0f}GB", usable))
    return out


def render(plan: Plan, workers: list[WorkerMemory]) -> str:
    mem = {w.worker_id: w.memory_bytes for w in workers}
    lines = [
        f"layout: {plan.data_parallel} x {plan.pipeline_stages} (data x pipeline), "
        f"{plan.microbatches} microbatch(es) per step per pipeline",
        "stages (blocks [start, end)): " + ", ".join(f"{a}:{b}" for a, b in plan.stage_layers),
        "",
        f"{'worker':<14} {'stage':>5} {'weights':>8} {'lora':>6} {'grads':>6} {'optim':>6} "
        f"{'activ':>7} {'logits':>7} {'overhd':>7} {'peak':>7} {'usable':>7}",
    ]
    for replica in plan.assignments:
        for stage, wid in enumerate(replica):
            e = plan.estimates[wid]
            cells = [e.weights, e.lora, e.grads, e.optimizer, e.activations, e.logits, e.overhead]
            gb = [c / GB_SI for c in cells] + [e.total / GB_SI, mem[wid] / GB_SI]
            lines.append(
                f"{wid:<14} {stage:>5} {gb[0]:>8.2f} {gb[1]:>6.2f} {gb[2]:>6.2f} {gb[3]:>6.2f} "
                f"{gb[4]:>7.2f} {gb[5]:>7.2f} {gb[6]:>7.2f} {gb[7]:>7.2f} {gb[8]:>7.2f}"
            )
    unused = [w.worker_id for w in workers if w.worker_id not in plan.peak_bytes_per_worker]
    if unused:
        lines.append(f"unused: {', '.join(unused)}")
    lines.append("(GB = 1e9 bytes; usable = the GPU wired limit with --macos)")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="herd plan", description=__doc__)
    p.add_argument("config", help="job YAML (mlx_lm.lora keys + cluster/quantize)")
    p.add_argument("--workers",
                   help="GB of RAM per worker, comma-separated (default: this machine)")
    p.add_argument("--macos", action="store_true",
                   help="budget against macOS's default GPU wired limit (~75%% of RAM), not "
                   "total RAM")
    args = p.parse_args(argv[1:])
    try:
        job = load_config(args.config)
        workers = _workers(args.workers, args.macos)
        plan = plan_job(_model_config(job.model), job, workers)
    except HerdError as e:
        print(f"herd plan: {e}", file=sys.stderr)
        return e.exit_code
    print(render(plan, workers))
    return 0
