"""Ray's token authentication as herd's Ray nodes and coordinator meet it (Ray 2.60).

A head started where ``~/.ray/auth_token`` exists (a local ``ray.init`` writes one) turns token
authentication on; a node or driver that joins it reads an unset ``RAY_AUTH_MODE`` as disabled
and is refused ("InvalidAuthToken") even with the very same token file (an outside run on the
docs' own commands). herd does not set the variable for the user: a driver alone in token mode
in a cluster whose nodes are not lost every actor it made. It says what it read, and the fix.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import MutableMapping

MODE = "RAY_AUTH_MODE"


def token_file() -> Path:
    return Path.home() / ".ray" / "auth_token"


def describe(env: MutableMapping[str, str] = os.environ) -> str:
    """What this machine's Ray client will do, for a refusal's hint."""
    token = token_file()
    mode = env.get(MODE)
    return (f"{MODE}={mode}" if mode else f"{MODE} unset (Ray reads it as disabled)") + (
        f", {token} {'present' if token.exists() else 'absent'}")
