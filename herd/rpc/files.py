"""Receiving a checkpoint from the coordinator (the GetAdapter stream: a header, then file chunks)
into a folder, every file sha256-checked. Used by `herd pull` and by a pipeline stage resuming
from its own piece."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

from herd.rpc.status import ChecksumError
from protos.v1 import common_pb2, coordinator_pb2


def receive_files(messages: Iterable[coordinator_pb2.GetAdapterReply], into: Path, what: str,
                  hint: str) -> common_pb2.CheckpointInfo:
    """Write the stream's files into the existing folder ``into`` and return the header.

    Raises ChecksumError (with ``hint``) for a stream without a header, a file the header does
    not list, or a file whose bytes do not hash to the header's sha256 (a file sent as no chunk
    is empty). ``into`` is a scratch folder: the caller moves the files into place once this
    returns, so a failure leaves nothing half-written where it matters.
    """
    header, hashes, handles = None, {}, {}
    try:
        for msg in messages:
            if msg.WhichOneof("part") == "header":
                header = msg.header
                continue
            name = msg.chunk.name
            if header is None or name not in {f.name for f in header.files}:
                raise ChecksumError(f"unexpected file {name!r} in the {what} stream", hint=hint)
            if name not in handles:
                handles[name] = open(into / name, "wb")
                hashes[name] = hashlib.sha256()
            handles[name].write(msg.chunk.data)
            hashes[name].update(msg.chunk.data)
    finally:
        for f in handles.values():
            f.close()
    if header is None:
        raise ChecksumError(f"the coordinator sent no {what} header", hint=hint)
    for d in header.files:
        if d.name not in handles:
            (into / d.name).write_bytes(b"")
        if hashes.get(d.name, hashlib.sha256()).hexdigest() != d.sha256:
            raise ChecksumError(f"{what}: {d.name} arrived missing or corrupted", hint=hint)
    return header
