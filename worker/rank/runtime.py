"""Platform specifics of a training process, isolated so the rest of the code has none.

macOS/Metal: the GPU may wire only part of unified memory by default; mlx-lm raises MLX's wired
limit to the recommended working set so large models do not page. On Linux (CPU backend) there is
no such limit and these functions say so instead of pretending.
"""

from __future__ import annotations

import sys

import mlx.core as mx


def has_metal() -> bool:
    return sys.platform == "darwin" and mx.metal.is_available()


def set_wired_limit() -> int | None:
    """Raise the wired memory limit to Metal's recommended working set (bytes), or None off Metal.

    Not exercised in CI (no Mac): written against mlx's documented API.
    """
    if not has_metal():
        return None
    limit = int(mx.device_info()["max_recommended_working_set_size"])
    mx.set_wired_limit(limit)
    return limit

