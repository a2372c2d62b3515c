"""A pipeline stage's training loop: the trainer's (same batch order, the loss divided by the
step's target count), one pipelined step (worker/pipeline/step.py) per batch, and the replicas of
a data x pipeline layout summed by the trainer's own reduction.

It is a second loop on purpose (torchtune's rule: copy the flow, share the invariants): the
invariants come from where the trainer defines them, ``data_order`` (worker/rank/trainer.py) and
``reduce_gradients`` (worker/exchange).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from herd.config import JobConfig
from worker.exchange import all_sum_scalars, reduce_gradients
from worker.pipeline.evaluate import evaluate_stage
from worker.pipeline.link import Link, MLXLink
from worker.pipeline.stage import Stage
from worker.pipeline.step import pipeline_step, position_seed
from worker.rank.batches import BatchStream, DataOrder
from worker.rank.model import build_optimizer
from worker.rank.trainer import LoopArgs, checkpoint_due, data_order, raise_if_not_finite


@dataclass
class PipelineRun:
    losses: list[float] = field(default_factory=list)  # per step, last stage only
    step_seconds: list[float] = field(default_factory=list)
    step_compute_seconds: list[float] = field(default_factory=list)  # busy time, not waiting
    link_seconds: float = 0.0
    compute_seconds: float = 0.0
    trained_tokens: int = 0


class ReplicaExchange:
    """A stage's data-parallel peer (the same stage of the other pipeline, a ring neighbour) as a
    GradientExchange of two, so the replicas are summed like any data-parallel ranks."""

    name = "mlx"
    size = 2

    def __init__(self, link: MLXLink):
        self._link = link
        self.rank = link.topo.replica

    def all_sum(self, flat: mx.array, donate: bool = False) -> mx.array:
        return self._link.sum_with_peer(flat)

    def close(self) -> None:
        pass


def _sum_replicas(link: MLXLink, grads: dict, ntoks: int, loss: float) -> tuple[dict, int, float]:
    """Token-weighted data parallelism: the gradients (of losses already divided by the step's
    global target count), token counts and losses summed over the replicas: one process's step."""
    exchange = ReplicaExchange(link)
    flat = reduce_gradients(exchange, dict(tree_flatten(grads)))
    loss_sum, total = all_sum_scalars(exchange, loss, ntoks)
    summed = tree_unflatten(list(flat.items())) if flat else {}
    return summed, int(round(total)), loss_sum


def _check_finite_everywhere(link: Link, grads: dict, loss: float, it: int, accum: int,
                             learning_rate: float) -> None:
    """The trainer's check (worker/rank/trainer.py check_finite) over the whole model: each stage
    holds only its own blocks' gradients, and one stage may overflow where the others do not, so
    the squared norms (and the last stages' losses) are summed over every rank first. Every stage
    then raises together, at the same step, before any of them applies its update: none is left
    a step ahead, and none waits on a peer that has already exited. (One small all-reduce per
    optimizer step: a scalar pair.)"""
    norm2 = sum((mx.sum(mx.square(g.astype(mx.float32))) for _, g in tree_flatten(grads)),
                mx.array(0.0))
    both = link.sum_all(mx.stack([norm2, mx.array(loss, dtype=mx.float32)])).tolist()
    raise_if_not_finite(both[0], both[1], it, accum, learning_rate,
                        whose="the loss summed over the last stages")


def train_stage(job: JobConfig, stage: Stage, link: Link, train_set, microbatches: int,
                dp_rank: int = 0, dp_size: int = 1, iters: int | None = None,
                on_step: Callable[[dict], None] | None = None, optimizer=None, start: int = 0,
                trained_tokens: int = 0,
                on_save: Callable[[int, object, int], None] | None = None,
                order: DataOrder | None = None, valid_set=None,
                on_val: Callable[[dict], None] | None = None) -> PipelineRun:
    """One pipelined step per batch; ``grad_accumulation_steps`` batches summed before one
    update. ``start``: iterations already done (a resumed run; the optimizer then holds their
    state). ``order``: the run's batch order (default: drawn as if there were no validation
    set), the same as the one process's it must equal; with ``valid_set``, its validation passes
    run where the one process's do (worker/pipeline/evaluate.py), the last stage's loss to
    ``on_val``."""
    optimizer = optimizer or build_optimizer(job)
    order = order or data_order(train_set, None, LoopArgs.from_job(job))
    stream = BatchStream(train_set, job.batch_size, job.max_seq_length, dp_rank, dp_size, order,
                         packing=job.cluster.packing)
    batches = stream.iterate(start=start)
    run = PipelineRun(trained_tokens=trained_tokens)
    last = iters or job.iters
    stage.model.train()
    accum = job.grad_accumulation_steps
    acc, acc_tokens, acc_loss = None, 0, 0.0
    t_step, link_at = time.perf_counter(), (link.seconds, link.sent_bytes)
    for it in range(start + 1, last + 1):
        if valid_set is not None and it in order.val:
            tic = time.perf_counter()
            val_loss = evaluate_stage(job, stage, link, valid_set, order.val[it], dp_rank,
                                      dp_size, ReplicaExchange(link) if dp_size > 1 else None)
            if val_loss is not None and on_val is not None:
                on_val({"iteration": it, "val_loss": val_loss,
                        "val_time": time.perf_counter() - tic})
            t_step = time.perf_counter()  # the step's rate leaves the validation out
            link_at = (link.seconds, link.sent_bytes)
        step_seed = position_seed(job.seed, dp_rank, it)
        if (it - 1) % accum == 0:
            denominator = stream.targets(it, accum)
        batch, lengths = next(batches)
        tic = time.perf_counter()
        res = pipeline_step(stage, link, batch, lengths, microbatches, seed=step_seed,
                            denominator=denominator)
        run.compute_seconds += res.compute_seconds
        run.step_compute_seconds.append(res.compute_seconds)
        acc = res.grads if acc is None else tree_map(mx.add, acc, res.grads)
        acc_tokens += res.ntoks
        acc_loss += res.loss
        # An optimizer step; or a trailing partial accumulation, computed and never applied (as
        # in mlx-lm), whose loss is still reported at the last iteration.
        if it % accum == 0 or it == last:
            if dp_size > 1:
                acc, acc_tokens, acc_loss = _sum_replicas(link, acc, acc_tokens, acc_loss)
            if it % accum == 0:
                _check_finite_everywhere(link, acc, acc_loss, it, accum,
                                         optimizer.learning_rate.item())
                if tree_flatten(acc):  # a stage before the adapted blocks only relays
                    optimizer.update(stage.model, acc)
                    mx.eval(stage.model.parameters(), optimizer.state)
                run.losses.append(acc_loss)
            run.trained_tokens += acc_tokens
            if on_step is not None:  # one step: its loss, tokens and seconds
                on_step({"iteration": it, "train_loss": acc_loss,
                         "learning_rate": optimizer.learning_rate.item(),
                         "trained_tokens": run.trained_tokens, "tokens": acc_tokens,
                         "seconds": time.perf_counter() - t_step,
                         # in send/recv (transfers, and waits on a neighbour: the bubble)
                         "link_seconds": link.seconds - link_at[0],
                         "link_bytes": link.sent_bytes - link_at[1],
                         "peak_memory_gb": mx.get_peak_memory() / 1e9})
            t_step, link_at = time.perf_counter(), (link.seconds, link.sent_bytes)
            acc, acc_tokens, acc_loss = None, 0, 0.0
            if on_save is not None and checkpoint_due(it, accum, job.save_every, last) and (
                    it % accum == 0):
                on_save(it, optimizer, run.trained_tokens)
        run.step_seconds.append(time.perf_counter() - tic)
    run.link_seconds = link.seconds
    return run
