"""The training loop: mlx-lm's, made exact across ranks and resumable.

Pure MLX: it imports mlx, mlx_lm and herd's config types, never grpc, zeroconf or structlog.
The gradient transport is passed in (``GradientExchange``); metrics leave through a callback.

Same ops as ``mlx_lm.tuner.trainer.train`` where the math is the same: with one process and no
accumulation its adapter is bit-identical to ``mlx_lm.lora``'s (same loss ops, same batch order
across epochs and validation passes, dropout from the same mx.random stream). Differences, each
on purpose:
- gradients are token-weighted across micro-batches and ranks: every micro-batch's loss is divided
  by the whole step's target-token count (known ahead from the batch order), and gradients are
  summed, so N ranks == 1 rank with the same global batch, with or without accumulation;
  mlx-lm averages per-micro-batch and per-rank means;
- the batch order is drawn ahead from the seed (worker/batches.py ``DataOrder``) and the
  mx.random key is saved in every checkpoint, so a resumed run replays what a straight run does;
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
from worker.rank.batches import (
    BatchStream,
    DataOrder,
    eval_batches,
    sorted_batches,
    val_iterations,
)


def targets_mask(lengths: mx.array, width: int) -> mx.array:
    """mlx-lm's loss mask over ``width`` target positions: ``offset <= s <= length``."""
    steps = mx.arange(1, width + 1)
    return mx.logical_and(steps >= lengths[:, 0:1], steps <= lengths[:, 1:])


def default_loss(model, batch, lengths, denominator=None):
    """mlx-lm's ``default_loss`` (same ops), divided by ``denominator`` instead of the batch's own
    target count when one is given: the step's count over all micro-batches and ranks, so the
    gradients of every micro-batch and rank *sum* to the gradient of one process's mean over the
    whole step. Returns (loss, this batch's target count)."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    logits = model(inputs)
    mask = targets_mask(lengths, targets.shape[1])
    ce = nn.losses.cross_entropy(logits, targets) * mask
    ntoks = mask.sum()
    return ce.astype(mx.float32).sum() / (ntoks if denominator is None else denominator), ntoks


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


class Callback(Protocol):
    def on_train_report(self, info: dict) -> None: ...
    def on_val_report(self, info: dict) -> None: ...
    def on_save(self, progress: "Progress") -> None: ...


@dataclass
class Progress:
    iteration: int = 0  # micro-batch iterations completed
    trained_tokens: int = 0
    # mx.random's key after ``iteration``: LoRA dropout draws from one stream, as in mlx-lm, so
    # a resumed run restores it (None: not yet trained, the stream starts from the seed).
    random_key: tuple[int, int] | None = None


def _save_random_key() -> tuple[int, int]:
    hi, lo = mx.random.state[0].tolist()
    return int(hi), int(lo)


def _restore_random_key(key: tuple[int, int]) -> None:
    # mx.random.seed(s) sets the key to (s >> 32, s & 0xffffffff): any saved key round-trips.
    mx.random.seed((key[0] << 32) | key[1])


def evaluate(model, dataset, args: LoopArgs, exchange: GradientExchange, order=None,
             loss=default_loss) -> float:
    """mlx-lm's ``evaluate``, same ops: the token-weighted mean of per-batch mean losses over
    ``val_batches`` batches (in the pass's ``order``), summed over all ranks."""
    model.eval()
    total, ntoks = mx.array(0.0), mx.array(0)
    for batch, lengths in eval_batches(
        dataset, args.batch_size, args.max_seq_length, exchange.rank, exchange.size,
        args.val_batches, order,
    ):
        mean, n = loss(model, batch, lengths)
        total, ntoks = total + mean * n, ntoks + n
        mx.eval(total, ntoks)
    model.train()
    s, n = all_sum_scalars(exchange, total, ntoks)
    return s / n if n else float("nan")


def data_order(train_set, val_set, args: LoopArgs) -> DataOrder:
    """The run's batch order, as mlx_lm.lora draws it (worker/batches.py)."""
    val_total = 0
    if val_set is not None and len(val_set):
        if len(val_set) < args.batch_size:
            raise ValueError(f"the validation set has {len(val_set)} examples, fewer than "
                             f"batch_size={args.batch_size} (mlx-lm refuses it too)")
        val_total = len(sorted_batches(val_set, args.batch_size))
    val_at = val_iterations(args.iters, args.steps_per_eval) if val_total else frozenset()
    return DataOrder.draw(args.seed, len(sorted_batches(train_set, args.batch_size)), args.iters,
                          val_at, val_total, args.val_batches)


def train(
    model,
    optimizer,
    train_set,
    val_set,
    args: LoopArgs,
    exchange: GradientExchange | None = None,
    callback: Callback | None = None,
    start: Progress | None = None,
    loss: Callable = default_loss,
) -> Progress:
    exchange = exchange or LocalExchange()
    progress = start or Progress()
    accum = args.grad_accumulation_steps
    if progress.iteration % accum != 0:
        raise ValueError("resume point must fall on an optimizer step boundary")
    if progress.random_key is not None:
        _restore_random_key(progress.random_key)
    if args.grad_checkpoint:
        grad_checkpoint(model.layers[0])

    loss_and_grad = nn.value_and_grad(model, loss)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def micro_step(batch, lengths, denominator, prev_grad):
        (value, ntoks), grad = loss_and_grad(model, batch, lengths, denominator)
        if prev_grad is not None:
            grad = tree_map(mx.add, grad, prev_grad)
        return value, ntoks, grad

    @partial(mx.compile, inputs=state, outputs=state)
    def apply_update(grad):
        optimizer.update(model, grad)

    order = data_order(train_set, val_set, args)
    stream = BatchStream(train_set, args.batch_size, args.max_seq_length, exchange.rank,
                         exchange.size, order)
    batches = stream.iterate(start=progress.iteration)

    model.train()
    grad, denominator = None, None
    win_loss, win_tokens = mx.array(0.0), mx.array(0)
    win_time, win_exchange, win_iters = 0.0, 0.0, 0
    for it in range(progress.iteration + 1, args.iters + 1):
        if it in order.val:
            tic = time.perf_counter()
            val_loss = evaluate(model, val_set, args, exchange, order.val[it], loss)
            if callback:
                callback.on_val_report(
                    {"iteration": it - 1, "val_loss": val_loss,
                     "val_time": time.perf_counter() - tic}
                )

        tic = time.perf_counter()
        if (it - 1) % accum == 0:
            # The step's target tokens over every micro-batch and rank, known from the batch
            # order before the first forward pass: each micro-batch's loss is divided by it, so
            # summing gradients over micro-batches and ranks gives one process's mean. With one
            # rank and no accumulation it is the batch's own count: mlx-lm's exact ops.
            denominator = mx.array(stream.targets(it, accum))
        batch, lengths = next(batches)
        value, ntoks, grad = micro_step(batch, lengths, denominator, grad)
        win_loss, win_tokens = win_loss + value, win_tokens + ntoks
        if it % accum == 0:
            mx.eval(grad)
            t_ex = time.perf_counter()
            flat = reduce_gradients(exchange, dict(tree_flatten(grad)))
            win_exchange += time.perf_counter() - t_ex
            apply_update(tree_unflatten(list(flat.items())))
            grad = None
        mx.eval(state, win_loss, win_tokens, grad)
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
                # A micro-batch's loss is its share of its step's mean: the window's losses sum to
                # its steps' means (mlx-lm's figure with one rank and no accumulation).
                "train_loss": s * accum / win_iters,
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
            win_loss, win_tokens = mx.array(0.0), mx.array(0)
            win_time, win_exchange, win_iters = 0.0, 0.0, 0

        if it % accum == 0 and (it % args.save_every == 0 or it == args.iters) and callback:
            progress.random_key = _save_random_key()
            callback.on_save(progress)
    progress.random_key = _save_random_key()
    return progress
