"""Keep freed memory in the process (glibc) instead of handing every big buffer back to the OS.

glibc serves allocations above its mmap threshold (128 KiB, rising on its own to at most 32 MiB)
with fresh ``mmap`` pages and unmaps them on free; the heap top is trimmed back likewise. MLX's
CPU backend allocates every intermediate array with malloc, and a gRPC all-reduce allocates and
frees megabyte-sized buffers for every chunk it moves (Python ``bytes``, gRPC slices), so much
of a training step went to page faults and page clears: perf put a third of the exchange's CPU
there. A fixed threshold and a high trim threshold let those buffers be reused warm: 2 ranks of
a 107M llama trained 14% faster over the MLX ring (173 -> 199 tok/s) and the gRPC exchange's
share of a step fell from 16% to 8% (bench/results/train-throughput-2026-11-23-*.md). The cost is
resident memory the process keeps after a peak: each malloc arena (the main heap and one per busy
thread, gRPC's among them) keeps what it freed up to its own high-water mark, instead of
returning it. MLX's peak accounting, which the planner models, is unchanged; the RSS a worker
reports can stay near its step peak between steps.

macOS's allocator has no such knobs and does not need them; elsewhere this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024  # glibc's own ceiling for the dynamic threshold
TRIM_THRESHOLD_BYTES = 1024 * 1024 * 1024
TOP_PAD_BYTES = 64 * 1024 * 1024

_applied: bool | None = None


def reuse_freed_memory() -> bool:
    """Apply the settings once per process; True if glibc took them."""
    global _applied
    if _applied is None:
        _applied = _mallopt_all() if sys.platform == "linux" else False
    return _applied


def _mallopt_all() -> bool:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    taken = [mallopt(param, value) == 1 for param, value in (  # each one, even if one fails
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
        (_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
        (_M_TOP_PAD, TOP_PAD_BYTES),
    )]
    return all(taken)
