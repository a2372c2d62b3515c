"""BlobStore (content-addressed dataset files) and AdapterStore (checkpoints per job and step).

Both receive chunked streams, so no message ever nears a size limit, check every sha256 and move
a complete result into place with one rename: a broken upload leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from coordinator.domain import Checkpoint, FileDigest
from herd.client_rpc import ChecksumError
from herd.errors import DatasetError, NotFoundError

CHUNK_BYTES = 1024 * 1024
_SHA = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_JOB = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def check_sha(sha: str) -> str:
    if not _SHA.match(sha):
        raise DatasetError(f"not a sha256: {sha!r}")
    return sha


def check_name(name: str) -> str:
    """Peer-supplied names are only ever plain names inside one folder."""
    if not _NAME.match(name):
        raise DatasetError(f"refusing file name {name!r}", hint="plain file names only")
    return name


def _read(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while block := f.read(CHUNK_BYTES):
            yield block


class BlobStore:
    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def has(self, sha: str) -> bool:
        return (self.root / check_sha(sha)).exists()

    def put(self, sha: str, chunks: Iterable[bytes]) -> int:
        check_sha(sha)
        h, size = hashlib.sha256(), 0
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".upload-")
        try:
            with os.fdopen(fd, "wb") as f:
                for data in chunks:
                    h.update(data)
                    size += len(data)
                    f.write(data)
            if h.hexdigest() != sha:
                raise ChecksumError(f"upload does not hash to {sha[:12]}", hint="retry the upload")
            os.replace(tmp, self.root / sha)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return size

    def read(self, sha: str) -> Iterator[bytes]:
        path = self.root / check_sha(sha)
        if not path.exists():
            raise NotFoundError(f"no blob {sha[:12]}", hint="upload it with PutBlob first")
        return _read(path)


class AdapterStore:
    """<root>/<job_id>/<step:07d>/{files}; a step folder exists only when complete."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def _job_dir(self, job_id: str) -> Path:
        if not _JOB.match(job_id):
            raise NotFoundError(f"bad job id {job_id!r}")
        return self.root / job_id

    def step_dir(self, job_id: str, step: int) -> Path:
        return self._job_dir(job_id) / f"{int(step):07d}"

    def receive(self, job_id: str, step: int, files: list[FileDigest],
                chunks: Iterable[tuple[str, bytes]], now_ms: int) -> Checkpoint:
        """Writes the files of one checkpoint from (name, data) chunks, in header order."""
        if not files:
            raise DatasetError("a checkpoint needs at least one file")
        for f in files:
            check_name(f.name)
        job_dir = self._job_dir(job_id)
        job_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=job_dir, prefix=f".step-{step}-"))
        try:
            expected = {f.name: f for f in files}
            hashes = {name: hashlib.sha256() for name in expected}
            handles = {}
            try:
                for name, data in chunks:
                    if name not in expected:
                        raise DatasetError(f"chunk for {name!r}, which the header does not list")
                    if name not in handles:
                        handles[name] = open(tmp / name, "wb")
                    handles[name].write(data)
                    hashes[name].update(data)
            finally:
                for h in handles.values():
                    h.close()
            for name, f in expected.items():
                path = tmp / name
                if not path.exists() and f.bytes == 0:
                    path.touch()
                if hashes[name].hexdigest() != f.sha256 or path.stat().st_size != f.bytes:
                    raise ChecksumError(f"checkpoint {step} file {name} arrived corrupted",
                                        hint="the worker retries the upload")
            final = self.step_dir(job_id, step)
            if final.exists():  # idempotent: the same step uploaded again replaces the old copy
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        return Checkpoint(job_id=job_id, step=step, files=files, created_ms=now_ms)

    def files(self, checkpoint: Checkpoint) -> Iterator[tuple[str, bytes]]:
        folder = self.step_dir(checkpoint.job_id, checkpoint.step)
        if not folder.exists():
            raise NotFoundError(f"checkpoint {checkpoint.step} of {checkpoint.job_id} is missing on disk")
        for f in checkpoint.files:
            for block in _read(folder / check_name(f.name)):
                yield f.name, block
            if f.bytes == 0:
                yield f.name, b""
