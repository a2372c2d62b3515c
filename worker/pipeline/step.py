"""One optimizer step of one pipeline stage: its ops (worker/pipeline/schedule.py) executed in
1F1B order, each by its own handler over the step's buffers.

MLX's send/recv have no gradient, so autodiff never crosses a stage: every stage keeps only its
microbatches' *inputs* and, in the backward pass, recomputes its blocks under ``mx.vjp`` with the
cotangent it receives. The last stage computes the loss as the trainer does: each microbatch's
per-token losses summed and divided by the whole step's target count (known ahead from the batch
order), so gradients summed in microbatch order on every stage, then over accumulation and
replicas, are one process's mean over the step to float rounding.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from herd.errors import ConfigError
from worker.pipeline.link import Link
from worker.pipeline.schedule import (
    BWD,
    FWD,
    FWD_BWD,
    RECV_BWD,
    RECV_FWD,
    SEND_BWD,
    SEND_FWD,
    one_f_one_b,
)
from worker.pipeline.stage import Stage
from worker.rank.packing import COUNTED, INPUTS, TARGETS


def position_seed(seed: int, rank: int, position: int) -> int:
    """The RNG seed at one position of a run (a stage's microbatch in one step): a pure function
    of where it is, so a recomputed microbatch draws the dropout masks its forward drew, and a
    resumed run draws what a straight one does with no RNG state to save. (One process draws
    from one stream, as mlx-lm does, and saves its key instead: worker/rank/trainer.py.)"""
    return (seed * 1_000_003 + rank * 10_007 + position) % (2**63)


def _targets_mask(batch: mx.array, lengths: mx.array) -> mx.array:
    if batch.ndim == 3:  # packed rows: (batch, layout), worker/rank/packing.py
        return lengths[:, COUNTED].astype(mx.bool_)
    steps = mx.arange(1, batch.shape[1])
    return mx.logical_and(steps >= lengths[:, 0:1], steps <= lengths[:, 1:])


def inputs_targets(batch: mx.array) -> tuple[mx.array, mx.array]:
    if batch.ndim == 3:
        return batch[:, INPUTS], batch[:, TARGETS]
    return batch[:, :-1], batch[:, 1:]


@dataclass
class StepResult:
    loss: float  # on the last stage, this batch's share of the step's mean loss; 0 elsewhere
    ntoks: int
    grads: dict  # of that share: summed over the step's batches and replicas, the step's mean
    compute_seconds: float = 0.0


@dataclass
class _Step:
    """One step's state. The buffers hold, per microbatch, what an op makes until the op that
    uses it: received inputs, this stage's inputs kept for its backward, outputs to send,
    cotangents in and out."""

    stage: Stage
    link: Link
    microbatches: list[tuple[mx.array, mx.array]]
    shape: tuple[int, int, int]  # of the hidden states between stages
    dtype: mx.Dtype
    seed: int
    denominator: mx.array  # the step's target count over all its batches and replicas
    names: list[str]
    values: list[mx.array]
    # The previous stage needs cotangents only if it has adapters of its own; a stage wholly
    # before the adapted blocks only runs forward.
    send_back: bool
    grads: list[mx.array]
    loss_sum: mx.array
    compute: float = 0.0
    inputs: dict[int, mx.array] = field(default_factory=dict)
    saved: dict[int, mx.array] = field(default_factory=dict)
    outgoing: dict[int, mx.array] = field(default_factory=dict)
    cotangents: dict[int, mx.array] = field(default_factory=dict)
    returning: dict[int, mx.array] = field(default_factory=dict)

    def run(self, i: int, x: mx.array, params: list[mx.array]) -> mx.array:
        """Microbatch ``i``'s forward through this stage with ``params``."""
        self.stage.model.update(tree_unflatten(list(zip(self.names, params))))
        batch, lengths = self.microbatches[i]
        return self.stage.forward(x, lengths if batch.ndim == 3 else None)

    def grads_of(self, fn: Callable, x: mx.array, ct: mx.array):
        """(output, param grads, input cotangent or None) of fn(x, params) under cotangent ct."""
        if self.send_back:
            out, vj = mx.vjp(lambda xx, *p: [fn(xx, p)], [x, *self.values], [ct])
            return out[0], vj[1:], vj[0]
        out, vj = mx.vjp(lambda *p: [fn(x, p)], self.values, [ct])
        return out[0], vj, None

    def reseed(self, i: int) -> None:
        # LoRA dropout draws masks: a recomputed microbatch must draw the ones its forward drew.
        mx.random.seed(position_seed(self.seed, self.stage.spec.index, i))

    def input_of(self, i: int) -> mx.array:
        if self.stage.spec.first:
            return inputs_targets(self.microbatches[i][0])[0]
        return self.inputs.pop(i)


def _recv_fwd(s: _Step, i: int) -> None:
    s.inputs[i] = s.link.recv(s.shape, s.dtype, s.stage.spec.index - 1)


def _recv_bwd(s: _Step, i: int) -> None:
    s.cotangents[i] = s.link.recv(s.shape, s.dtype, s.stage.spec.index + 1)


def _send_fwd(s: _Step, i: int) -> None:
    s.link.send(s.outgoing.pop(i), s.stage.spec.index + 1)


def _send_bwd(s: _Step, i: int) -> None:
    s.link.send(s.returning.pop(i), s.stage.spec.index - 1)


def _fwd(s: _Step, i: int) -> None:
    spec = s.stage.spec
    s.reseed(i)
    tic = time.perf_counter()
    x = s.input_of(i)
    y = s.run(i, x, s.values)
    mx.eval(y)
    s.compute += time.perf_counter() - tic
    if spec.trains:
        s.saved[i] = x
    if not spec.last:
        s.outgoing[i] = y


def _bwd(s: _Step, i: int) -> None:
    s.reseed(i)
    tic = time.perf_counter()
    _, gp, dx = s.grads_of(lambda xx, p: s.run(i, xx, p), s.saved.pop(i), s.cotangents.pop(i))
    s.grads = [g + d for g, d in zip(s.grads, gp)]
    mx.eval(s.grads) if dx is None else mx.eval(s.grads, dx)
    s.compute += time.perf_counter() - tic
    if dx is not None:
        s.returning[i] = dx


def _fwd_bwd(s: _Step, i: int) -> None:
    """The last stage's forward, loss (its targets' share of the step's mean) and backward."""
    s.reseed(i)
    tic = time.perf_counter()
    x = s.input_of(i)
    b, lens = s.microbatches[i]
    targets, mask = inputs_targets(b)[1], _targets_mask(b, lens)

    def loss_fn(xx, params):
        logits = s.run(i, xx, params)
        ce = nn.losses.cross_entropy(logits, targets) * mask
        return ce.astype(mx.float32).sum() / s.denominator

    ce, gp, dx = s.grads_of(loss_fn, x, mx.array(1.0))
    s.grads = [g + d for g, d in zip(s.grads, gp)]
    s.loss_sum = s.loss_sum + ce
    mx.eval(s.grads, s.loss_sum) if dx is None else mx.eval(s.grads, s.loss_sum, dx)
    s.compute += time.perf_counter() - tic
    if dx is not None:
        s.returning[i] = dx


_HANDLERS: dict[str, Callable[[_Step, int], None]] = {
    RECV_FWD: _recv_fwd, RECV_BWD: _recv_bwd, SEND_FWD: _send_fwd, SEND_BWD: _send_bwd,
    FWD: _fwd, BWD: _bwd, FWD_BWD: _fwd_bwd,
}


def activation_dtype(stage: Stage) -> mx.Dtype:
    # Hidden states keep the embedding's dtype through every block (LoRA casts back to it).
    norm = stage.model.layers[0].input_layernorm.weight
    return norm.dtype


def pipeline_step(stage: Stage, link: Link, batch: mx.array, lengths: mx.array,
                  microbatches: int, seed: int = 0, denominator: int | None = None) -> StepResult:
    """One batch's gradients over ``microbatches`` microbatches, in 1F1B order, of its losses
    divided by ``denominator`` (the step's target count over all its batches and replicas;
    default: this batch's own)."""
    spec = stage.spec
    rows = batch.shape[0]
    if rows % microbatches:
        raise ConfigError(f"batch of {rows} does not split into {microbatches} microbatches")
    bm = rows // microbatches
    mbs = [(batch[i * bm:(i + 1) * bm], lengths[i * bm:(i + 1) * bm]) for i in range(microbatches)]
    ntoks = _targets_mask(batch, lengths).sum()
    flat = tree_flatten(stage.model.trainable_parameters())
    names, values = [k for k, _ in flat], [v for _, v in flat]
    send_back = not spec.first and spec.start > spec.first_adapted
    width = inputs_targets(batch)[0].shape[1]
    s = _Step(stage, link, mbs, (bm, width, stage.model.args.hidden_size),
              activation_dtype(stage), seed,
              ntoks if denominator is None else mx.array(denominator), names, values, send_back,
              grads=[mx.zeros_like(v) for v in values], loss_sum=mx.array(0.0))
    for op in one_f_one_b(spec.index, spec.count, microbatches, trains=spec.trains,
                          sends_back=send_back):
        _HANDLERS[op.kind](s, op.mb)
    stage.model.update(tree_unflatten(list(zip(names, values))))
    out = tree_unflatten(list(zip(names, s.grads))) if names else {}
    return StepResult(s.loss_sum.item(), int(ntoks.item()), out, s.compute)
