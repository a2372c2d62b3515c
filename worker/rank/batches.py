"""Batching, as mlx-lm batches, but resumable.

Same order as ``mlx_lm.tuner.trainer.iterate_batches``: examples sorted by length, cut into global
batches of ``batch_size``, each rank taking a strided slice (``rank::size``) of every global batch,
batches shuffled per epoch by a numpy RandomState seeded with the job's seed (mlx_lm.lora seeds the
global numpy state with the same seed, so the order is identical). Unlike mlx-lm, the position is
an explicit cursor (iterations consumed), so a resumed job sees exactly the batches it would have.
"""

from __future__ import annotations

from typing import Iterator

import mlx.core as mx
import numpy as np

PAD_TO = 32  # mlx-lm pads to one plus a multiple of 32


def _length(dataset, i: int) -> int:
    return dataset.itemlen(i) if hasattr(dataset, "itemlen") else len(dataset[i][0])


class BatchStream:
    def __init__(self, dataset, batch_size: int, max_seq_length: int, rank: int, size: int, seed: int):
        if batch_size % size != 0:
            raise ValueError(f"batch_size {batch_size} is not divisible by {size} data-parallel ranks")
        if len(dataset) < batch_size:
            raise ValueError(
                f"the training set has {len(dataset)} examples, fewer than batch_size={batch_size}"
            )
        self.dataset = dataset
        self.batch_size = batch_size
        self.max_seq_length = max_seq_length
        self.rank, self.size, self.seed = rank, size, seed
        idx = sorted(range(len(dataset)), key=lambda i: _length(dataset, i))
        self.batch_idx = [
            idx[i + rank : i + batch_size : size] for i in range(0, len(idx) - batch_size + 1, batch_size)
        ]

    @property
    def batches_per_epoch(self) -> int:
        return len(self.batch_idx)

    def iterate(self, start: int = 0) -> Iterator[tuple[mx.array, mx.array]]:
        """Endless stream of (tokens, lengths) beginning after ``start`` consumed iterations."""
        rng = np.random.RandomState(self.seed)
        epoch, pos = divmod(start, self.batches_per_epoch)
        for _ in range(epoch):  # replay the permutations already drawn; cheap
            rng.permutation(self.batches_per_epoch)
        while True:
            order = rng.permutation(self.batches_per_epoch)
            for i in order[pos:]:
                yield collate([self.dataset[j] for j in self.batch_idx[i]], self.max_seq_length)
            pos = 0


def eval_batches(dataset, batch_size: int, max_seq_length: int, rank: int, size: int, num_batches: int):
    """mlx-lm's evaluation order: sorted by length, no shuffle, ``num_batches`` (-1: all)."""
    idx = sorted(range(len(dataset)), key=lambda i: _length(dataset, i))
    batches = [idx[i + rank : i + batch_size : size] for i in range(0, len(idx) - batch_size + 1, batch_size)]
    if num_batches != -1:
        batches = batches[:num_batches]
    for b in batches:
        yield collate([dataset[j] for j in b], max_seq_length)


def collate(items: list, max_seq_length: int) -> tuple[mx.array, mx.array]:
    if isinstance(items[0], tuple) and len(items[0]) == 2:
        seqs, offsets = zip(*items)
    else:
        seqs, offsets = items, [0] * len(items)
    lengths = [min(len(s), max_seq_length) for s in seqs]
    width = min(1 + PAD_TO * ((max(len(s) for s in seqs) + PAD_TO - 1) // PAD_TO), max_seq_length)
    arr = np.zeros((len(seqs), width), np.int32)
    for j, s in enumerate(seqs):
        arr[j, : lengths[j]] = s[: lengths[j]]
    return mx.array(arr), mx.array(list(zip(offsets, lengths)))
