"""Which join token each member joined with, and the tokens revoked with a member.

A join token is stateless (herd/rpc/join.py: an HMAC of role|expiry|nonce) and may serve several
machines until it expires (up to 7 days). Revoking a member's name alone left its token in its
hands: an outside run rejoined at once under a new name with it. So the coordinator records the
nonce each member joined with, and ``herd revoke`` voids that token: no machine joins with it
again (the others who joined with it keep their certificates; new machines need a new token).
Two small JSON files beside the CA's own (``tokens-joined.json``, ``tokens-void.json``), written
whole and renamed, as the CA writes revoked.json.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path

from herd.errors import AuthError

_LOCK = threading.Lock()
JOINED, VOID = "tokens-joined.json", "tokens-void.json"


class TokenLedger:
    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def _read(self, name: str) -> dict:
        try:
            return json.loads((self.folder / name).read_text())
        except FileNotFoundError:
            return {}

    def _write(self, name: str, doc: dict) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{name}-")
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
        os.replace(tmp, self.folder / name)

    def check(self, nonce: str) -> None:
        """AuthError when the token with ``nonce`` was voided."""
        who = self._read(VOID).get(nonce)
        if who is not None:
            raise AuthError(f"this join token was voided when {who} was revoked",
                            hint="make a new one on the coordinator's machine: `herd token`")

    def joined(self, label: str, nonce: str) -> None:
        """``label`` (role/name) holds a certificate since it joined with the token ``nonce``."""
        with _LOCK:
            doc = self._read(JOINED)
            doc[label] = nonce
            self._write(JOINED, doc)

    def void_for(self, label: str) -> bool:
        """Voids the token ``label`` joined with; False when it joined with none on record (a
        certificate made by `herd init`, or before herd kept this)."""
        with _LOCK:
            nonce = self._read(JOINED).get(label)
            if nonce is None:
                return False
            void = self._read(VOID)
            void.setdefault(nonce, label)
            self._write(VOID, void)
        return True
