"""Batching, as mlx-lm batches, but resumable and known ahead.

Same batches as ``mlx_lm.tuner.trainer.iterate_batches``: examples sorted by length, cut into
global batches of ``batch_size``, each rank taking a strided slice (``rank::size``) of every global
batch. Same *order* as ``mlx_lm.lora`` too: it seeds numpy's global state once, and both the
training epochs and every validation pass draw a permutation from it (a validation pass shifts
every later epoch's order). ``DataOrder`` replays that one stream of draws from the seed, so the
whole run's order is known before the first step: a resumed job sees exactly the batches a
straight one does, and a step's global target-token count is known before its first forward pass
(the loss is divided by it inside the graph, as mlx-lm divides by its batch's count).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import mlx.core as mx
import numpy as np

from herd.dataset import target_count as dataset_target_count
from herd.errors import DatasetError
from worker.rank import balance
from worker.rank.packing import collate_packed, counted_targets, document_slots, pack

PAD_TO = 32  # mlx-lm pads to one plus a multiple of 32


def _length(dataset, i: int) -> int:
    return dataset.itemlen(i) if hasattr(dataset, "itemlen") else len(dataset[i][0])


def sorted_batches(dataset, batch_size: int, rank: int = 0, size: int = 1) -> list[list[int]]:
    """mlx-lm's batches: indices sorted by length, cut into global batches (the remainder is
    dropped), this rank's strided slice of each."""
    idx = sorted(range(len(dataset)), key=lambda i: _length(dataset, i))
    starts = range(0, len(idx) - batch_size + 1, batch_size)
    return [idx[i + rank : i + batch_size : size] for i in starts]


def target_count(item, max_seq_length: int) -> int:
    """How many target positions mlx-lm's loss mask counts for one example (herd/dataset.py
    ``target_count``, which `herd check` counts by too)."""
    tokens, offset = item if isinstance(item, tuple) and len(item) == 2 else (item, 0)
    return dataset_target_count(len(tokens), offset, max_seq_length)


@dataclass(frozen=True)
class DataOrder:
    """Which global batch each iteration trains on, and each validation pass's batch order:
    the draws ``mlx_lm.lora`` makes from ``np.random.seed(seed)``, in its order.

    Training draws a permutation of the batches when an epoch starts (before that iteration's
    validation); a validation pass draws a permutation of the validation batches when it starts
    (none when ``val_batches`` is 0: mlx-lm never starts that pass's iterator)."""

    train: tuple[int, ...]  # train[it - 1]: the global batch of iteration it
    val: dict[int, tuple[int, ...]]  # validation at iteration it: its batch order
    test: tuple[int, ...] | None = None  # the test pass after training (test: true)

    @classmethod
    def draw(cls, seed: int, train_batches: int, iters: int, val_at: frozenset[int] = frozenset(),
             val_batches_total: int = 0, val_batches: int = -1, test_batches_total: int = 0,
             test_batches: int = 0) -> "DataOrder":
        """``iters`` 0: no training (``train: false``); ``test_batches`` 0: no test pass."""
        rng = np.random.RandomState(seed)
        train: list[int] = []
        val: dict[int, tuple[int, ...]] = {}
        perm = None
        for it in range(1, iters + 1):
            pos = (it - 1) % train_batches
            if pos == 0:
                perm = rng.permutation(train_batches)
            train.append(int(perm[pos]))
            if it in val_at and val_batches != 0:
                val[it] = tuple(int(i) for i in rng.permutation(val_batches_total))
        test = None
        if test_batches != 0 and test_batches_total:
            test = tuple(int(i) for i in rng.permutation(test_batches_total))
        return cls(tuple(train), val, test)


def val_iterations(iters: int, steps_per_eval: int) -> frozenset[int]:
    """The iterations mlx-lm validates at (before that iteration's step)."""
    return frozenset(it for it in range(1, iters + 1)
                     if it == 1 or it % steps_per_eval == 0 or it == iters)


def global_batches(dataset, batch_size: int, max_seq_length: int,
                   packing: bool = False) -> list[list]:
    """The run's global batches, before any rank takes its part: ``batch_size`` examples each,
    as mlx-lm sorts and cuts them; with ``packing``, ``batch_size`` packed rows each (a row: the
    indices of the documents it holds, worker/rank/packing.py). The remainder is dropped."""
    if not packing:
        return sorted_batches(dataset, batch_size)
    rows = pack([document_slots(dataset[i], max_seq_length) for i in range(len(dataset))],
                max_seq_length)
    return [rows[i : i + batch_size] for i in range(0, len(rows) - batch_size + 1, batch_size)]


class BatchStream:
    """This rank's training batches in ``order``, each with its global batch's target count.

    A rank takes ``shares[rank]`` items (examples, or packed rows) of every global batch
    (worker/rank/balance.py ``take``; equal shares are mlx-lm's strided split). ``shares`` may
    change between iterations (speed balancing): the update does not depend on the split."""

    def __init__(self, dataset, batch_size: int, max_seq_length: int, rank: int, size: int,
                 order: DataOrder, packing: bool = False,
                 shares: tuple[int, ...] | None = None):
        if shares is None and batch_size % size != 0:
            raise ValueError(
                f"batch_size {batch_size} is not divisible by {size} data-parallel ranks"
            )
        self.dataset = dataset
        self.max_seq_length = max_seq_length
        self.order = order
        self.rank = rank
        self.packing = packing
        self.batches = global_batches(dataset, batch_size, max_seq_length, packing)
        if not self.batches:
            what = "packs into fewer rows than" if packing else "has fewer examples than"
            raise ValueError(
                f"the training set ({len(dataset)} examples) {what} batch_size={batch_size}"
            )
        self.shares = tuple(shares) if shares is not None else balance.equal(batch_size, size)
        if len(self.shares) != size or sum(self.shares) != batch_size:
            raise ValueError(f"shares {list(self.shares)} are not a split of batch_size "
                             f"{batch_size} over {size} ranks")
        self.global_targets = [self._targets(b) for b in self.batches]

    def _targets(self, batch: list) -> int:
        if self.packing:
            return counted_targets([[self.dataset[j] for j in row] for row in batch],
                                   self.max_seq_length)
        return sum(target_count(self.dataset[j], self.max_seq_length) for j in batch)

    @property
    def batches_per_epoch(self) -> int:
        return len(self.batches)

    def targets(self, first: int, count: int) -> int:
        """Target tokens of iterations ``first .. first + count - 1`` over all ranks: the
        denominator of their token-weighted mean, known before any forward pass."""
        last = min(first + count - 1, len(self.order.train))
        n = sum(self.global_targets[self.order.train[it - 1]] for it in range(first, last + 1))
        if not n:  # its loss would be 0 / 0: mlx-lm trains on NaN, herd says why, before it
            raise DatasetError(
                f"iteration {first}'s batch has no target token to train on",
                hint="with mask_prompt, a prompt as long as max_seq_length "
                f"({self.max_seq_length}) leaves nothing of its completion: raise "
                "max_seq_length, or shorten the prompts")
        return n

    def batch(self, b: int):
        """This rank's part of global batch ``b`` under the current shares, collated: (tokens,
        lengths), or packed (batch, layout)."""
        mine = balance.take(self.batches[b], self.shares, self.rank)
        if self.packing:
            return collate_packed([[self.dataset[j] for j in row] for row in mine],
                                  self.max_seq_length)
        return collate([self.dataset[j] for j in mine], self.max_seq_length)

    def iterate(self, start: int = 0) -> Iterator[tuple[mx.array, mx.array]]:
        """This rank's batches of iterations ``start + 1 ..`` of the order (each taken under the
        shares in force when it is drawn)."""
        for b in self.order.train[start:]:
            yield self.batch(b)


def eval_batches(dataset, batch_size: int, max_seq_length: int, rank: int, size: int,
                 num_batches: int, order: tuple[int, ...] | None = None):
    """mlx-lm's evaluation batches: ``num_batches`` (-1: all) of the sorted batches, taken in
    ``order`` (the pass's permutation; sorted order when None)."""
    batches = sorted_batches(dataset, batch_size, rank, size)
    picked = [batches[i] for i in order] if order is not None else batches
    if num_batches != -1:
        picked = picked[:num_batches]
    for b in picked:
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
