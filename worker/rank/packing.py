"""Sequence packing (``cluster.packing: true``): whole documents packed into rows of up to
``max_seq_length`` tokens, so a step multiplies no padding that mlx-lm would add.

Each document keeps exactly the computation it has unpacked:
- **attention** is block-diagonal: a token attends only to earlier tokens of its own document. The
  mask goes through mlx-lm's own attention: the models take a KV-cache object per layer, ask it for
  the mask (``create_attention_mask`` calls ``cache.make_mask``), rotate by ``cache.offset`` and
  pass keys/values through ``cache.update_and_fetch`` (llama, mistral, qwen2, qwen3 in mlx-lm
  0.32). ``DocumentAttention`` is that object, with no memory of its own.
- **positions** restart at 0 for every document: ``cache.offset`` is a (rows, width) array of
  per-token positions, and ``DocumentRoPE`` applies mx.fast.rope to every token with its own
  offset (rope of one token at offset p is rope of position p: bit-identical, checked in
  tests/test_packing.py).
- **targets and the loss mask** are mlx-lm's, per document: the target of a document's last input
  is the padding token 0 (mlx-lm pads with 0 and counts that one position), prompt tokens are not
  counted under ``mask_prompt``, and each counted position is counted once
  (``batches.target_count``), so the step's denominator is the unpacked one.

A packed micro-batch is ``(batch, layout)``: ``batch`` int32 (rows, 2, width) holds inputs and
targets, ``layout`` int32 (rows, 3, width) holds each slot's position in its document, its
document's index in the row (-1: padding) and whether its target counts.

The packing is a pure function of the dataset and ``max_seq_length`` (best-fit decreasing), and
global batches are ``batch_size`` rows cut from it in order, so ``DataOrder`` shuffles them per
epoch as it shuffles mlx-lm's batches: the order is known ahead and resumes exactly.
"""

from __future__ import annotations

import bisect

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from herd.errors import ConfigError

INPUTS, TARGETS = 0, 1  # rows of a packed batch
POSITION, DOCUMENT, COUNTED = 0, 1, 2  # rows of a packed layout
PAD_TO = 32  # widths rounded up as mlx-lm rounds them: fewer shapes for mx.compile

# mlx-lm models whose attention takes its mask from the cache and rotates by cache.offset
# (read in mlx_lm/models/{llama,qwen2,qwen3}.py, 0.32); mistral is mlx-lm's llama.
PACKABLE = ("llama", "mistral", "qwen2", "qwen3")


def _tokens(item) -> tuple[list[int], int]:
    return item if isinstance(item, tuple) and len(item) == 2 else (item, 0)


def document_slots(item, max_seq_length: int) -> int:
    """Input slots one document takes in a row: its truncated length, less the last token when
    it fills ``max_seq_length`` (mlx-lm's inputs are the row minus its last column)."""
    tokens, _ = _tokens(item)
    return min(len(tokens), max_seq_length - 1)


def pack(sizes: list[int], capacity: int) -> list[list[int]]:
    """Indices of documents of ``sizes`` packed into rows of ``capacity`` slots: best-fit
    decreasing (each document, longest first, into the fullest row it fits), ties by index, so
    the packing depends on the sizes alone. Written here because it is 15 lines over ``bisect``;
    the packages that do bin packing bring dependencies for no better result."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (slots left, row), sorted
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        if sizes[i] <= 0:
            continue
        at = bisect.bisect_left(free, (sizes[i], -1))
        if at == len(free):
            rows.append([i])
            bisect.insort(free, (capacity - sizes[i], len(rows) - 1))
            continue
        left, row = free.pop(at)
        rows[row].append(i)
        bisect.insort(free, (left - sizes[i], row))
    return rows


def collate_packed(rows: list[list], max_seq_length: int) -> tuple[mx.array, mx.array]:
    """(batch, layout) of rows, each a list of dataset items (see the module docstring)."""
    used = [sum(document_slots(it, max_seq_length) for it in row) for row in rows]
    width = min(PAD_TO * -(-max(used) // PAD_TO), max_seq_length)
    batch = np.zeros((len(rows), 2, width), np.int32)
    layout = np.zeros((len(rows), 3, width), np.int32)
    layout[:, DOCUMENT] = -1
    for r, row in enumerate(rows):
        at = 0
        for d, item in enumerate(row):
            tokens, offset = _tokens(item)
            n = document_slots(item, max_seq_length)
            if n <= 0:
                continue
            seq = np.zeros(n + 1, np.int32)  # the target after the last input: mlx-lm's pad 0
            m = min(len(tokens), n + 1)
            seq[:m] = tokens[:m]
            batch[r, INPUTS, at:at + n] = seq[:n]
            batch[r, TARGETS, at:at + n] = seq[1:]
            layout[r, POSITION, at:at + n] = np.arange(n)
            layout[r, DOCUMENT, at:at + n] = d
            # mlx-lm counts target step s = j + 1 when offset <= s (<= length, always so here)
            layout[r, COUNTED, at:at + n] = np.arange(1, n + 1) >= offset
            at += n
    return mx.array(batch), mx.array(layout)


def counted_targets(rows: list[list], max_seq_length: int) -> int:
    """The counted target positions of packed rows (the unpacked documents' count)."""
    total = 0
    for row in rows:
        for item in row:
            _, offset = _tokens(item)
            total += max(0, document_slots(item, max_seq_length) - max(offset, 1) + 1)
    return total


class DocumentAttention:
    """What a packed forward passes to mlx-lm's attention where it takes a KV cache: per-token
    positions as ``offset``, the block-diagonal causal mask from ``make_mask``, keys and values
    passed through unchanged (nothing is cached). Padding slots form one more document of their
    own, so every query attends at least to itself (no all-masked softmax row)."""

    def __init__(self, layout: mx.array):
        self.offset = layout[:, POSITION]
        doc = layout[:, DOCUMENT]
        width = doc.shape[1]
        causal = mx.tril(mx.ones((width, width), dtype=mx.bool_))
        self.mask = ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None):
        if window_size is None:
            return self.mask
        # sliding-window layers: also within window_size positions of the same document
        pos = self.offset
        near = (pos[:, :, None] - pos[:, None, :]) < window_size
        return self.mask & near[:, None]

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        return keys, values


class DocumentRoPE(nn.Module):
    """A model's RoPE, also taking per-token positions: an offset of shape (rows, width) rotates
    each token by its own position (mx.fast.rope takes one offset per leading index, so each
    token becomes its own leading index). Any other offset goes to the wrapped RoPE unchanged."""

    def __init__(self, rope: nn.Module):
        super().__init__()
        self.rope = rope

    def __call__(self, x: mx.array, offset=0):
        if not (isinstance(offset, mx.array) and offset.ndim == 2):
            return self.rope(x, offset=offset)
        b, h, length, d = x.shape
        per_token = x.transpose(0, 2, 1, 3).reshape(b * length, h, 1, d)
        y = self.rope(per_token, offset=offset.reshape(-1))
        return y.reshape(b, length, h, d).transpose(0, 2, 1, 3)


def enable_packing(model: nn.Module, model_type: str) -> None:
    """Let ``model`` take packed rows (wraps each attention's RoPE; unpacked calls are
    unchanged). ConfigError for an architecture whose attention was not checked to take the
    mask and positions from the cache."""
    if model_type not in PACKABLE:
        raise ConfigError(
            f"cluster.packing: {model_type!r} models are not supported for packing",
            hint=f"packing works with {', '.join(PACKABLE)}; remove cluster.packing")
    for layer in model.layers:
        attn = layer.self_attn
        if not isinstance(attn.rope, DocumentRoPE):
            attn.rope = DocumentRoPE(attn.rope)


def packed_forward(model, inputs: mx.array, layout: mx.array) -> mx.array:
    """The model's logits for packed rows, through mlx-lm's own forward."""
    documents = DocumentAttention(layout)
    return model(inputs, cache=[documents] * len(model.layers))


def packed_loss(model, batch: mx.array, layout: mx.array, denominator=None):
    """``trainer.default_loss`` for packed rows: the same ops over each document's counted
    targets, divided by ``denominator`` (the step's count) when given. Returns (loss, count)."""
    logits = packed_forward(model, batch[:, INPUTS], layout)
    mask = layout[:, COUNTED].astype(mx.bool_)
    ce = nn.losses.cross_entropy(logits, batch[:, TARGETS]) * mask
    ntoks = mask.sum()
    return ce.astype(mx.float32).sum() / (ntoks if denominator is None else denominator), ntoks
