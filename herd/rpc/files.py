"""Moving files over gRPC: chunked, sha256-checked, and put into place atomically. Written once,
for every transfer herd makes: datasets to the coordinator (PutBlob) and on to workers (GetBlob),
checkpoints from ranks (PutCheckpoint) and back to laptops and resuming stages (GetAdapter).

A sender streams ``(name, bytes)`` chunks, file after file (``send_files``) or one file's bytes
(``read_chunks``). A receiver writes them into scratch space, hashing as it goes, and moves the
result into place with one rename only when every name, size and sha256 matches: a broken or
corrupted transfer leaves nothing behind and raises ``ChecksumError``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from herd.digest import FileDigest
from herd.errors import ChecksumError, DatasetError
from protos.v1 import common_pb2, coordinator_pb2

# Big enough that per-message overhead is small, far below any message-size limit.
CHUNK_BYTES = 1024 * 1024
_SHA = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


def check_sha(sha: str) -> str:
    if not _SHA.match(sha):
        raise DatasetError(f"not a sha256: {sha!r}")
    return sha


def check_name(name: str) -> str:
    """A peer-supplied file name, accepted only as a plain name inside one folder."""
    if not _NAME.match(name):
        raise DatasetError(f"refusing file name {name!r}", hint="plain file names only")
    return name


# --- sending ---------------------------------------------------------------------------------

def read_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while block := f.read(CHUNK_BYTES):
            yield block


def send_files(folder: Path, files: list[FileDigest]) -> Iterator[tuple[str, bytes]]:
    """The files' chunks in list order; an empty file is one empty chunk."""
    for f in files:
        sent = False
        for block in read_chunks(folder / check_name(f.name)):
            sent = True
            yield f.name, block
        if not sent:
            yield f.name, b""


# --- receiving -------------------------------------------------------------------------------

def receive_file(chunks: Iterable[bytes], sha256: str, dest: Path, what: str, hint: str) -> int:
    """Write one file's chunks to ``dest``, replacing it atomically once its bytes hash to
    ``sha256``; returns its size."""
    check_sha(sha256)
    h, size = hashlib.sha256(), 0
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.part-")
    try:
        with os.fdopen(fd, "wb") as f:
            for data in chunks:
                h.update(data)
                size += len(data)
                f.write(data)
        if h.hexdigest() != sha256:
            raise ChecksumError(f"{what} arrived corrupted: its bytes do not hash to {sha256[:12]}",
                                hint=hint)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return size


def write_files(chunks: Iterable[tuple[str, bytes]], files: list[FileDigest], into: Path,
                what: str, hint: str) -> None:
    """Write the chunks of ``files`` into the existing scratch folder ``into``, checking every
    name, size and sha256 (a file sent as no chunk is empty). The caller moves the files into
    place once this returns."""
    expected = {check_name(f.name): f for f in files}
    hashes = {name: hashlib.sha256() for name in expected}
    handles = {}
    try:
        for name, data in chunks:
            if name not in expected:
                raise ChecksumError(f"unexpected file {name!r} in the {what} stream", hint=hint)
            if name not in handles:
                handles[name] = open(into / name, "wb")
            handles[name].write(data)
            hashes[name].update(data)
    finally:
        for handle in handles.values():
            handle.close()
    for name, f in expected.items():
        path = into / name
        if name not in handles:
            path.write_bytes(b"")
        if hashes[name].hexdigest() != f.sha256 or path.stat().st_size != f.bytes:
            raise ChecksumError(f"{what}: {name} arrived missing or corrupted", hint=hint)


def receive_folder(chunks: Iterable[tuple[str, bytes]], files: list[FileDigest], final: Path,
                   what: str, hint: str, extra: dict[str, str] | None = None) -> None:
    """The files, checked, as the folder ``final``: built beside it and renamed into place whole,
    replacing what was there (a retried transfer of the same thing is idempotent). ``extra``:
    small text files of the receiver's own, written into the folder too."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.part-"))
    try:
        write_files(chunks, files, tmp, what, hint)
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def receive_checkpoint(messages: Iterable[coordinator_pb2.GetAdapterReply], into: Path, what: str,
                       hint: str) -> common_pb2.CheckpointInfo:
    """A GetAdapter stream (its header, then its files' chunks) written into the existing scratch
    folder ``into`` with ``write_files``; returns the header. ChecksumError for a stream without a
    header first."""
    messages = iter(messages)
    first = next(messages, None)
    if first is None or first.WhichOneof("part") != "header":
        if first is not None:
            raise ChecksumError(f"unexpected file {first.chunk.name!r} in the {what} stream",
                                hint=hint)
        raise ChecksumError(f"the coordinator sent no {what} header", hint=hint)
    header = first.header
    files = [FileDigest(d.name, d.sha256, d.bytes) for d in header.files]
    write_files(((m.chunk.name, m.chunk.data) for m in messages), files, into, what, hint)
    return header


def receive_checkpoint_files(messages: Iterable[coordinator_pb2.GetAdapterReply], out: Path,
                             what: str, hint: str) -> common_pb2.CheckpointInfo:
    """A GetAdapter stream's files into the folder ``out``, each checked, each replaced
    atomically; other files in ``out`` are left alone (``herd pull`` into an adapter folder)."""
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=out, prefix=".pull-"))
    try:
        header = receive_checkpoint(messages, scratch, what, hint)
        for d in header.files:
            os.chmod(scratch / d.name, 0o644)  # an adapter is an ordinary file
            os.replace(scratch / d.name, out / d.name)
        return header
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def receive_checkpoint_folder(messages: Iterable[coordinator_pb2.GetAdapterReply], final: Path,
                              what: str, hint: str) -> common_pb2.CheckpointInfo:
    """A GetAdapter stream as the folder ``final``, checked, then renamed into place whole."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.part-"))
    try:
        header = receive_checkpoint(messages, tmp, what, hint)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        return header
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
