"""Open-file limits: a herd process takes what its hard limit allows.

A coordinator or worker agent holds a descriptor per connection, and a stranger can open
connections without a certificate (the TLS handshake is what it never finishes). With the common
default soft limits (systemd 1024, launchd 256) a few hundred such sockets used up an agent's
descriptors in an outside run, and its checkpoints stopped reaching the coordinator. The soft
limit is raised to the hard one, at most ``MAX_OPEN_FILES``; macOS refuses a soft limit above
kern.maxfilesperproc, so a refusal falls back to ``MACOS_OPEN_MAX``. (mlx-lm's import sets
(2048, 4096) in a rank process: ranks hold few sockets.)
"""

from __future__ import annotations

import resource

MAX_OPEN_FILES = 65536
MACOS_OPEN_MAX = 10240  # <sys/syslimits.h> OPEN_MAX: what any Mac accepts


def raise_open_files() -> int:
    """Raises this process's soft RLIMIT_NOFILE as far as allowed; returns the limit in force.
    Never lowers it, never fails (a limit it cannot raise stays as it was)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return soft
    top = MAX_OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, MAX_OPEN_FILES)
    for want in (top, min(top, MACOS_OPEN_MAX)):
        if want <= soft:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            return want
        except (ValueError, OSError):
            continue
    return soft
