"""Linux's parent-death signal: a child process that must not outlive what started it (`herd
up`'s coordinator and workers, a worker's ranks, a rank re-executed for OpenBLAS).

``prctl(PR_SET_PDEATHSIG)`` fires when the *thread* that forked the child exits, not the process:
callers start such children from a thread that lives as long as they do. macOS has no such call
(False): there a rank ends by its lifeline pipe (worker/rank/lifeline.py) or its ring's lost
peer. Plain ctypes: importable before anything else, in a ``preexec_fn``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import signal
import sys

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Asks the kernel to send ``sig`` to this process when its parent thread exits; False where
    that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
