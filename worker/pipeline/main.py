"""One pipeline stage as a process: pipeline-parallel LoRA/QLoRA training, exact (1F1B schedule).

Each rank is one stage (stage.py: its own blocks only) of one replica (topology.py); per optimizer
step the global batch is cut into microbatches that flow forward as hidden states and backward as
cotangents (step.py), and every stage divides its gradient sums by the global token count (it
holds the same batch and counts the same targets), so the update equals one process's to float
rounding (train.py).

Run a stage: ``python -m worker.pipeline CONFIG --adapter-path DIR [--stage-layers 0:3,3:4]
[--data-parallel 2] [--resume DIR]`` under MLX_RANK + MLX_HOSTFILE; ``herd train`` runs
``run_stage`` under a launcher when the job is cut into stages (worker/rank/cli.py). Every
``save_every`` steps each stage of replica 0 writes DIR/stages/stage-NN/: an atomic checkpoint in
the trainer's format (adapter with stage-local names, optimizer state, step, manifest) for
resuming that stage, and beside it its adapter piece with the full model's names;
``merge_stage_adapters`` joins the pieces into one mlx-lm adapter folder (rank 0 does so into
DIR when the pieces share a disk; under the herd service each stage uploads its checkpoint and
the coordinator merges them). Events (worker/rank/events.py): every rank reports train progress
(its own speed and peak memory; the loss from replica 0's last stage, which holds it), done
comes from that rank; every stage of replica 0 reports its own checkpoints (with stage, stages,
layers); each rank adds a ``stage_done`` line with its timings and peak memory.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.tuner.datasets import CacheDataset, load_dataset
from mlx_lm.utils import load_tokenizer

from herd.adapter_merge import ADAPTER_CONFIG, ADAPTERS, merge_stage_adapters
from herd.config import JobConfig, load_config
from herd.errors import ConfigError, HerdError
from herd.models.ref import local_folder
from herd.stage_cut import balanced_split, head_blocks, job_refusal
from worker.pipeline.link import MLXLink, WatchedLink
from worker.pipeline.stage import Stage, StageSpec, build_stage
from worker.pipeline.topology import Topology
from worker.pipeline.train import PipelineRun, train_stage
from worker.rank.checkpoint import TrainerState, load_checkpoint, resolve_resume, save_checkpoint
from worker.rank.events import (
    CheckpointSaved,
    Done,
    EventLog,
    RankFailed,
    StageDone,
    TrainReport,
    ValReport,
)
from worker.rank.heartbeat import Heartbeat
from worker.rank.model import adapter_config, build_optimizer, read_model_config
from worker.rank.reporter import train_line, val_line
from worker.rank.runtime import reuse_freed_memory
from worker.rank.trainer import LoopArgs, data_order


@dataclass(frozen=True)
class StageOptions:
    """How to run a stage, beyond the job config."""

    adapter_path: Path
    stage_layers: str | None = None  # the planner's cut, "0:3,3:4"; None: equal compute
    microbatches: int = 0  # per step and pipeline; 0: one example each
    data_parallel: int = 1  # pipelines (replicas): 1 or 2
    resume: Path | None = None  # an adapter path whose stages/ hold checkpoints
    metrics_file: Path | None = None


def save_stage_adapter(stage: Stage, job: JobConfig, out_dir: Path) -> Path:
    """This stage's adapter weights under the full model's parameter names."""
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = {stage.global_name(k): v for k, v in tree_flatten(stage.model.trainable_parameters())}
    mx.save_safetensors(str(out_dir / ADAPTERS), weights)
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(job), indent=2))
    spec = stage.spec
    meta = {"stage": spec.index, "stages": spec.count, "layers": [spec.start, spec.end]}
    (out_dir / "stage.json").write_text(json.dumps(meta))
    return out_dir


def _spans(arg: str | None, model_config: dict, stages: int, first_adapted: int
           ) -> list[tuple[int, int]]:
    total = model_config["num_hidden_layers"]
    if not arg:  # stages of equal compute (herd/stage_cut.py); the planner passes its own cut
        return balanced_split(total, stages, head_blocks(model_config), first_adapted)
    spans = [tuple(int(v) for v in part.split(":")) for part in arg.split(",")]
    if len(spans) != stages or spans[0][0] != 0 or spans[-1][1] != total or any(
        a[1] != b[0] for a, b in zip(spans, spans[1:])
    ):
        raise ConfigError(
            f"--stage-layers {arg} is not a cut of {total} blocks into {stages} stages")
    return spans  # type: ignore[return-value]


def _stage_dir(adapter_path: Path, index: int) -> Path:
    return adapter_path / "stages" / f"stage-{index:02d}"


def load_stage(job: JobConfig, opts: StageOptions, topo: Topology):
    """This rank's stage (its blocks only), the training and validation sets; also the peak bytes
    loading took."""
    model_config = read_model_config(job.model)
    total = model_config["num_hidden_layers"]
    first_adapted = job.first_adapted_layer(total)
    start, end = _spans(opts.stage_layers, model_config, topo.stages, first_adapted)[topo.stage]
    spec = StageSpec(topo.stage, topo.stages, start, end, total, first_adapted=first_adapted)
    np.random.seed(job.seed)
    tokenizer = load_tokenizer(local_folder(job.model))
    ns = argparse.Namespace(**job.mlx_lm_dict())
    ns.train = True
    train_set, valid_set, _ = load_dataset(ns, tokenizer)
    mx.reset_peak_memory()
    stage = build_stage(job, spec)
    return stage, CacheDataset(train_set), CacheDataset(valid_set), mx.get_peak_memory()


def resume(opts: StageOptions, stage: Stage, optimizer) -> tuple[int, int]:
    """(iterations done, tokens trained) from this stage's own piece (replica 1 reads replica 0's:
    they are equal); (0, 0) for a fresh run."""
    if opts.resume is None:
        return 0, 0
    folder = resolve_resume(_stage_dir(opts.resume, stage.spec.index))
    if folder is None:
        raise FileNotFoundError(f"no complete checkpoint of stage {stage.spec.index} under "
                                f"{opts.resume} (a stage resumes from herd checkpoints only)")
    state = load_checkpoint(folder, stage.model, optimizer)
    return state.iteration, state.trained_tokens


def make_on_save(job: JobConfig, opts: StageOptions, stage: Stage, topo: Topology, world: int,
                 rank: int, log: EventLog) -> Callable[[int, object, int], None]:
    """Replicas hold identical adapters; replica 0 writes the pieces. The checkpoint folder keeps
    stage-local names (for resuming this stage); the piece beside it has the full model's names
    (for merging). Every stage of replica 0 reports its own checkpoint folder (the herd worker
    agent uploads it to the coordinator as this stage's piece of step ``it``)."""
    out = _stage_dir(opts.adapter_path, stage.spec.index)
    spec = stage.spec

    def on_save(it: int, optimizer, trained: int) -> None:
        if topo.replica != 0:
            return
        folder = save_checkpoint(out, stage.model, optimizer, adapter_config(job),
                                 TrainerState(it, trained, job.seed, world))
        save_stage_adapter(stage, job, out)
        log.append(CheckpointSaved(rank=rank, step=it, path=str(folder), stage=spec.index,
                                   stages=spec.count, layers=[spec.start, spec.end]))

    return on_save


def finish(job: JobConfig, opts: StageOptions, stage: Stage, topo: Topology, group,
           run: PipelineRun, load_peak: int, reports: bool, log: EventLog) -> None:
    """Once every stage is done: the merged adapter (stages sharing a disk), done, timings."""
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))  # every piece is on disk
    pieces = [_stage_dir(opts.adapter_path, s) for s in range(topo.stages)]
    if group.rank() == 0 and all((p / "stage.json").exists() for p in pieces):
        # Stages on one machine (or a shared disk): write the loadable adapter here; otherwise
        # the coordinator merges the pieces it collected.
        merge_stage_adapters(pieces, opts.adapter_path)
    if reports:
        log.append(Done(rank=group.rank(), iteration=job.iters))
    spec = stage.spec
    log.append(StageDone(
        rank=group.rank(), stage=spec.index, replica=topo.replica, layers=[spec.start, spec.end],
        losses=run.losses, step_seconds=run.step_seconds, link_seconds=run.link_seconds,
        step_compute_seconds=run.step_compute_seconds, compute_seconds=run.compute_seconds,
        load_peak_bytes=load_peak, peak_bytes=mx.get_peak_memory(),
        adapter=str(_stage_dir(opts.adapter_path, spec.index))))


def _run(job: JobConfig, opts: StageOptions) -> int:
    reuse_freed_memory()  # worker/rank/runtime.py: MLX's and the transfers' buffers stay warm
    heartbeat = Heartbeat.from_env()  # for the agent's watchdog (worker/agent/watchdog.py)
    heartbeat.enter("group")
    group = mx.distributed.init(strict=True)
    heartbeat.leave("group")
    topo = Topology.of(group.rank(), group.size(), opts.data_parallel)
    stage, train_set, valid_set, load_peak = load_stage(job, opts, topo)
    heartbeat.leave("ready")
    if job.batch_size % topo.replicas:
        raise ConfigError(
            f"batch_size {job.batch_size} does not split over {topo.replicas} pipelines")
    # The rank that holds the loss (the other pipeline's last stage holds the same sum). Every
    # rank reports its own peak memory and speed, the loss only this one (0 elsewhere): only its
    # reports reached watch, the dashboard and /metrics, and stage 0, the fullest worker of a
    # planned cut, was the one to watch (an outside run).
    reports = topo.replica == 0 and stage.spec.last
    if not reports:  # (its log's lines read "loss -": `herd logs` shows rank 0's by default)
        print(f"pipeline stage {topo.stage} of {topo.stages} (replica {topo.replica}): the loss "
              f"is the last stage's, in rank {topo.stages - 1}'s log (herd logs JOB --rank "
              f"{topo.stages - 1})", flush=True)
    log = EventLog(opts.metrics_file)

    # mlx-lm reports the mean loss of the steps since its last report, and their token rate,
    # every steps_per_report iterations: here at the first step at or after each (a step ends
    # grad_accumulation_steps iterations) and at the last iteration (it reported only at steps
    # on a multiple of steps_per_report, and never the last: an outside run).
    window = {"loss": 0.0, "steps": 0, "tokens": 0, "seconds": 0.0, "since": 0, "link": 0.0,
              "bytes": 0}

    def on_step(info: dict) -> None:
        window["loss"] += info["train_loss"] if reports else 0.0
        window["steps"] += 1
        window["tokens"] += info["tokens"]
        window["seconds"] += info["seconds"]
        window["link"] += info["link_seconds"]
        window["bytes"] += info["link_bytes"]
        it, every = info["iteration"], job.steps_per_report
        if it // every > window["since"] // every or it == job.iters:
            seconds = max(window["seconds"], 1e-9)
            report = TrainReport(
                rank=group.rank(), iteration=it,
                train_loss=window["loss"] / window["steps"] if reports else 0.0,
                learning_rate=info["learning_rate"],
                tokens_per_second=window["tokens"] / seconds,
                trained_tokens=info["trained_tokens"], peak_memory_gb=info["peak_memory_gb"],
                exchange="mlx", world_size=group.size(),
                iterations_per_second=(it - window["since"]) / seconds, step_seconds=seconds,
                # the stage's time in send/recv, as the dashboard splits a step (it read 100%
                # compute for a pipeline: an outside run)
                exchange_seconds=window["link"], exchange_bytes=window["bytes"])
            log.append(report)
            print(train_line(vars(report), job.iters), flush=True)  # the stage's log
            window.update(loss=0.0, steps=0, tokens=0, seconds=0.0, since=it, link=0.0,
                          bytes=0)

    def on_val(info: dict) -> None:
        if reports:
            log.append(ValReport(rank=group.rank(), **info))
            print(val_line(info, job.iters), flush=True)

    optimizer = build_optimizer(job)
    start, tokens = resume(opts, stage, optimizer)
    window["since"] = start
    on_save = make_on_save(job, opts, stage, topo, group.size(), group.rank(), log)
    # The one process's batch order, its validation passes included (every stage takes part).
    order = data_order(train_set, valid_set, LoopArgs.from_job(job))
    run = train_stage(job, stage, WatchedLink(MLXLink(group, topo), heartbeat), train_set,
                      opts.microbatches or job.batch_size // topo.replicas,
                      dp_rank=topo.replica, dp_size=topo.replicas, on_step=on_step,
                      optimizer=optimizer, start=start, trained_tokens=tokens, on_save=on_save,
                      order=order, valid_set=valid_set, on_val=on_val)
    finish(job, opts, stage, topo, group, run, load_peak, reports, log)
    return 0


def run_stage(job: JobConfig, opts: StageOptions) -> int:
    """Runs this rank's stage; a HerdError is printed and becomes the exit code."""
    try:
        if (refused := job_refusal(job)) is not None:  # (the model's: stage.build_stage)
            raise ConfigError(*refused)
        return _run(job, opts)
    except HerdError as e:
        EventLog(opts.metrics_file).append(RankFailed(str(e)))  # the reason its agent reports
        print(f"pipeline stage: {e}", file=sys.stderr)
        return e.exit_code


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m worker.pipeline", description=__doc__)
    p.add_argument("config")
    p.add_argument("--adapter-path", required=True, type=Path)
    p.add_argument("--stage-layers",
                   help="the planner's cut, e.g. 0:3,3:4 (default: stages of equal compute)")
    p.add_argument("--microbatches", type=int, default=0,
                   help="per step and pipeline (default: one example each)")
    p.add_argument("--data-parallel", type=int, default=1, help="pipelines (replicas): 1 or 2")
    p.add_argument("--iters", type=int)
    p.add_argument("--model", help="override the config's model")
    p.add_argument("--data", help="override the config's data folder")
    p.add_argument("--resume", type=Path, help="an adapter path whose stages/ hold checkpoints")
    p.add_argument("--metrics-file", type=Path)
    args = p.parse_args(argv)
    try:
        job = load_config(args.config,
                          {"iters": args.iters, "model": args.model, "data": args.data})
    except HerdError as e:
        print(f"pipeline stage: {e}", file=sys.stderr)
        return e.exit_code
    return run_stage(job, StageOptions(args.adapter_path, args.stage_layers, args.microbatches,
                                       args.data_parallel, args.resume, args.metrics_file))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
