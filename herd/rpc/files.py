"""Moving files over gRPC: chunked, sha256-checked, and put into place atomically. Written once,
for every transfer herd makes: datasets and model files to the coordinator (PutBlob) and on to
workers (GetBlob), checkpoints from ranks (PutCheckpoint) and back to laptops and resuming stages
(GetAdapter).

A sender streams ``(name, bytes)`` chunks, file after file (``send_files``) or one file's bytes
from an offset (``read_chunks``). A receiver writes them into scratch space, hashing as it goes,
and moves the result into place with one rename only when every name, size and sha256 matches: a
corrupted transfer leaves nothing behind and raises ``ChecksumError``. Large files use resumable
transfers, where a broken connection keeps the bytes received and the next try sends only the
rest: ``receive_resumable`` on the fetching side (model shards to workers), ``receive_from`` on
the serving side of an upload (PutBlob: datasets and model files from a laptop).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

from herd.digest import BLOCK_BYTES, FileDigest
from herd.errors import ChecksumError, HerdError, PeerLostError, ProtocolError
from herd.rpc.names import check_name, check_sha, check_step, inside
from protos.v1 import common_pb2, coordinator_pb2

# Big enough that per-message overhead is small, far below any message-size limit.
CHUNK_BYTES = 1024 * 1024


# --- sending ---------------------------------------------------------------------------------

def read_chunks(path: Path, offset: int = 0) -> Iterator[bytes]:
    with open(path, "rb") as f:
        f.seek(offset)
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


def receive_from(chunks: Iterable[bytes], sha256: str, offset: int, part: Path, dest: Path,
                 what: str, hint: str, size_said: int = 0) -> int:
    """An upload's bytes from ``offset`` on, appended to ``part`` (which holds at least its first
    ``offset`` bytes from a broken try); ``part`` moves to ``dest`` once the whole file hashes to
    ``sha256``. A stream that breaks, or ends short of ``size_said`` (the sender's whole size, 0:
    not said), leaves ``part`` holding what arrived, for the next try. Returns the file's size."""
    check_sha(sha256)
    held = part.stat().st_size if part.exists() else 0
    if not 0 <= offset <= held:
        raise ProtocolError(f"{what} resumes at byte {offset}, but {held} are held",
                            hint="resume from the byte MissingBlobs names")
    with open(part, "ab") as f:
        f.truncate(offset)  # (bytes past the resume point are sent again)
    h, size = _hash_prefix(part)
    with open(part, "ab") as f:
        for data in chunks:
            f.write(data)
            h.update(data)
            size += len(data)
    if size < size_said:  # (gRPC may end a cancelled call's requests as a clean end: a cut)
        raise PeerLostError(f"{what} was cut at byte {size} of {size_said}",
                            hint="send the rest (MissingBlobs says where it resumes)")
    if h.hexdigest() != sha256:
        part.unlink()
        raise ChecksumError(f"{what} arrived corrupted: its bytes do not hash to {sha256[:12]}",
                            hint=hint)
    os.replace(part, dest)
    return size


class Cancelled(HerdError):
    """The receiver stopped a transfer on purpose (its job was cancelled); the partial file stays
    for the next try."""


def transient(e: HerdError) -> bool:
    """A failure worth another try from where the bytes end: the peer went away or stalled, or
    the stream broke without a reason of the server's own (a class-less error)."""
    return isinstance(e, PeerLostError) or type(e) is HerdError


def _hash_prefix(path: Path) -> tuple[hashlib._Hash, int]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(BLOCK_BYTES):
            h.update(block)
            size += len(block)
    return h, size


def receive_resumable(open_stream: Callable[[int], Iterable[bytes]], sha256: str, size: int,
                      part: Path, dest: Path, what: str, *,
                      on_bytes: Callable[[int], None] | None = None,
                      stop: Callable[[], bool] | None = None, patience_s: float = 60.0,
                      sleep: Callable[[float], None] = time.sleep) -> int:
    """One file of ``size`` bytes into ``dest``, through ``part``: ``open_stream(offset)`` yields
    its bytes from ``offset`` on. A transient failure (``transient``) keeps what arrived and tries
    again from there, for as long as some try made progress within ``patience_s``; the file moves
    into place only when its bytes hash to ``sha256``. Returns the bytes received now (a resumed
    transfer never receives a byte twice). ``stop()`` true: raises Cancelled, keeping the part."""
    check_sha(sha256)
    part.parent.mkdir(parents=True, exist_ok=True)
    received, tries = 0, 0
    last_progress = time.monotonic()
    while True:
        h, offset = _hash_prefix(part) if part.exists() else (hashlib.sha256(), 0)
        if offset > size:  # not a prefix of this file: start again
            part.unlink()
            continue
        before = received
        try:
            with open(part, "ab") as f:
                stream = open_stream(offset) if offset < size else ()
                for data in stream:
                    if stop is not None and stop():
                        raise Cancelled(f"{what}: transfer stopped at byte {offset}")
                    if offset + len(data) > size:
                        raise ChecksumError(f"{what} arrived longer than its {size} bytes")
                    f.write(data)
                    h.update(data)
                    offset += len(data)
                    received += len(data)
                    last_progress = time.monotonic()
                    if on_bytes is not None:
                        on_bytes(len(data))
            if offset < size:
                raise PeerLostError(f"{what}: the stream ended at byte {offset} of {size}")
        except HerdError as e:
            if isinstance(e, ChecksumError):
                part.unlink(missing_ok=True)
            if not transient(e) or time.monotonic() - last_progress > patience_s:
                raise
            tries = 1 if received > before else tries + 1
            sleep(min(0.2 * 2 ** min(tries, 5), 5.0))
            continue
        if h.hexdigest() != sha256:
            part.unlink()
            raise ChecksumError(f"{what} arrived corrupted: its bytes do not hash to "
                                f"{sha256[:12]}", hint="it is fetched again on the next try")
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(part, dest)
        return received


def write_files(chunks: Iterable[tuple[str, bytes]], files: list[FileDigest], into: Path,
                what: str, hint: str, kind: str | None = None) -> None:
    """Write the chunks of ``files`` into the existing scratch folder ``into``, checking every
    name (with the extensions ``kind`` allows), size and sha256 (a file sent as no chunk is
    empty). The caller moves the files into place once this returns."""
    expected = {check_name(f.name, kind): f for f in files}
    hashes = {name: hashlib.sha256() for name in expected}
    written = dict.fromkeys(expected, 0)
    handles = {}
    try:
        for name, data in chunks:
            if name not in expected:
                raise ChecksumError(f"unexpected file {name!r} in the {what} stream", hint=hint)
            written[name] += len(data)
            if written[name] > expected[name].bytes:  # (the declared sizes bound the disk used:
                raise ChecksumError(  # a stream past them wrote on until it ended: a review)
                    f"{what}: {name} is longer than the {expected[name].bytes} bytes declared",
                    hint=hint)
            if name not in handles:
                # "x": a fresh file in fresh scratch space, never through a planted link.
                handles[name] = open(inside(into, name), "xb")
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
                   what: str, hint: str, extra: dict[str, str] | None = None,
                   kind: str | None = "checkpoint") -> None:
    """The files, checked, as the folder ``final``: built beside it and renamed into place whole,
    replacing what was there (a retried transfer of the same thing is idempotent). ``extra``:
    small text files of the receiver's own, written into the folder too."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.part-"))
    try:
        write_files(chunks, files, tmp, what, hint, kind)
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
    check_step(header.step)
    files = [FileDigest(d.name, d.sha256, d.bytes) for d in header.files]
    write_files(((m.chunk.name, m.chunk.data) for m in messages), files, into, what, hint,
                "adapter")
    return header


def receive_checkpoint_files(messages: Iterable[coordinator_pb2.GetAdapterReply], out: Path,
                             what: str, hint: str, force: bool = True
                             ) -> common_pb2.CheckpointInfo:
    """A GetAdapter stream's files into the folder ``out``, each checked, each replaced
    atomically; other files in ``out`` are left alone (``herd pull`` into an adapter folder).
    Without ``force``, a file already in ``out`` is never replaced: nothing is written then.
    ``out`` is only created once the whole checkpoint has arrived."""
    if out.exists() and not out.is_dir():
        raise HerdError(f"{out} exists and is not a folder", hint="pass a folder to -o")
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=out if out.is_dir() else out.parent, prefix=".pull-"))
    try:
        header = receive_checkpoint(messages, scratch, what, hint)
        there = [d.name for d in header.files if os.path.lexists(out / d.name)]
        if there and not force:
            raise HerdError(f"{out} already holds {', '.join(there)}; nothing was written",
                            hint="pass --force to replace them, or pull into another folder")
        out.mkdir(exist_ok=True)
        for d in header.files:
            os.chmod(scratch / d.name, 0o644)  # an adapter is an ordinary file
            os.replace(scratch / d.name, inside(out, d.name))
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
