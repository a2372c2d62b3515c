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
  mlx-lm averages per-micro-batch and per-rank means (``cluster.gradient_average: mlx_lm`` does
  that too, for mlx-lm's exact numbers);
- the batch order is drawn ahead from the seed (worker/batches.py ``DataOrder``) and the
  mx.random key is saved in every checkpoint, so a resumed run replays what a straight run does;
- checkpoints carry the optimizer state (mlx-lm saves adapter weights only);
- a step whose summed gradient is not finite (a NaN or inf loss, an exploding update) is never
  applied: training stops with ``NumericalError`` naming the iteration and the values, on every
  rank at the same step (they hold the same summed gradient), and the last checkpoint stays good.
- with ``cluster.packing`` a batch is ``batch_size`` rows of packed documents, each document's
  loss the unpacked one (worker/rank/packing.py); validation stays unpacked (mlx-lm's figure);
- a rank's share of each global batch follows its measured speed (worker/rank/balance.py): the
  split changes nothing but which rank computes which part of the same sum.
Like mlx-lm, ``iters`` counts micro-batches and an optimizer step happens every
``grad_accumulation_steps`` of them; a trailing partial accumulation is computed and never applied
(as in mlx-lm). Checkpoints fall on optimizer steps (``checkpoint_due``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from functools import partial
from typing import Callable, Protocol

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from mlx_lm.tuner.trainer import grad_checkpoint

from herd.errors import NumericalError
from worker.exchange import GradientExchange, LocalExchange, all_sum_scalars, reduce_gradients
from worker.rank.balance import Balancer, split
from worker.rank.batches import (
    BatchStream,
    DataOrder,
    eval_batches,
    global_batches,
    sorted_batches,
    val_iterations,
)
from worker.rank.packing import packed_loss
from worker.rank.reporter import window_loss


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
    packing: bool = False  # herd.config.Cluster's: packed rows, speed-balanced shares
    balance: bool = False
    shares: tuple[int, ...] | None = None
    max_shares: tuple[int, ...] | None = None
    gradient_average: str = "tokens"  # or "mlx_lm" (herd.config.Cluster.gradient_average)

    @classmethod
    def from_job(cls, job) -> "LoopArgs":
        c = job.cluster
        mine = {"packing": c.packing, "balance": c.balance,
                "shares": tuple(c.shares) if c.shares else None,
                "max_shares": tuple(c.max_shares) if c.max_shares else None,
                "gradient_average": c.gradient_average}
        fields = {k: getattr(job, k) for k in cls.__dataclass_fields__
                  if k not in mine and hasattr(job, k)}
        return cls(**fields, **mine)


def checkpoint_due(it: int, accum: int, save_every: int, iters: int) -> bool:
    """Whether the optimizer step ending at micro-batch ``it`` writes a checkpoint.

    A checkpoint must fall on an optimizer step (a resumed run restarts an accumulation from
    zero), and ``save_every`` counts micro-batches as in mlx-lm, which need not be a multiple of
    ``grad_accumulation_steps``. So a checkpoint lands on the last optimizer step at or before
    each multiple of ``save_every``: with accumulation 3 and save_every 100, after micro-batches
    99, 198, 300, ... Its adapter is the one mlx-lm writes as 0000100_adapters.safetensors (no
    update happens between 99 and 100). The last optimizer step always saves; micro-batches
    after it (a trailing partial accumulation) are never applied, as in mlx-lm."""
    if it % accum:
        return False
    # a multiple of save_every within [it, it + accum): reached before the next step
    return (it + accum - 1) // save_every > (it - 1) // save_every or it + accum > iters


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
    shares: tuple[int, ...] | None = None  # the split in force (worker/rank/balance.py)


def _save_random_key() -> tuple[int, int]:
    hi, lo = mx.random.state[0].tolist()
    return int(hi), int(lo)


def _restore_random_key(key: tuple[int, int]) -> None:
    # mx.random.seed(s) sets the key to (s >> 32, s & 0xffffffff): any saved key round-trips.
    mx.random.seed((key[0] << 32) | key[1])


def check_finite(grads: dict[str, mx.array], step_loss: mx.array, it: int, accum: int,
                 learning_rate: float) -> None:
    """Raises NumericalError when the step's gradient (summed over every rank: the same on each)
    is not finite. Checked before the update, so a NaN never reaches the adapter."""
    norm2 = sum(mx.sum(mx.square(g.astype(mx.float32))) for g in grads.values())
    raise_if_not_finite(norm2.item(), step_loss.item(), it, accum, learning_rate)


def raise_if_not_finite(norm2: float, loss: float, it: int, accum: int, learning_rate: float,
                        whose: str = "this rank's loss") -> None:
    """check_finite on the squared gradient norm and the loss already computed (a pipeline
    stage sums them over every stage first: worker/pipeline/train.py)."""
    if math.isfinite(norm2):
        return
    raise NumericalError(
        f"non-finite gradient at iteration {it} (optimizer step {it // accum}): gradient norm "
        f"{math.sqrt(norm2) if norm2 >= 0 else norm2}, {whose} {loss}; the step's update "
        "was not applied",
        hint=f"lower learning_rate (it is {learning_rate:g}) or look at the data of that step; "
        "the checkpoints saved before it, if any, are still good")


def evaluate(model, dataset, args: LoopArgs, exchange: GradientExchange, order=None,
             loss=default_loss, num_batches: int | None = None) -> float:
    """mlx-lm's ``evaluate``, same ops: the token-weighted mean of per-batch mean losses over
    ``num_batches`` batches (default ``val_batches``; -1: all), in the pass's ``order``, summed
    over all ranks."""
    model.eval()
    total, ntoks = mx.array(0.0), mx.array(0)
    for batch, lengths in eval_batches(
        dataset, args.batch_size, args.max_seq_length, exchange.rank, exchange.size,
        args.val_batches if num_batches is None else num_batches, order,
    ):
        mean, n = loss(model, batch, lengths)
        total, ntoks = total + mean * n, ntoks + n
        mx.eval(total, ntoks)
    model.train()
    s, n = all_sum_scalars(exchange, total, ntoks)
    # divided in float32, as mlx-lm divides its two arrays: the same figure to the last bit
    return (mx.array(s, mx.float32) / mx.array(int(n))).item() if n else float("nan")


def _batches_in(dataset, args: LoopArgs, name: str) -> int:
    if dataset is None or not len(dataset):
        return 0
    if len(dataset) < args.batch_size:
        if name == "validation" and args.val_batches == 0:
            return 0  # mlx-lm's evaluate draws no batch then: its iterator never starts
        raise ValueError(f"the {name} set has {len(dataset)} examples, fewer than "
                         f"batch_size={args.batch_size} (mlx-lm refuses it too)")
    return len(sorted_batches(dataset, args.batch_size))


def data_order(train_set, val_set, args: LoopArgs, test_set=None, trains: bool = True,
               test_batches: int = 0) -> DataOrder:
    """The run's batch order, as mlx_lm.lora draws it (worker/batches.py): training (unless
    ``trains`` is False) with its validation passes, then the test pass of ``test_batches``
    batches (0: none) over ``test_set``."""
    iters = args.iters if trains else 0
    val_total = _batches_in(val_set, args, "validation") if trains else 0
    val_at = val_iterations(iters, args.steps_per_eval) if val_total else frozenset()
    train_total = len(global_batches(train_set, args.batch_size, args.max_seq_length,
                                     args.packing)) if trains else 0
    return DataOrder.draw(args.seed, train_total, iters, val_at, val_total, args.val_batches,
                          _batches_in(test_set, args, "test"), test_batches)


def train(
    model,
    optimizer,
    train_set,
    val_set,
    args: LoopArgs,
    exchange: GradientExchange | None = None,
    callback: Callback | None = None,
    start: Progress | None = None,
    loss: Callable | None = None,
) -> Progress:
    exchange = exchange or LocalExchange()
    progress = start or Progress()
    train_loss = loss or (packed_loss if args.packing else default_loss)
    loss = loss or default_loss  # validation stays unpacked: mlx-lm's figure
    accum = args.grad_accumulation_steps
    mlx_lm_mean = args.gradient_average == "mlx_lm"
    if progress.iteration % accum != 0:
        raise ValueError("resume point must fall on an optimizer step boundary")
    if progress.random_key is not None:
        _restore_random_key(progress.random_key)
    if args.grad_checkpoint:
        grad_checkpoint(model.layers[0])

    loss_and_grad = nn.value_and_grad(model, train_loss)
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

    def mean_like_mlx_lm(grad):
        # mlx-lm's step: average_gradients (the sum over ranks / N), then / accumulation steps
        if exchange.size > 1:
            grad = tree_map(lambda g: g / exchange.size, grad)
        if accum > 1:
            grad = tree_map(lambda g: g / accum, grad)
        return grad

    order = data_order(train_set, val_set, args)
    # The split: the one the resumed checkpoint was taken with when it still fits this world
    # (a straight run continues with it: exact resume, also after rebalancing), else the
    # config's (or the planner's), else equal. mlx-lm's mean of per-rank means is the global
    # batch's update only for equal splits: that mode keeps them (herd.config refuses shares).
    caps = args.max_shares if args.max_shares and len(args.max_shares) == exchange.size else None
    shares = None if mlx_lm_mean else next((s for s in (progress.shares, args.shares)
                   if s and len(s) == exchange.size and sum(s) == args.batch_size
                   and (not caps or all(a <= c for a, c in zip(s, caps)))), None)
    if shares is None and not mlx_lm_mean:  # as equal as fits (4 over 3 ranks: 2, 1, 1)
        shares = split(args.batch_size, [1.0] * exchange.size, list(caps) if caps else None)
    stream = BatchStream(train_set, args.batch_size, args.max_seq_length, exchange.rank,
                         exchange.size, order, packing=args.packing, shares=shares)
    balancer = Balancer(exchange.rank, stream.shares, enabled=args.balance and not mlx_lm_mean,
                        caps=list(caps) if caps else None)
    batches = stream.iterate(start=progress.iteration)

    model.train()
    grad, denominator, step_loss = None, None, mx.array(0.0)
    win_loss, win_tokens = mx.array(0.0), mx.array(0)
    win_time, win_exchange, win_iters, win_bytes = 0.0, 0.0, 0, 0
    # tokens mode: per micro-batch, its loss (its share of its step's mean) and its step's target
    # count, for the window's mean whatever the window's cut through accumulation steps
    win_parts: list[tuple[mx.array, mx.array, int]] = []
    for it in range(progress.iteration + 1, args.iters + 1):
        if it in order.val:
            tic = time.perf_counter()
            val_loss = evaluate(model, val_set, args, exchange, order.val[it], loss)
            if callback:
                # Labelled with the iteration it runs at, as mlx-lm prints it ("Iter 50: Val
                # loss"): at its start, before its step (mlx-lm's callback gets it - 1).
                callback.on_val_report(
                    {"iteration": it, "val_loss": val_loss,
                     "val_time": time.perf_counter() - tic}
                )

        tic = time.perf_counter()
        if (it - 1) % accum == 0 and not mlx_lm_mean:
            # The step's target tokens over every micro-batch and rank, known from the batch
            # order before the first forward pass: each micro-batch's loss is divided by it, so
            # summing gradients over micro-batches and ranks gives one process's mean. With one
            # rank and no accumulation it is the batch's own count: mlx-lm's exact ops.
            # (gradient_average: mlx_lm leaves it None: each micro-batch its own mean.)
            step_targets = stream.targets(it, accum)
            denominator = mx.array(step_targets)
        batch, lengths = next(batches)
        value, ntoks, grad = micro_step(batch, lengths, denominator, grad)
        win_loss, win_tokens = win_loss + value, win_tokens + ntoks
        if not mlx_lm_mean:
            win_parts.append((value, ntoks, step_targets))
        step_loss = step_loss + value
        exchanged = 0.0
        if it % accum == 0:
            mx.eval(grad)
            t_ex = time.perf_counter()
            flat = reduce_gradients(exchange, dict(tree_flatten(grad)))
            exchanged = time.perf_counter() - t_ex
            win_exchange += exchanged
            check_finite(flat, step_loss, it, accum, optimizer.learning_rate.item())
            if exchange.size > 1:  # summed in float32 (reduce_gradients): 4 bytes an entry
                win_bytes += 4 * sum(g.size for g in flat.values())
            grad = tree_unflatten(list(flat.items()))
            apply_update(mean_like_mlx_lm(grad) if mlx_lm_mean else grad)
            grad, step_loss = None, mx.array(0.0)
        mx.eval(state, win_loss, win_tokens, grad)
        if args.clear_cache_threshold and mx.get_cache_memory() > args.clear_cache_threshold:
            mx.clear_cache()
        busy = time.perf_counter() - tic
        win_time += busy
        win_iters += 1
        progress.iteration = it
        balancer.observe(busy - exchanged)  # its own compute, not its wait for the others

        if it % args.steps_per_report == 0 or it == args.iters:
            # one collective: the window's loss and tokens, and every rank's speed
            local_rates = balancer.local_rates()
            s, n, *summed = all_sum_scalars(exchange, win_loss, win_tokens, *local_rates,
                                            *(v for v, _, _ in win_parts),
                                            *(t for _, t, _ in win_parts))
            rates, summed = summed[:len(local_rates)], summed[len(local_rates):]
            shares = list(stream.shares)
            if (new := balancer.decide(rates, it)) is not None:
                stream.shares = new
            progress.trained_tokens += int(n)
            info = {
                "iteration": it,
                # mlx-lm's figure, the mean over the window's micro-batches of each one's mean
                # loss: with mlx_lm averaging over ranks' own means too; else each global
                # micro-batch's (window_loss), the same for N workers as for one.
                "train_loss": s / (win_iters * exchange.size) if mlx_lm_mean
                else window_loss(s, summed, [d for _, _, d in win_parts]),
                "learning_rate": optimizer.learning_rate.item(),
                "iterations_per_second": win_iters / win_time if win_time else 0.0,
                "tokens_per_second": n / win_time if win_time else 0.0,
                "trained_tokens": progress.trained_tokens,
                "peak_memory_gb": mx.get_peak_memory() / 1e9,
                "exchange": exchange.name,
                "world_size": exchange.size,
                "exchange_seconds": win_exchange,
                "step_seconds": win_time,
                # the window's split of each global batch, and each rank's items per second
                "shares": shares if exchange.size > 1 else None,
                "rank_rates": rates or None,
                "exchange_bytes": win_bytes,
            }
            if callback:
                callback.on_train_report(info)
            win_loss, win_tokens, win_parts = mx.array(0.0), mx.array(0), []
            win_time, win_exchange, win_iters, win_bytes = 0.0, 0.0, 0, 0

        if checkpoint_due(it, accum, args.save_every, args.iters):
            progress.random_key = _save_random_key()
            progress.shares = stream.shares
            # The count as of this checkpoint, which a resumed run starts from: the reports'
            # total and the open window's tokens (save_every need not be a multiple of
            # steps_per_report). A collective on every rank, like the report's.
            opened = int(all_sum_scalars(exchange, win_tokens)[0]) if win_iters else 0
            if callback:
                callback.on_save(replace(progress,
                                         trained_tokens=progress.trained_tokens + opened))
    progress.random_key = _save_random_key()
    return progress
