"""The HTTP API's bearer tokens (dashboard, /metrics, the fine-tuning job API).

Derived from the cluster CA's key with an HMAC (``pki.Authority.api_secret``), so nothing new has
to be copied around, and one-way: a token handed to a script or a Prometheus server opens the
coordinator's HTTP side only, never a gRPC call (those want a certificate), and never yields the
key. `herd api-token` prints them.

Two scopes: the full token (everything, the job API included) and the read token (what the
dashboard's session allows: the dashboard and /metrics, never a submit or a cancel), for a
Prometheus server or a wall screen. Both carry the generation kept beside the CA
(``api-token.generation``): `herd api-token --rotate` counts it up, and the coordinator refuses
every token (and dashboard session) of an older one from its next request on.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from herd.errors import ConfigError

PREFIX, READ_PREFIX = "herd-", "herd-read-"
GENERATION_FILE = "api-token.generation"


def api_token(secret: str, generation: int = 0, read_only: bool = False) -> str:
    label = "herd http api read token v1" if read_only else "herd http api token v1"
    if generation:  # (generation 0 keeps the tokens made before rotation existed)
        label += f" #{generation}"
    mac = hmac.new(secret.encode(), label.encode(), hashlib.sha256).hexdigest()
    return (READ_PREFIX if read_only else PREFIX) + mac[:48]


def generation(tls_dir: Path) -> int:
    """The tokens' generation in ``tls_dir`` (0 before any rotation)."""
    path = tls_dir / GENERATION_FILE
    try:
        return int(path.read_text().strip() or 0)
    except FileNotFoundError:
        return 0
    except ValueError:
        raise ConfigError(f"{path} holds no number", hint="`herd api-token --rotate` writes a "
                          "good one (and makes new tokens)") from None


def rotate(tls_dir: Path) -> int:
    """Counts the generation up (every older token stops working); returns the new one."""
    try:
        new = generation(tls_dir) + 1
    except ConfigError:
        new = 1_000_000  # (past any generation a token was printed for)
    tmp = tls_dir / f".{GENERATION_FILE}.tmp"
    tmp.write_text(f"{new}\n")
    tmp.replace(tls_dir / GENERATION_FILE)
    return new
