"""Checkpoint stall: what a checkpoint of a ~50 MB adapter + optimizer state costs the step.

Run by hand (not a test):  uv run python bench/checkpoint_stall.py [--rank 128] [--steps 8]
Writes bench/results/checkpoint-stall-<date>.md with the machine and its load average noted.

One process, herd's own pieces (worker/rank/model.py, checkpoint.py): a llama of hidden 512 and
8 blocks with LoRA of ``--rank`` on every block, AdamW (state: weights + 2 moments, fp32). Timed,
as medians in this one run:
- step: one compiled training step (forward, backward, update, eval) of ``--batch`` x
  ``--tokens`` tokens (default 4 x 512; a smaller step makes the ratio stricter);
- snapshot: what the training thread now pays per checkpoint (``checkpoint.snapshot``);
- synchronous save: what it paid before (``save_checkpoint``: capture, write, fsync, rename);
- step during a background write: a step while ``BackgroundWriter`` writes the previous snapshot
  (on a 2-core machine the writer thread competes with the step for CPU and disk).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=512, help="tokens per example")
    ap.add_argument("--note", default="")
    a = ap.parse_args()
    from worker.rank.runtime import preload_env

    env = preload_env()  # OpenBLAS, as herd's ranks run (before mlx loads)
    if env.get("LD_PRELOAD") != os.environ.get("LD_PRELOAD"):
        os.execve(sys.executable, [sys.executable, *sys.argv], env)

    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from train_throughput import machine

    from herd.cli.tiny import make_tiny_model
    from herd.config import JobConfig
    from worker.rank.checkpoint import (
        BackgroundWriter,
        TrainerState,
        save_checkpoint,
        snapshot,
        write_checkpoint,
    )
    from worker.rank.model import adapter_config, apply_adapters, build_optimizer, load_base
    from worker.rank.trainer import default_loss

    tmp = Path(tempfile.mkdtemp(prefix="herd-bench-ckpt-"))
    model_dir = make_tiny_model(tmp / "model", "llama", layers=8, hidden=512, intermediate=2048)
    job = JobConfig(model=str(model_dir), data=str(tmp), batch_size=4, iters=100, num_layers=-1,
                    optimizer="adamw", lora_parameters={"rank": a.rank, "scale": 20.0,
                                                        "dropout": 0.0})
    model, _ = load_base(job)
    apply_adapters(model, job)
    opt = build_optimizer(job)
    loss_and_grad = nn.value_and_grad(model, default_loss)
    state = [model.state, opt.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch, lengths):
        (loss, _), grad = loss_and_grad(model, batch, lengths)
        opt.update(model, grad)
        return loss

    batch = mx.random.randint(0, 200, (a.batch, a.tokens + 1))
    lengths = mx.array([[0, a.tokens]] * a.batch)

    def one_step() -> float:
        tic = time.perf_counter()
        mx.eval(step(batch, lengths), state)
        return time.perf_counter() - tic

    one_step(), one_step()  # compile, and the optimizer's state exists
    ts = TrainerState(1, 0, 0, 1)
    cfg = adapter_config(job)
    nbytes = sum(v.nbytes for _, v in tree_flatten(model.trainable_parameters()))
    nbytes += sum(v.nbytes for _, v in tree_flatten(opt.state) if isinstance(v, mx.array))
    print(f"state {nbytes / 1e6:.1f} MB, step {one_step():.3f} s", flush=True)
    load = [os.getloadavg()]

    steps = [one_step() for _ in range(a.steps)]
    snaps, syncs, during = [], [], []
    for i in range(a.steps):
        tic = time.perf_counter()
        snap = snapshot(model, opt, cfg, ts)
        snaps.append(time.perf_counter() - tic)
        tic = time.perf_counter()
        save_checkpoint(tmp / "sync", model, opt, cfg, TrainerState(i + 1, 0, 0, 1))
        syncs.append(time.perf_counter() - tic)
        writer = BackgroundWriter()
        writer.submit(partial(write_checkpoint, tmp / "bg", snap))
        during.append(one_step())
        writer.wait()
    load.append(os.getloadavg())

    med = statistics.median
    st = med(steps)
    lines = [
        f"# Checkpoint stall, {dt.date.today().isoformat()}", "",
        f"Machine: {machine()}.",
        f"Load average (1, 5, 15 min) before: {load[0]}, after: {load[1]} ({os.cpu_count()} "
        "cores shared with other work).",
        f"Model: llama hidden 512, 8 blocks, LoRA rank {a.rank} on every block, AdamW; adapter + "
        f"optimizer state {nbytes / 1e6:.1f} MB (fp32); step: {a.batch} x {a.tokens} tokens, "
        f"compiled; medians "
        f"of {a.steps}.", a.note, "",
        "| what | seconds | share of one step | goal |", "|---|---|---|---|",
        f"| one training step | {st:.3f} | 100% | |",
        f"| snapshot (on the step path now) | {med(snaps):.4f} | {med(snaps) / st:.1%} | < 5% |",
        f"| synchronous save (before) | {med(syncs):.3f} | {med(syncs) / st:.1%} | |",
        f"| a step during a background write | {med(during):.3f} | "
        f"{med(during) / st:.1%} | |",
    ]
    out = REPO / "bench" / "results" / f"checkpoint-stall-{dt.date.today().isoformat()}.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
