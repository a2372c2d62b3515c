"""The schedule of a chunked, pipelined ring all-reduce, and the state of one exchange.

N ranks sum a buffer of n float32s. The buffer is cut into N segments (one per rank) and every
segment into the same number C of chunks. Rank r streams 2(N-1)·C messages to rank r+1 and
receives as many from rank r-1, both in one fixed order:

- reduce-scatter, step t = 0..N-2: send segment (r - t), receive segment (r - 1 - t) and add it in;
  after it, rank r holds the full sum of segment (r + 1);
- all-gather, step u = 0..N-2: send segment (r + 1 - u), receive segment (r - u) and copy it in.

Message i sends exactly what message i - C of the incoming stream completed (same chunk, one step
earlier), so a rank forwards chunk k as soon as it has arrived: the pipeline is C chunks deep and
the ring never waits for a whole segment. Pure functions, no I/O: tests check them directly.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

from herd.errors import HerdError
from worker.exchange.grpc import wire


@dataclass(frozen=True)
class RingPlan:
    elements: int
    size: int
    rank: int
    chunk_elements: int

    @property
    def chunks_per_segment(self) -> int:
        longest = -(-self.elements // self.size)
        return max(1, -(-longest // self.chunk_elements))

    @property
    def messages(self) -> int:
        """Messages each rank sends (and receives) in one all-reduce."""
        return 2 * (self.size - 1) * self.chunks_per_segment

    def chunk(self, segment: int, k: int) -> tuple[int, int]:
        """[start, stop) of chunk k of a segment; sizes differ by at most one element."""
        seg_start = segment * self.elements // self.size
        seg_len = (segment + 1) * self.elements // self.size - seg_start
        c = self.chunks_per_segment
        return seg_start + k * seg_len // c, seg_start + (k + 1) * seg_len // c

    def outgoing(self, i: int) -> tuple[int, int, bool]:
        """(start, stop, first_gather) of message i this rank sends.

        ``first_gather`` is true for the all-gather's first step: the chunk is a final sum this
        rank owns (with bfloat16 on the wire it must keep the rounded value too, so that every rank
        ends with the same numbers).
        """
        step, k = divmod(i, self.chunks_per_segment)
        n = self.size
        if step < n - 1:
            segment = (self.rank - step) % n
        else:
            segment = (self.rank + 1 - (step - (n - 1))) % n
        start, stop = self.chunk(segment, k)
        return start, stop, step == n - 1

    def incoming(self, i: int) -> tuple[int, int, bool]:
        """(start, stop, add) of message i this rank receives: add it in, or copy it over."""
        step, k = divmod(i, self.chunks_per_segment)
        n = self.size
        if step < n - 1:
            start, stop = self.chunk((self.rank - 1 - step) % n, k)
            return start, stop, True
        start, stop = self.chunk((self.rank - (step - (n - 1))) % n, k)
        return start, stop, False


class Exchange:
    """One all-reduce in flight: the buffer, what arrived, and the first error (if any).

    Written by the gRPC handler thread (incoming chunks) and the reply reader (``sent``), read by
    the request-stream thread (outgoing chunks wait for the incoming chunk they forward) and by the
    caller (completion).
    """

    def __init__(self, seq: int, plan: RingPlan, buf: np.ndarray, dtype: int, deadline: float):
        self.seq = seq
        self.plan = plan
        self.buf = buf
        self.dtype = dtype
        self.deadline = deadline  # time.monotonic() by which it must be done, on every thread
        self.received = 0
        self.sent = False
        self.error: HerdError | None = None
        self.settled = threading.Event()  # set when the caller is done with it, failed or not
        self._cond = threading.Condition()

    @property
    def done(self) -> bool:
        return self.received == self.plan.messages and self.sent

    def fail(self, error: HerdError) -> None:
        """Record the first error and wake every waiter; later errors are consequences of it."""
        with self._cond:
            if self.error is None:
                self.error = error
            self._cond.notify_all()

    def mark_sent(self) -> None:
        with self._cond:
            self.sent = True
            self._cond.notify_all()

    def wait(self, predicate, deadline: float) -> bool:
        """Wait until ``predicate()`` or an error; False on error or at the deadline."""
        with self._cond:
            self._cond.wait_for(
                lambda: self.error is not None or predicate(), max(0.0, deadline - time.monotonic())
            )
            return self.error is None and predicate()

    def encode_outgoing(self, i: int) -> bytes:
        start, stop, first_gather = self.plan.outgoing(i)
        region = self.buf[start:stop]
        data = wire.payload(region, self.dtype)
        if first_gather and self.dtype != wire.FLOAT32:
            region[:] = wire.values(memoryview(data), self.dtype)
        return wire.encode(self.seq, i, self.plan.elements, self.dtype, data)

    def apply_incoming(self, chunk: wire.Chunk) -> None:
        """Add or copy one received chunk into the buffer; raises HerdError if it is not the
        next."""
        i = self.received
        if chunk.index != i or chunk.elements != self.plan.elements or chunk.dtype != self.dtype:
            raise HerdError(
                f"out-of-step exchange message: got #{chunk.index} of a {chunk.elements}-element "
                f"buffer (wire dtype {chunk.dtype}), expected #{i} of {self.plan.elements} "
                f"(wire dtype {self.dtype})",
                hint="every rank must call all_sum with the same buffer sizes in the same order "
                "and the same wire_dtype",
            )
        start, stop, add = self.plan.incoming(i)
        if len(chunk.data) != (stop - start) * wire.ITEMSIZE[self.dtype]:
            raise HerdError(f"exchange message #{i} carries {len(chunk.data)} bytes, expected "
                            f"{(stop - start) * wire.ITEMSIZE[self.dtype]}")
        incoming = wire.values(chunk.data, self.dtype)
        region = self.buf[start:stop]
        if add:
            np.add(region, incoming, out=region)
        else:
            region[:] = incoming
        with self._cond:
            self.received = i + 1
            self._cond.notify_all()
