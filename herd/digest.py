"""sha256 of a file, and ``FileDigest``: one definition for every artifact herd moves or checks
(datasets, checkpoints, adapters), in whichever plane it is computed."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

BLOCK_BYTES = 1 << 20


@dataclass(frozen=True)
class FileDigest:
    """A file by name, with the sha256 and size its bytes must have."""

    name: str
    sha256: str
    bytes: int


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(BLOCK_BYTES):
            h.update(block)
    return h.hexdigest()


def file_digest(path: Path, name: str | None = None) -> FileDigest:
    """The digest of ``path``, listed under ``name`` (default: the file's own name)."""
    path = Path(path)
    return FileDigest(name or path.name, sha256_file(path), path.stat().st_size)
