"""The training loop: mlx-lm's, made exact across ranks and resumable.

Pure MLX: it imports mlx, mlx_lm and herd's config types, never grpc, zeroconf or structlog.
The gradient transport is passed in (``GradientExchange``); metrics leave through a callback.

Differences from ``mlx_lm.tuner.trainer.train``, each on purpose:
- gradients are token-weighted across micro-batches and ranks (sum of per-token gradients and
  token counts, then one division), so N ranks == 1 rank with the same global batch, with or
  without accumulation; mlx-lm averages per-rank means;
- the batch stream has an explicit cursor and the RNG is reseeded from (seed, rank, iteration),
  so a resumed run replays exactly what a straight run does;
- checkpoints carry the optimizer state (mlx-lm saves adapter weights only).
Like mlx-lm, ``iters`` counts micro-batches and an optimizer step happens every
``grad_accumulation_steps`` of them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import Callable, Protocol

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from mlx_lm.tuner.trainer import grad_checkpoint

from worker.exchange import GradientExchange, LocalExchange, all_sum_scalars, reduce_gradients
from worker.rank.batches import BatchStream, eval_batches


def token_sum_loss(model, batch, lengths):
    """Sum of per-token cross entropy over the target tokens, and their count (mlx-lm's mask)."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    logits = model(inputs)
    steps = mx.arange(1, targets.shape[1] + 1)
    mask = mx.logical_and(steps >= lengths[:, 0:1], steps <= lengths[:, 1:])
    ce = (nn.losses.cross_entropy(logits, targets) * mask).astype(mx.float32).sum()
    return ce, mask.sum()


@dataclass
class LoopArgs:
    """What the loop needs, taken from the job config (herd.config.JobConfig)."""

    batch_size: int
    iters: int
    val_batches: int = 25
    steps_per_report: int = 10
    steps_per_eval: int = 200
    save_every: int = 100
    max_seq_length: int = 2048
    grad_checkpoint: bool = False
    grad_accumulation_steps: int = 1
    clear_cache_threshold: int = 0
    seed: int = 0

    @classmethod
    def from_job(cls, job) -> "LoopArgs":
        return cls(**{k: getattr(job, k) for k in cls.__dataclass_fields__})


def position_seed(seed: int, rank: int, position: int) -> int:
    """The RNG seed at one position of a run (an iteration of a rank; a pipeline stage's
    microbatch): a pure function of where it is, so a resumed run draws exactly what a straight
    one does (dropout masks) with no RNG state to save. The pipeline seeds with it too."""
    return (seed * 1_000_003 + rank * 10_007 + position) % (2**63)


class Callback(Protocol):
    def on_train_report(self, info: dict) -> None: ...
    def on_val_report(self, info: dict) -> None: ...
    def on_save(self, iteration: int, trained_tokens: int) -> None: ...


@dataclass
class Progress:
    iteration: int = 0  # micro-batch iterations completed
    trained_tokens: int = 0


def evaluate(model, dataset, args: LoopArgs, exchange: GradientExchange, loss=token_sum_loss) -> float:
    """Token-weighted mean loss over ``val_batches`` batches, summed over all ranks."""
    model.eval()
    total, ntoks = mx.array(0.0), mx.array(0)
    for batch, lengths in eval_batches(
        dataset, args.batch_size, args.max_seq_length, exchange.rank, exchange.size, args.val_batches
    ):
        s, n = loss(model, batch, lengths)
        total, ntoks = total + s, ntoks + n
        mx.eval(total, ntoks)
    model.train()
    s, n = all_sum_scalars(exchange, total, ntoks)
    return s / max(n, 1.0)


def train(
    model,
    optimizer,
    train_set,
    val_set,
    args: LoopArgs,
    exchange: GradientExchange | None = None,
    callback: Callback | None = None,
    start: Progress | None = None,
    loss: Callable = token_sum_loss,
) -> Progress:
    exchange = exchange or LocalExchange()
    progress = start or Progress()
    accum = args.grad_accumulation_steps
    if progress.iteration % accum != 0:
        raise ValueError("resume point must fall on an optimizer step boundary")
    if args.grad_checkpoint:
        grad_checkpoint(model.layers[0])

    loss_and_grad = nn.value_and_grad(model, loss)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def micro_step(batch, lengths, prev_grad):
        (loss_sum, ntoks), grad = loss_and_grad(model, batch, lengths)
        if prev_grad is not None:
            grad = tree_map(mx.add, grad, prev_grad)
        return loss_sum, ntoks, grad

    @partial(mx.compile, inputs=state, outputs=state)
    def apply_update(grad, ntoks):
        optimizer.update(model, tree_map(lambda g: g / ntoks, grad))

    stream = BatchStream(
        train_set, args.batch_size, args.max_seq_length, exchange.rank, exchange.size, args.seed
    )
    batches = stream.iterate(start=progress.iteration)

    model.train()
    grad, acc_tokens = None, mx.array(0)
    win_loss, win_tokens, win_time, win_exchange, win_iters = mx.array(0.0), mx.array(0), 0.0, 0.0, 0
    for it in range(progress.iteration + 1, args.iters + 1):
        if val_set is not None and len(val_set) and (
            it == 1 or it % args.steps_per_eval == 0 or it == args.iters
        ):
            tic = time.perf_counter()
            val_loss = evaluate(model, val_set, args, exchange, loss)
            if callback:
                callback.on_val_report(
                    {"iteration": it - 1, "val_loss": val_loss, "val_time": time.perf_counter() - tic}
                )

        tic = time.perf_counter()
        # RNG as a pure function of position: exact resume with dropout, no RNG state to save.
        mx.random.seed(position_seed(args.seed, exchange.rank, it))
        batch, lengths = next(batches)
        loss_sum, ntoks, grad = micro_step(batch, lengths, grad)
        acc_tokens = acc_tokens + ntoks
        win_loss, win_tokens = win_loss + loss_sum, win_tokens + ntoks
        if it % accum == 0:
            mx.eval(grad, acc_tokens)
            t_ex = time.perf_counter()
            flat, total = reduce_gradients(exchange, dict(tree_flatten(grad)), acc_tokens)
            win_exchange += time.perf_counter() - t_ex
            apply_update(tree_unflatten(list(flat.items())), total)
            grad, acc_tokens = None, mx.array(0)
        mx.eval(state, win_loss, win_tokens, grad, acc_tokens)
        if args.clear_cache_threshold and mx.get_cache_memory() > args.clear_cache_threshold:
            mx.clear_cache()
        win_time += time.perf_counter() - tic
        win_iters += 1
        progress.iteration = it

        if it % args.steps_per_report == 0 or it == args.iters:
            s, n = all_sum_scalars(exchange, win_loss, win_tokens)
            progress.trained_tokens += int(n)
            info = {
                "iteration": it,
                "train_loss": s / max(n, 1.0),
                "learning_rate": optimizer.learning_rate.item(),
                "iterations_per_second": win_iters / win_time if win_time else 0.0,
                "tokens_per_second": n / win_time if win_time else 0.0,
                "trained_tokens": progress.trained_tokens,
                "peak_memory_gb": mx.get_peak_memory() / 1e9,
                "exchange": exchange.name,
                "world_size": exchange.size,
                "exchange_seconds": win_exchange,
                "step_seconds": win_time,
            }
            if callback:
                callback.on_train_report(info)
            win_loss, win_tokens, win_time, win_exchange, win_iters = mx.array(0.0), mx.array(0), 0.0, 0.0, 0

        if it % accum == 0 and (it % args.save_every == 0 or it == args.iters) and callback:
            callback.on_save(it, progress.trained_tokens)
    return progress
