"""BlobStore (content-addressed dataset files) and AdapterStore (checkpoints per job and step).

Both receive chunked streams, so no message ever nears a size limit, check every sha256 and move
a complete result into place with one rename: a broken upload leaves nothing behind. A pipeline
job's stages upload one piece each per step; the step's adapter is their merge (herd.adapter_merge),
written once the last piece arrives.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Iterable, Iterator

from coordinator.domain import Checkpoint, FileDigest
from herd.adapter_merge import ADAPTER_CONFIG, ADAPTERS, AdapterPiece, merge_pieces
from herd.digest import file_digest
from herd.errors import DatasetError, HerdError, NotFoundError
from herd.rpc.files import (
    check_sha,
    read_chunks,
    receive_file,
    receive_folder,
    send_files,
)
from herd.stage_cut import StagePiece

_JOB = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Leading dots: never names a peer may upload (herd.rpc.files.check_name).
PIECE_META = ".piece.json"  # a stage piece's stage, blocks and files
MERGED_FROM = ".merged-from"  # in a merged step: which pieces it was made of


class BlobStore:
    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def has(self, sha: str) -> bool:
        return (self.root / check_sha(sha)).exists()

    def put(self, sha: str, chunks: Iterable[bytes]) -> int:
        """Stores a blob; the same bytes again replace it with themselves (idempotent)."""
        return receive_file(chunks, check_sha(sha), self.root / sha, f"upload {sha[:12]}",
                            hint="retry the upload")

    def read(self, sha: str) -> Iterator[bytes]:
        path = self.root / check_sha(sha)
        if not path.exists():
            raise NotFoundError(f"no blob {sha[:12]}", hint="upload it with PutBlob first")
        return read_chunks(path)


class AdapterStore:
    """<root>/<job_id>/<step:07d>/{files}; a step folder exists only when complete.
    Pipeline pieces: <root>/<job_id>/stages/<step:07d>/stage-NN/{files, .piece.json}."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._merging = threading.Lock()  # two stages' last pieces may arrive together

    def _job_dir(self, job_id: str) -> Path:
        if not _JOB.match(job_id):
            raise NotFoundError(f"bad job id {job_id!r}")
        return self.root / job_id

    def step_dir(self, job_id: str, step: int) -> Path:
        return self._job_dir(job_id) / f"{int(step):07d}"

    def receive(self, job_id: str, step: int, files: list[FileDigest],
                chunks: Iterable[tuple[str, bytes]], now_ms: int) -> Checkpoint:
        """Writes the files of one checkpoint from (name, data) chunks, in header order."""
        self._write(self.step_dir(job_id, step), step, files, chunks)
        return Checkpoint(job_id=job_id, step=step, files=files, created_ms=now_ms)

    def _piece_dir(self, job_id: str, step: int, index: int) -> Path:
        return self._job_dir(job_id) / "stages" / f"{int(step):07d}" / f"stage-{int(index):02d}"

    def receive_piece(self, job_id: str, step: int, piece: StagePiece, files: list[FileDigest],
                      chunks: Iterable[tuple[str, bytes]], now_ms: int) -> Checkpoint | None:
        """Stores one pipeline stage's checkpoint of ``step``; when it completes the step's set,
        merges the pieces into the step's adapter and returns that checkpoint (else None)."""
        if not (0 <= piece.index < piece.count and 0 <= piece.start < piece.end):
            raise DatasetError(f"stage piece {piece} is not a stage of a pipeline")
        meta = {"index": piece.index, "count": piece.count, "start": piece.start,
                "end": piece.end, "files": [dataclasses.asdict(f) for f in files]}
        self._write(self._piece_dir(job_id, step, piece.index), step, files, chunks,
                    extra={PIECE_META: json.dumps(meta)})
        with self._merging:
            pieces = self._pieces(job_id, step)
            # A piece of another layout (an earlier attempt cut differently) is stale.
            for p, folder in list(pieces.items()):
                if p.count != piece.count:
                    shutil.rmtree(folder)
                    del pieces[p]
            if sorted(p.index for p in pieces) != list(range(piece.count)):
                return None
            return self._merge(job_id, step, pieces, now_ms)

    def _pieces(self, job_id: str, step: int) -> dict[StagePiece, Path]:
        root = self._job_dir(job_id) / "stages" / f"{int(step):07d}"
        out = {}
        for meta in sorted(root.glob(f"stage-*/{PIECE_META}")):
            m = json.loads(meta.read_text())
            out[StagePiece(m["index"], m["count"], m["start"], m["end"])] = meta.parent
        return out

    def _merge(self, job_id: str, step: int, pieces: dict[StagePiece, Path],
               now_ms: int) -> Checkpoint | None:
        """The step's adapter from its pieces; None when it was already made from these very
        pieces (two stages' uploads finishing together, or a retried upload)."""
        ordered = sorted(pieces, key=lambda p: p.index)
        if any(a.end != b.start for a, b in zip(ordered, ordered[1:])) or ordered[0].start != 0:
            raise HerdError(f"checkpoint {step} of {job_id}: stage pieces "
                            f"{[(p.start, p.end) for p in ordered]} do not cut one model")
        made_of = json.dumps([(pieces[p] / PIECE_META).read_text() for p in ordered])
        final = self.step_dir(job_id, step)
        if (final / MERGED_FROM).exists() and (final / MERGED_FROM).read_text() == made_of:
            return None
        job_dir = self._job_dir(job_id)
        tmp = Path(tempfile.mkdtemp(dir=job_dir, prefix=f".merge-{step}-"))
        try:
            merge_pieces([AdapterPiece(pieces[p], p.index, p.count, layer_offset=p.start)
                          for p in ordered], tmp)
            files = [file_digest(tmp / ADAPTERS), file_digest(tmp / ADAPTER_CONFIG)]
            (tmp / MERGED_FROM).write_text(made_of)
            if final.exists():  # the same step again (a resumed attempt): replace it whole
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        return Checkpoint(job_id=job_id, step=step, files=files, created_ms=now_ms)

    def piece(self, job_id: str, step: int, index: int) -> tuple[StagePiece, Checkpoint]:
        """Stage ``index``'s own piece of ``step`` (what that stage resumes from)."""
        folder = self._piece_dir(job_id, step, index)
        if not (folder / PIECE_META).exists():
            raise NotFoundError(f"job {job_id} has no stage {index} piece of checkpoint {step}")
        m = json.loads((folder / PIECE_META).read_text())
        files = [FileDigest(**f) for f in m["files"]]
        return (StagePiece(m["index"], m["count"], m["start"], m["end"]),
                Checkpoint(job_id=job_id, step=step, files=files))

    def piece_files(self, job_id: str, step: int, index: int) -> Iterator[tuple[str, bytes]]:
        _, c = self.piece(job_id, step, index)
        return send_files(self._piece_dir(job_id, step, index), c.files)

    def _write(self, final: Path, step: int, files: list[FileDigest],
               chunks: Iterable[tuple[str, bytes]], extra: dict[str, str] | None = None) -> None:
        if not files:
            raise DatasetError("a checkpoint needs at least one file")
        # Idempotent: the same step uploaded again replaces the old copy whole.
        receive_folder(chunks, files, final, f"checkpoint {step}",
                       hint="the worker retries the upload", extra=extra)

    def files(self, checkpoint: Checkpoint) -> Iterator[tuple[str, bytes]]:
        folder = self.step_dir(checkpoint.job_id, checkpoint.step)
        if not folder.exists():
            raise NotFoundError(
                f"checkpoint {checkpoint.step} of {checkpoint.job_id} is missing on disk")
        return send_files(folder, checkpoint.files)
