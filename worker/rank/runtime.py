"""How a rank process runs on this machine: its BLAS, its allocator and its device limits.

Each is set up once, at the top of the process (worker/rank/cli.py), so the rest of the code has
no platform specifics. This module imports no MLX at import time: the BLAS choice must be made
before MLX loads.

**BLAS.** Which BLAS MLX's CPU backend uses, and preloading OpenBLAS on Linux.

The mlx-cpu wheel links the reference (netlib) BLAS: ~4 GFLOP/s on a 1024² matmul against ~110
with OpenBLAS (shared/FACTS.md). libmlx calls ``cblas_sgemm`` by symbol, so LD_PRELOAD of OpenBLAS
replaces it. LD_PRELOAD only works at exec time, so training processes are (re)started with it.

**Allocator.** Keep freed memory in the process (glibc) instead of handing every big buffer back
to the OS.

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

**Device.** macOS/Metal: the GPU may wire only part of unified memory by default; mlx-lm raises
MLX's wired limit to the recommended working set so large models do not page. On Linux (CPU
backend) there is no such limit and these functions say so instead of pretending.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys

# --- BLAS ------------------------------------------------------------------------------------

NO_PRELOAD_ENV = "HERD_NO_OPENBLAS"
_CANDIDATES = [
    "/usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/*-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/local/lib/libopenblas.so.0",
]


def find_openblas() -> str | None:
    for pattern in _CANDIDATES:
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[0]
    return None


def preload_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: os.environ) with OpenBLAS in LD_PRELOAD, when on Linux and found."""
    env = dict(os.environ if env is None else env)
    if (sys.platform != "linux" or env.get(NO_PRELOAD_ENV)
            or "openblas" in env.get("LD_PRELOAD", "")):
        return env
    lib = find_openblas()
    if lib:
        env["LD_PRELOAD"] = ":".join(p for p in (lib, env.get("LD_PRELOAD", "")) if p)
    return env


def reexec_with_openblas(argv: list[str]) -> None:
    """Restart this rank process as ``python -m worker.rank ARGV`` with OpenBLAS preloaded, if
    that would change anything. Call before importing mlx. Only a process started for exactly
    this command (as ``python -m worker.rank ARGV`` or as ``herd train ARGV``) is replaced:
    ``herd.cli.main([...])`` called inside another program (a test, an agent) is not."""
    if list(sys.argv[1:]) not in (list(argv), ["train", *argv]) or "mlx.core" in sys.modules:
        return
    env = preload_env()
    if env.get("LD_PRELOAD") != os.environ.get("LD_PRELOAD"):
        env["HERD_REEXECED"] = "1"
        os.execve(sys.executable, [sys.executable, "-m", "worker.rank", *argv], env)


def blas_in_use() -> str:
    """The BLAS library mapped into this process: 'openblas', 'accelerate', 'reference' or
    'unknown'."""
    if sys.platform == "darwin":
        return "accelerate"
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return "unknown"
    # By file name: numpy's wheels map their own OpenBLAS (libscipy_openblas64_...), which
    # MLX never calls; MLX uses OpenBLAS only when the system's libopenblas is preloaded.
    names = {os.path.basename(line.split()[-1]) for line in maps.splitlines() if "/" in line}
    if any(name.startswith("libopenblas") for name in names):
        return "openblas"
    if "libblas" in maps or "libcblas" in maps or "mlx" in maps:
        return "reference"
    return "unknown"


# --- allocator -------------------------------------------------------------------------------

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


# --- device ----------------------------------------------------------------------------------

def has_metal() -> bool:
    import mlx.core as mx  # here, not at the top: the BLAS is chosen before MLX loads

    return sys.platform == "darwin" and mx.metal.is_available()


def set_wired_limit() -> int | None:
    """Raise the wired memory limit to Metal's recommended working set (bytes), or None off Metal.

    Not exercised in CI (no Mac): written against mlx's documented API.
    """
    if not has_metal():
        return None
    import mlx.core as mx

    limit = int(mx.device_info()["max_recommended_working_set_size"])
    mx.set_wired_limit(limit)
    return limit
