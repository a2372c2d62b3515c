"""One rank of a gRPC exchange group, started as its own process by tests/test_grpc_exchange.py.

Configured like a real rank (HERD_RANK, HERD_EXCHANGE_PEERS, HERD_RANK_TLS, through
``GrpcExchange.from_env``); prints one JSON object per line on stdout:
  {"event": "ready"}
  {"event": "sum", "elements", "max_err", "sha256", "seconds"}   (mode sum: one per size)
  {"event": "summed", "count"}                                     (mode loop: after each all_sum)
  {"event": "leaving"}                      (mode exit-open: one all_sum, then exit without close)
  {"event": "error", "type", "message", "t"}                       (t: time.time() when raised)
  {"event": "closed", "threads": [...]}                            (threads still alive after close)

Buffers are integer-valued float32 from a per-rank pattern, so the sum is exact in any order and
every rank can compute the expected result itself, a slice at a time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import threading
import time

import mlx.core as mx
import numpy as np

from herd.errors import HerdError
from worker.exchange.grpc import GrpcExchange

SLICE = 1 << 22


def emit(**event) -> None:
    print(json.dumps(event), flush=True)


def pattern(rank: int, start: int, stop: int, seed: int) -> np.ndarray:
    """Rank ``rank``'s buffer, elements [start, stop): integers in [-1000, 1000] as float32."""
    a, b = np.random.default_rng(seed * 1000 + rank).integers(1, 1 << 20, size=2)
    i = np.arange(start, stop, dtype=np.int64)
    return ((i * a + b) % 2001 - 1000).astype(np.float32)


def check_sum(exchange: GrpcExchange, elements: int, seed: int) -> None:
    mine = np.concatenate([pattern(exchange.rank, s, min(s + SLICE, elements), seed)
                           for s in range(0, elements, SLICE)] or [np.zeros(0, np.float32)])
    started = time.perf_counter()
    out = np.array(exchange.all_sum(mx.array(mine)))
    seconds = time.perf_counter() - started
    del mine
    max_err = 0.0
    for s in range(0, elements, SLICE):
        e = min(s + SLICE, elements)
        expected = sum(pattern(r, s, e, seed) for r in range(exchange.size))
        max_err = max(max_err, float(np.abs(out[s:e] - expected).max()))
    emit(event="sum", elements=elements, max_err=max_err, seconds=seconds,
         sha256=hashlib.sha256(out.tobytes()).hexdigest(), dtype=str(out.dtype), shape=out.shape)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["sum", "loop", "join", "exit-open"])
    parser.add_argument("--sizes", default="", help="comma-separated element counts (mode sum)")
    parser.add_argument("--elements", type=int, default=1 << 22, help="buffer length (mode loop)")
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--pause", type=float, default=0.0, help="seconds between all_sums (loop)")
    parser.add_argument("--wire-dtype", default="float32")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    exchange = None
    code = 0
    try:
        exchange = GrpcExchange.from_env(timeout_s=args.timeout, wire_dtype=args.wire_dtype)
        emit(event="ready")
        if args.mode == "sum":
            for size in [int(s) for s in args.sizes.split(",") if s]:
                check_sum(exchange, size, args.seed)
        elif args.mode == "loop":
            flat = mx.ones((args.elements,), dtype=mx.float32)
            for count in range(1, 1_000_000):
                exchange.all_sum(flat)
                emit(event="summed", count=count)
                time.sleep(args.pause)
        elif args.mode == "exit-open":  # as a rank whose start-up fails after the exchange formed
            exchange.all_sum(mx.ones((1000,)))
            emit(event="leaving")
            return 0
    except HerdError as e:
        emit(event="error", type=type(e).__name__, message=str(e), t=time.time())
        code = e.exit_code
    finally:
        if exchange is not None:
            exchange.close()
    # Non-daemon threads would keep this process alive: give gRPC's shutdown a moment to finish.
    for t in threading.enumerate():
        if t is not threading.main_thread() and not t.daemon:
            t.join(timeout=3)
    alive = [t.name for t in threading.enumerate()
             if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    emit(event="closed", threads=alive)
    return code


if __name__ == "__main__":
    sys.exit(main())
