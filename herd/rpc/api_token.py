"""The HTTP API's bearer token (dashboard, /metrics, the fine-tuning job API).

Derived from the cluster CA's key with an HMAC (``pki.Authority.api_secret``), so nothing new has
to be copied around, and one-way: a token handed to a script or a Prometheus server opens the
coordinator's HTTP side only, never a gRPC call (those want a certificate), and never yields the
key. `herd api-token` prints it. (If cluster auth changes, this
is the one function the HTTP side asks.)
"""

from __future__ import annotations

import hashlib
import hmac

PREFIX = "herd-"


def api_token(secret: str) -> str:
    mac = hmac.new(secret.encode(), b"herd http api token v1", hashlib.sha256).hexdigest()
    return PREFIX + mac[:48]
