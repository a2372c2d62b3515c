"""Which BLAS MLX's CPU backend uses, and preloading OpenBLAS on Linux.

The mlx-cpu wheel links the reference (netlib) BLAS: ~4 GFLOP/s on a 1024² matmul against ~110
with OpenBLAS (shared/FACTS.md). libmlx calls ``cblas_sgemm`` by symbol, so LD_PRELOAD of OpenBLAS
replaces it. LD_PRELOAD only works at exec time, so training processes are (re)started with it.
"""

from __future__ import annotations

import glob
import os
import sys

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
    if sys.platform != "linux" or env.get(NO_PRELOAD_ENV) or "openblas" in env.get("LD_PRELOAD", ""):
        return env
    lib = find_openblas()
    if lib:
        env["LD_PRELOAD"] = ":".join(p for p in (lib, env.get("LD_PRELOAD", "")) if p)
    return env


def reexec_with_openblas(argv: list[str]) -> None:
    """Restart this process as ``herd ARGV`` with OpenBLAS preloaded, if that would change
    anything. Call before importing mlx. Only a process started for exactly this command is
    replaced: ``herd.cli.main([...])`` called inside another program (a test, an agent) is not."""
    if list(sys.argv[1:]) != list(argv) or "mlx.core" in sys.modules:
        return
    env = preload_env()
    if env.get("LD_PRELOAD") != os.environ.get("LD_PRELOAD"):
        env["HERD_REEXECED"] = "1"
        os.execve(sys.executable, [sys.executable, "-m", "herd", *argv], env)


def blas_in_use() -> str:
    """The BLAS library mapped into this process: 'openblas', 'accelerate', 'reference' or 'unknown'."""
    if sys.platform == "darwin":
        return "accelerate"
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return "unknown"
    if "openblas" in maps:
        return "openblas"
    if "libblas" in maps or "libcblas" in maps or "mlx" in maps:
        return "reference"
    return "unknown"
