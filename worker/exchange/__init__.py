"""Gradient exchange: one small interface, several transports.

A transport only has to sum a flat float32 buffer across the group (``all_sum``). Everything
else (flattening the gradient tree into buckets, carrying the token count, dividing) lives here,
once, so the trainer never knows whether it talks to an MLX ring or to gRPC peers.

Gradients are averaged *by tokens*, not by rank: each rank's loss is already divided by the
step's global target count (known before the forward pass, worker/trainer.py), so the plain sum of
the ranks' gradients is the update of one process holding the whole global batch, which mlx-lm's
``average_gradients`` (a mean of per-rank means) is not (see shared/FACTS.md).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import mlx.core as mx

# Gradients are concatenated into buckets of about this many bytes, one collective each.
DEFAULT_BUCKET_BYTES = 32 * 1024 * 1024


@runtime_checkable
class GradientExchange(Protocol):
    """A group of ``size`` ranks that can sum a flat float32 buffer.

    ``all_sum`` must return the elementwise sum over all ranks, identical on every rank, or raise
    ``herd.errors.PeerLostError`` within its deadline when a peer is gone. Never hang.
    ``donate=True`` promises that no other array shares ``flat``'s buffer and that the caller
    never reads ``flat`` again: a transport may write the sum into it.
    """

    name: str
    rank: int
    size: int

    def all_sum(self, flat: mx.array, donate: bool = False) -> mx.array: ...

    def close(self) -> None: ...


class LocalExchange:
    """A group of one: the identity. Used by single-process training."""

    name = "local"
    rank = 0
    size = 1

    def all_sum(self, flat: mx.array, donate: bool = False) -> mx.array:
        return flat

    def close(self) -> None:
        pass


class MLXExchange:
    """``mx.distributed.all_sum`` over an MLX group (ring, JACCL or MPI): the fast path.

    ``mx.distributed.init()`` must already have been called once, at the top of the rank process;
    the group is passed in, never created here.
    """

    name = "mlx"

    def __init__(self, group: mx.distributed.Group):
        self.group = group
        self.rank = group.rank()
        self.size = group.size()

    def all_sum(self, flat: mx.array, donate: bool = False) -> mx.array:
        # The CPU stream: collectives on Metal go through the CPU anyway, and this is the only
        # stream on Linux.
        out = mx.distributed.all_sum(flat, group=self.group, stream=mx.cpu)
        mx.eval(out)
        return out

    def close(self) -> None:
        pass


def _buckets(keys: list[str], grads: dict[str, mx.array], bucket_bytes: int) -> list[list[str]]:
    out, cur, cur_bytes = [], [], 0
    for k in keys:
        nbytes = grads[k].size * 4
        if cur and cur_bytes + nbytes > bucket_bytes:
            out.append(cur)
            cur, cur_bytes = [], 0
        cur.append(k)
        cur_bytes += nbytes
    out.append(cur)
    return out


def reduce_gradients(
    exchange: GradientExchange,
    grads: dict[str, mx.array],
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
) -> dict[str, mx.array]:
    """Sum gradients over the group, one collective per bucket of about ``bucket_bytes``.

    ``grads`` is a flat ``{name: array}`` of gradients whose loss was already divided by the
    step's global target count (worker/trainer.py), so their sum over ranks is the update of one
    process holding the whole global batch. Summed in float32 whatever the gradient's dtype.
    """
    if exchange.size == 1:
        return grads
    keys = sorted(grads)
    out: dict[str, mx.array] = {}
    for bucket in _buckets(keys, grads, bucket_bytes):
        parts = [grads[k].astype(mx.float32).reshape(-1) for k in bucket]
        # A concatenation of two or more parts is a fresh buffer nothing else shares, so the
        # exchange may sum into it; MLX returns one part alone as is (the gradient's own
        # buffer, or a view of it), so that one is copied first.
        flat = mx.concatenate(parts) if len(parts) > 1 else mx.array(parts[0])
        summed = exchange.all_sum(flat, donate=True)
        del flat
        offset = 0
        for k in bucket:
            n = grads[k].size
            out[k] = summed[offset : offset + n].reshape(grads[k].shape).astype(grads[k].dtype)
            offset += n
    return out


def all_sum_scalars(exchange: GradientExchange, *values: float | mx.array) -> list[float]:
    """Sum a few scalars (eval loss and token counts, metrics) over the group."""
    flat = mx.array([float(v.item() if isinstance(v, mx.array) else v) for v in values], mx.float32)
    return exchange.all_sum(flat, donate=True).tolist()
