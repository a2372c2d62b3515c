"""sha256 of a file, and ``FileDigest``: one definition for every artifact herd moves or checks
(datasets, checkpoints, adapters, model files), in whichever plane it is computed; and how a size
is shown to a user."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

BLOCK_BYTES = 1 << 20

# Two units, named so, one definition for every plane: sizes in herd's text are SI gigabytes
# (1e9 bytes, as human_bytes writes them); a Mac's RAM is sold in binary ones (a "64 GB" Mac has
# 64 GiB), and so are Ray's herd_memory_gb resources.
GB_SI = 1e9
GIB = 1 << 30


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


def human_bytes(n: float) -> str:
    """A size as people read it, in powers of 1000 (1.2 GB)."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"
