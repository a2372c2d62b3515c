"""Pipeline-parallel LoRA/QLoRA training across stages, exact (1F1B schedule).

Each rank is one stage (worker/pipeline_stage.py: its own blocks only). Per optimizer step the
global batch is cut into microbatches; each flows forward as hidden states (``send`` to the next
stage) and backward as cotangents (``send`` to the previous one), in one-forward-one-backward
order (worker/pipeline_schedule.py). MLX's send/recv have no gradient, so autodiff never crosses
a stage: every stage keeps only its microbatches' *inputs* and, in the backward pass, recomputes
its blocks under ``mx.vjp`` with the cotangent it receives.
The last stage computes the loss as the lead's trainer does, the *sum* of per-token losses; every
stage divides its gradient sums by the global token count (it holds the same batch and counts the
same targets), so the update equals one process's to float rounding.

Run a stage: ``python -m worker.pipeline CONFIG --adapter-path DIR [--stage-layers 0:3,3:4]
[--data-parallel 2] [--resume DIR]`` under MLX_RANK + MLX_HOSTFILE (which rank runs which stage of
which replica: worker/pipeline_link.py ``Topology``). Every ``save_every`` steps each stage of
replica 0 writes DIR/stages/stage-NN/: an atomic checkpoint in the lead's format (adapter with
stage-local names, optimizer state, step, manifest) for resuming that stage, and beside it its
adapter piece with the full model's names; ``merge_stage_adapters`` joins the pieces into one
mlx-lm adapter folder (rank 0 does so into DIR when the pieces share a disk; under the herd
service each stage uploads its checkpoint and the coordinator merges them). Metrics (the
contract's train/done events) come from the rank that holds the loss; every stage of replica 0
reports its own checkpoint events (with stage, stages, layers); each rank adds a ``stage_done``
line with its timings and peak memory. ``herd train`` runs this entry under a launcher when the
job is cut into stages (worker/train_cli.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from herd.adapter_merge import merge_stage_adapters
from herd.config import JobConfig
from herd.errors import ConfigError, HerdError
from herd.stage_cut import balanced_split, head_blocks
from worker.pipeline.link import Link, MLXLink, Topology
from worker.pipeline.schedule import (BWD, FWD, RECV_BWD, RECV_FWD, SEND_BWD, SEND_FWD,
                                      one_f_one_b)
from worker.pipeline.stage import Stage, StageSpec, build_stage

__all__ = ["pipeline_step", "train_stage", "save_stage_adapter", "merge_stage_adapters", "Topology"]


def _targets_mask(batch: mx.array, lengths: mx.array) -> mx.array:
    steps = mx.arange(1, batch.shape[1])
    return mx.logical_and(steps >= lengths[:, 0:1], steps <= lengths[:, 1:])


@dataclass
class StepResult:
    loss_sum: float  # on the last stage; 0 elsewhere
    ntoks: int
    grads: dict  # summed over the step's target tokens (divide by the global count)
    compute_seconds: float = 0.0


def pipeline_step(stage: Stage, link: Link, batch: mx.array, lengths: mx.array,
                  microbatches: int, seed: int = 0) -> StepResult:
    """One optimizer step's gradients over ``microbatches`` microbatches, in 1F1B order
    (worker/pipeline_schedule.py). Gradients are summed in microbatch order on every stage, as
    one process would sum them."""
    spec = stage.spec
    rows = batch.shape[0]
    if rows % microbatches:
        raise ConfigError(f"batch of {rows} does not split into {microbatches} microbatches")
    bm = rows // microbatches
    mbs = [(batch[i * bm:(i + 1) * bm], lengths[i * bm:(i + 1) * bm]) for i in range(microbatches)]
    ntoks = _targets_mask(batch, lengths).sum()
    flat = tree_flatten(stage.model.trainable_parameters())
    names, values = [k for k, _ in flat], [v for _, v in flat]
    hidden = stage.model.args.hidden_size
    dtype = _activation_dtype(stage)
    shape = (bm, batch.shape[1] - 1, hidden)

    def run(x, params):
        stage.model.update(tree_unflatten(list(zip(names, params))))
        return stage.forward(x)

    # The previous stage needs cotangents only if it has adapters of its own; a stage wholly
    # before the adapted blocks only runs forward.
    send_back = not spec.first and spec.start > spec.first_adapted

    def grads_of(fn, x, ct):
        """(output, param grads, input cotangent or None) of fn(x, params) under cotangent ct."""
        if send_back:
            out, vj = mx.vjp(lambda xx, *p: [fn(xx, p)], [x, *values], [ct])
            return out[0], vj[1:], vj[0]
        out, vj = mx.vjp(lambda *p: [fn(x, p)], values, [ct])
        return out[0], vj, None

    def reseed(i: int) -> None:
        # LoRA dropout draws masks: a recomputed microbatch must draw the ones its forward drew.
        mx.random.seed((seed * 1_000_003 + spec.index * 10_007 + i) % (2**63))

    def first_input(i: int) -> mx.array:
        return mbs[i][0][:, :-1]

    grads = [mx.zeros_like(v) for v in values]
    loss_sum = mx.array(0.0)
    compute = 0.0
    # Per microbatch, between the ops that make and use them: received inputs, this stage's
    # inputs kept for its backward (it recomputes its blocks under mx.vjp: MLX's send/recv have
    # no gradient, so autodiff never crosses a stage), outputs to send, cotangents in and out.
    inputs: dict[int, mx.array] = {}
    saved: dict[int, mx.array] = {}
    outgoing: dict[int, mx.array] = {}
    cotangents: dict[int, mx.array] = {}
    returning: dict[int, mx.array] = {}
    schedule = one_f_one_b(spec.index, spec.count, microbatches, trains=spec.trains,
                           sends_back=send_back)
    for op in schedule:
        i = op.mb
        if op.kind == RECV_FWD:
            inputs[i] = link.recv(shape, dtype, spec.index - 1)
        elif op.kind == RECV_BWD:
            cotangents[i] = link.recv(shape, dtype, spec.index + 1)
        elif op.kind == SEND_FWD:
            link.send(outgoing.pop(i), spec.index + 1)
        elif op.kind == SEND_BWD:
            link.send(returning.pop(i), spec.index - 1)
        elif op.kind == FWD:
            reseed(i)
            tic = time.perf_counter()
            x = first_input(i) if spec.first else inputs.pop(i)
            y = run(x, values)
            mx.eval(y)
            compute += time.perf_counter() - tic
            if spec.trains:
                saved[i] = x
            if not spec.last:
                outgoing[i] = y
        elif op.kind == BWD:
            reseed(i)
            tic = time.perf_counter()
            _, gp, dx = grads_of(run, saved.pop(i), cotangents.pop(i))
            grads = [g + d for g, d in zip(grads, gp)]
            mx.eval(grads) if dx is None else mx.eval(grads, dx)
            compute += time.perf_counter() - tic
            if dx is not None:
                returning[i] = dx
        else:  # FWD_BWD: the last stage's forward, loss (a sum over target tokens) and backward
            reseed(i)
            tic = time.perf_counter()
            x = first_input(i) if spec.first else inputs.pop(i)
            b, lens = mbs[i]
            targets, mask = b[:, 1:], _targets_mask(b, lens)

            def loss_fn(xx, params):
                logits = run(xx, params)
                return (nn.losses.cross_entropy(logits, targets) * mask).astype(mx.float32).sum()

            ce, gp, dx = grads_of(loss_fn, x, mx.array(1.0))
            grads = [g + d for g, d in zip(grads, gp)]
            loss_sum = loss_sum + ce
            mx.eval(grads, loss_sum) if dx is None else mx.eval(grads, loss_sum, dx)
            compute += time.perf_counter() - tic
            if dx is not None:
                returning[i] = dx
    stage.model.update(tree_unflatten(list(zip(names, values))))
    out = tree_unflatten(list(zip(names, grads))) if names else {}
    return StepResult(loss_sum.item(), int(ntoks.item()), out, compute)


def _activation_dtype(stage: Stage) -> mx.Dtype:
    # Hidden states keep the embedding's dtype through every block (LoRA casts back to it).
    norm = stage.model.layers[0].input_layernorm.weight
    return norm.dtype


@dataclass
class PipelineRun:
    losses: list[float] = field(default_factory=list)  # per step, last stage only
    step_seconds: list[float] = field(default_factory=list)
    step_compute_seconds: list[float] = field(default_factory=list)  # busy time, not waiting
    link_seconds: float = 0.0
    compute_seconds: float = 0.0
    trained_tokens: int = 0


def train_stage(job: JobConfig, stage: Stage, link: Link, train_set, microbatches: int,
                dp_rank: int = 0, dp_size: int = 1, iters: int | None = None,
                on_step: Callable[[dict], None] | None = None, optimizer=None, start: int = 0,
                trained_tokens: int = 0,
                on_save: Callable[[int, object, int], None] | None = None) -> PipelineRun:
    """The lead's loop (same batch order, same per-iteration seeding), one pipelined step per batch.
    Gradient accumulation: ``grad_accumulation_steps`` batches summed before one update.
    ``start``: iterations already done (a resumed run; the optimizer then holds their state)."""
    from worker.rank.batches import BatchStream
    from worker.rank.model import build_optimizer

    optimizer = optimizer or build_optimizer(job)
    stream = BatchStream(train_set, job.batch_size, job.max_seq_length, dp_rank, dp_size, job.seed)
    batches = stream.iterate(start=start)
    run = PipelineRun(trained_tokens=trained_tokens)
    last = iters or job.iters
    stage.model.train()
    accum = job.grad_accumulation_steps
    acc, acc_tokens, acc_loss = None, 0, 0.0
    t_step = time.perf_counter()
    for it in range(start + 1, last + 1):
        step_seed = (job.seed * 1_000_003 + dp_rank * 10_007 + it) % (2**63)
        batch, lengths = next(batches)
        tic = time.perf_counter()
        res = pipeline_step(stage, link, batch, lengths, microbatches, seed=step_seed)
        run.compute_seconds += res.compute_seconds
        run.step_compute_seconds.append(res.compute_seconds)
        acc = res.grads if acc is None else tree_map(mx.add, acc, res.grads)
        acc_tokens += res.ntoks
        acc_loss += res.loss_sum
        if it % accum == 0:
            if dp_size > 1:
                acc, acc_tokens, acc_loss = _sum_replicas(link, acc, acc_tokens, acc_loss)
            if tree_flatten(acc):  # a stage before the adapted blocks only relays
                optimizer.update(stage.model, tree_map(lambda g: g / acc_tokens, acc))
                mx.eval(stage.model.parameters(), optimizer.state)
            run.losses.append(acc_loss / acc_tokens)
            run.trained_tokens += acc_tokens
            if on_step is not None:
                on_step({"iteration": it, "train_loss": acc_loss / acc_tokens,
                         "learning_rate": optimizer.learning_rate.item(),
                         "trained_tokens": run.trained_tokens,
                         "tokens_per_second": acc_tokens / max(time.perf_counter() - t_step, 1e-9),
                         "peak_memory_gb": mx.get_peak_memory() / 1e9})
            t_step = time.perf_counter()
            acc, acc_tokens, acc_loss = None, 0, 0.0
            if on_save is not None and (it % job.save_every == 0 or it == last):
                on_save(it, optimizer, run.trained_tokens)
        run.step_seconds.append(time.perf_counter() - tic)
    run.link_seconds = link.seconds
    return run


def _sum_replicas(link: "MLXLink", grads: dict, ntoks: int, loss: float) -> tuple[dict, int, float]:
    """Token-weighted data parallelism: sum gradient sums, token counts and loss sums over the
    replicas (one flat buffer per step), so dividing by the total equals one process."""
    flat = tree_flatten(grads)
    parts = [v.astype(mx.float32).reshape(-1) for _, v in flat]
    parts += [mx.array([float(ntoks), loss], dtype=mx.float32)]
    total = link.sum_with_peer(mx.concatenate(parts))
    out, offset = [], 0
    for k, v in flat:
        out.append((k, total[offset:offset + v.size].reshape(v.shape).astype(v.dtype)))
        offset += v.size
    n, loss_sum = total[offset:].tolist()
    return (tree_unflatten(out) if out else {}), int(round(n)), loss_sum


def save_stage_adapter(stage: Stage, job: JobConfig, out_dir: Path) -> Path:
    """This stage's adapter weights under the full model's parameter names."""
    from worker.rank.model import adapter_config

    out_dir.mkdir(parents=True, exist_ok=True)
    weights = {stage.global_name(k): v for k, v in tree_flatten(stage.model.trainable_parameters())}
    mx.save_safetensors(str(out_dir / "adapters.safetensors"), weights)
    (out_dir / "adapter_config.json").write_text(json.dumps(adapter_config(job), indent=2))
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
        raise ConfigError(f"--stage-layers {arg} is not a cut of {total} blocks into {stages} stages")
    return spans  # type: ignore[return-value]


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
        return _run(args)
    except HerdError as e:
        print(f"pipeline stage: {e}", file=sys.stderr)
        return e.exit_code


def _run(args) -> int:
    from mlx_lm.tuner.datasets import CacheDataset, load_dataset
    from mlx_lm.utils import load_tokenizer
    import numpy as np

    from herd.config import load_config
    from worker.rank.allocator import reuse_freed_memory
    from worker.rank.model import read_model_config

    reuse_freed_memory()  # worker/allocator.py: MLX's and the transfers' buffers stay warm

    job = load_config(args.config, {"iters": args.iters, "model": args.model, "data": args.data})
    group = mx.distributed.init(strict=True)
    topo = Topology.of(group.rank(), group.size(), args.data_parallel)
    stages, index = topo.stages, topo.stage
    model_config = read_model_config(job.model)
    total = model_config["num_hidden_layers"]
    first_adapted = job.first_adapted_layer(total)
    start, end = _spans(args.stage_layers, model_config, stages, first_adapted)[index]
    spec = StageSpec(index, stages, start, end, total, first_adapted=first_adapted)
    np.random.seed(job.seed)
    tokenizer = load_tokenizer(Path(job.model))
    ns = argparse.Namespace(**job.mlx_lm_dict())
    ns.train = True
    train_set, _, _ = load_dataset(ns, tokenizer)
    mx.reset_peak_memory()
    stage = build_stage(job, spec)
    load_peak = mx.get_peak_memory()
    if job.batch_size % topo.replicas:
        raise ConfigError(f"batch_size {job.batch_size} does not split over {topo.replicas} pipelines")
    reports = topo.replica == 0 and spec.last  # the rank that holds the loss

    def emit(event: str, every_stage: bool = False, **info) -> None:
        if args.metrics_file and (reports or (every_stage and topo.replica == 0)):
            with open(args.metrics_file, "a") as f:
                f.write(json.dumps({"event": event, **info, "rank": group.rank()}) + "\n")
                f.flush()

    def on_step(info: dict) -> None:
        if info["iteration"] % job.steps_per_report == 0 or info["iteration"] == job.iters:
            emit("train", **info, exchange="mlx", world_size=group.size())

    from worker.rank.checkpoint import TrainerState, load_checkpoint, resolve_resume, save_checkpoint
    from worker.rank.model import adapter_config, build_optimizer

    optimizer, start, tokens = build_optimizer(job), 0, 0
    if args.resume is not None:
        # Every stage resumes from its own piece (replica 1 reads replica 0's: they are equal).
        state = load_checkpoint(resolve_resume(args.resume / "stages" / f"stage-{index:02d}"),
                                stage.model, optimizer)
        start, tokens = state.iteration, state.trained_tokens
    out = args.adapter_path / "stages" / f"stage-{index:02d}"

    def on_save(it: int, opt, trained: int) -> None:
        # Replicas hold identical adapters; replica 0 writes the pieces. The checkpoint folder
        # keeps stage-local names (for resuming this stage); the piece beside it has the full
        # model's names (for merging).
        # Every stage of replica 0 reports its own checkpoint folder (the herd worker agent
        # uploads it to the coordinator as this stage's piece of step ``it``).
        if topo.replica == 0:
            folder = save_checkpoint(out, stage.model, opt, adapter_config(job),
                                     TrainerState(it, trained, job.seed, group.size()))
            save_stage_adapter(stage, job, out)
            emit("checkpoint", every_stage=True, step=it, path=str(folder), stage=index,
                 stages=stages, layers=[spec.start, spec.end])

    run = train_stage(job, stage, MLXLink(group, topo), CacheDataset(train_set),
                      args.microbatches or job.batch_size // topo.replicas,
                      dp_rank=topo.replica, dp_size=topo.replicas, on_step=on_step,
                      optimizer=optimizer, start=start, trained_tokens=tokens, on_save=on_save)
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))  # every piece is on disk
    pieces = [args.adapter_path / "stages" / f"stage-{s:02d}" for s in range(stages)]
    if group.rank() == 0 and all((p / "stage.json").exists() for p in pieces):
        # Stages on one machine (or a shared disk): write the loadable adapter here; otherwise
        # the coordinator merges the pieces it collected.
        merge_stage_adapters(pieces, args.adapter_path)
    emit("done", iteration=job.iters)
    if args.metrics_file:
        with open(args.metrics_file, "a") as f:
            f.write(json.dumps({
                "event": "stage_done", "rank": group.rank(), "stage": index, "replica": topo.replica,
                "layers": [spec.start, spec.end], "losses": run.losses,
                "step_seconds": run.step_seconds, "link_seconds": run.link_seconds,
                "step_compute_seconds": run.step_compute_seconds,
                "compute_seconds": run.compute_seconds, "load_peak_bytes": load_peak,
                "peak_bytes": mx.get_peak_memory(), "adapter": str(out),
            }) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
