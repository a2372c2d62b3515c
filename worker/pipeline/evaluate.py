"""Validation through a pipeline: mlx-lm's ``evaluate`` (worker/rank/trainer.py) with the model cut
into stages. Each validation batch runs forward through every stage, dropout off and nothing kept
for a backward pass; the last stage takes the batch's loss with the trainer's own
``default_loss``; the replicas of a data x pipeline layout each take their share of every batch,
as data-parallel ranks do, and their sums are added. The batches and their order are the one
process's (``DataOrder.val``), so a pipeline's validation loss is the one process's, to float
rounding.
"""

from __future__ import annotations

import mlx.core as mx

from herd.config import JobConfig
from worker.exchange import all_sum_scalars
from worker.pipeline.link import Link
from worker.pipeline.stage import Stage
from worker.pipeline.step import activation_dtype, inputs_targets
from worker.rank.batches import eval_batches
from worker.rank.trainer import default_loss


def evaluate_stage(job: JobConfig, stage: Stage, link: Link, dataset, order: tuple[int, ...],
                   dp_rank: int = 0, dp_size: int = 1, replicas=None) -> float | None:
    """This stage's part of one validation pass; the loss on the last stage (summed over the
    replicas through ``replicas``, a GradientExchange of the replica pair), None on the others."""
    spec = stage.spec
    hidden, dtype = stage.model.args.hidden_size, activation_dtype(stage)
    total, ntoks = mx.array(0.0), mx.array(0)
    stage.model.eval()
    try:
        for batch, lengths in eval_batches(dataset, job.batch_size, job.max_seq_length, dp_rank,
                                           dp_size, job.val_batches, order):
            inputs = inputs_targets(batch)[0]
            x = inputs if spec.first else link.recv(
                (inputs.shape[0], inputs.shape[1], hidden), dtype, spec.index - 1)
            if not spec.last:
                y = stage.forward(x, None)
                mx.eval(y)
                link.send(y, spec.index + 1)
                continue
            mean, n = default_loss(lambda _inputs, x=x: stage.forward(x, None), batch, lengths)
            total, ntoks = total + mean * n, ntoks + n
            mx.eval(total, ntoks)
    finally:
        stage.model.train()
    if not spec.last:
        return None
    s, n = (all_sum_scalars(replicas, total, ntoks) if replicas is not None
            else (total.item(), ntoks.item()))
    # divided in float32, as mlx-lm divides its two arrays (worker/rank/trainer.py evaluate)
    return (mx.array(s, mx.float32) / mx.array(int(n))).item() if n else float("nan")
