"""BlobStore (content-addressed files: datasets and the model store's files) and AdapterStore
(checkpoints per job and step).

Both receive chunked streams, so no message ever nears a size limit, check every sha256 and move
a complete result into place with one rename. A broken checkpoint upload leaves nothing behind; a
broken blob upload keeps what arrived (``.<sha>.part-upload``), and the uploader resumes there.
A pipeline job's stages upload one piece each per step; the step's adapter is their merge
(herd.adapter_merge), written once the last piece arrives.

A full or failing disk is a StorageError naming the folder and its free space (checked before a
checkpoint is received, and on any write that fails); a stored checkpoint can be verified at rest
(``verify``) before a job resumes from it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Iterable, Iterator

from coordinator.domain import Checkpoint, FileDigest
from herd.adapter_merge import ADAPTER_CONFIG, ADAPTERS, AdapterPiece, merge_pieces
from herd.digest import file_digest, sha256_file
from herd.errors import (
    DISK_ERRNOS,
    DatasetError,
    HerdError,
    NotFoundError,
    PeerLostError,
    StorageError,
)
from herd.rpc.files import (
    check_sha,
    read_chunks,
    receive_file,
    receive_folder,
    receive_from,
    send_files,
)
from herd.rpc.names import check_step, is_job_id
from herd.stage_cut import StagePiece

# Leading dots: never names a peer may upload (herd.rpc.files.check_name).
PIECE_META = ".piece.json"  # a stage piece's stage, blocks and files
MERGED_FROM = ".merged-from"  # in a merged step: which pieces it was made of
MAX_STAGES = 1024
# Kept free beyond what a write needs: the job database and its events live on the same disk.
RESERVE_BYTES = 4 * 1024 * 1024


def _free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def require_free(folder: Path, need: int, what: str, hint: str = "") -> None:
    """StorageError, with the numbers, when the disk holding ``folder`` cannot take ``need``
    bytes (and the reserve)."""
    free = _free_bytes(folder)
    if free < need + RESERVE_BYTES:
        keep = f"{RESERVE_BYTES / 1e6:.1f} MB"
        needs = (f"{need / 1e6:.1f} MB and {keep} are kept free" if need
                 else f"the {keep} kept free")
        raise StorageError(
            f"the coordinator's disk holding {folder} is full: {what} needs {needs}; "
            f"{free / 1e6:.1f} MB free",
            hint=(hint or "free space there") + ", or restart the coordinator with a "
            "--state-dir on a larger disk")


@contextlib.contextmanager
def disk_errors(folder: Path, what: str) -> Iterator[None]:
    """A write that fails for want of space (or a failing disk) as a StorageError naming it."""
    try:
        yield
    except OSError as e:
        if e.errno not in DISK_ERRNOS:
            raise
        raise StorageError(
            f"the coordinator's disk holding {folder} failed writing {what}: {e.strerror} "
            f"({_free_bytes(folder) / 1e6:.1f} MB free)",
            hint="free space there or restart the coordinator with a --state-dir on a larger "
            "disk") from None


PARTIAL_SUFFIX = ".part-upload"  # what arrived of a broken blob upload, kept for the next try


class BlobStore:
    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._uploading: set[str] = set()  # blobs whose partial file one upload is writing
        self._guard = threading.Lock()

    def has(self, sha: str) -> bool:
        return (self.root / check_sha(sha)).exists()

    def touch(self, sha: str) -> bool:
        """``has``, and the blob's time set to now (coordinator/housekeeping.py sweeps old
        unused ones)."""
        try:
            os.utime(self.root / check_sha(sha))
            return True
        except FileNotFoundError:
            return False

    def path(self, sha: str) -> Path:
        return self.root / check_sha(sha)

    def held(self, sha: str) -> int:
        """The bytes kept of a broken upload of the blob: where the next one may resume."""
        try:
            return (self.root / f".{check_sha(sha)}{PARTIAL_SUFFIX}").stat().st_size
        except FileNotFoundError:
            return 0

    def put(self, sha: str, chunks: Iterable[bytes], offset: int = 0, size_said: int = 0) -> int:
        """Stores a blob from ``chunks``, its bytes from ``offset`` on (a resumed upload: at most
        ``held``); the same bytes again replace it with themselves (idempotent). A second upload of
        a blob while one is in flight writes a file of its own, from byte 0 only."""
        what = f"upload {check_sha(sha)[:12]}"
        with self._guard:
            mine = sha not in self._uploading
            self._uploading.add(sha)
        try:
            with disk_errors(self.root, f"dataset or model file {sha[:12]}"):
                if mine:
                    return receive_from(chunks, sha, offset, self.root / f".{sha}{PARTIAL_SUFFIX}",
                                        self.root / sha, what, "retry the upload", size_said)
                if offset:
                    raise PeerLostError(f"another {what} is in flight here",
                                        hint="try again once it ends")
                return receive_file(chunks, sha, self.root / sha, what, hint="retry the upload")
        finally:
            if mine:
                with self._guard:
                    self._uploading.discard(sha)

    def import_file(self, path: Path, sha: str, link: bool) -> None:
        """Stores the file at ``path`` (already hashed to ``sha``): a hard link when ``link`` (an
        immutable file such as a hub cache blob, on the same disk), else a checked copy."""
        if self.has(sha):
            return
        if link:
            tmp = self.root / f".{sha}.link"
            tmp.unlink(missing_ok=True)
            try:
                os.link(path.resolve(), tmp)
                os.replace(tmp, self.root / sha)
                return
            except OSError:
                tmp.unlink(missing_ok=True)  # another disk: copy instead
        self.put(sha, read_chunks(path))

    def remove(self, sha: str) -> int:
        path = self.root / check_sha(sha)
        size = path.stat().st_size if path.exists() else 0
        path.unlink(missing_ok=True)
        return size

    def read(self, sha: str, offset: int = 0) -> Iterator[bytes]:
        path = self.root / check_sha(sha)
        if not path.exists():
            raise NotFoundError(f"no blob {sha[:12]}", hint="upload it with PutBlob first")
        if not 0 <= offset <= path.stat().st_size:
            raise DatasetError(f"blob {sha[:12]} has no byte {offset}")
        return read_chunks(path, offset)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class AdapterStore:
    """<root>/<job_id>/<step:07d>/{files}; a step folder exists only when complete.
    Pipeline pieces: <root>/<job_id>/stages/<step:07d>/stage-NN/{files, .piece.json}."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._merging = threading.Lock()  # two stages' last pieces may arrive together
        # A delivery cut by a coordinator crash leaves its temporary folder (herd/rpc/files.py
        # ".<step>.part-*"), which nothing else removes: gone at start, when none is in flight.
        for part in [*root.glob("*/.*.part-*"), *root.glob("*/stages/*/.*.part-*")]:
            shutil.rmtree(part, ignore_errors=True)

    def _job_dir(self, job_id: str) -> Path:
        if not is_job_id(job_id):
            raise NotFoundError(f"bad job id {job_id!r}")
        return self.root / job_id

    def step_dir(self, job_id: str, step: int) -> Path:
        return self._job_dir(job_id) / f"{check_step(int(step)):07d}"

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
        if not (0 <= piece.index < piece.count <= MAX_STAGES and 0 <= piece.start < piece.end):
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
            with disk_errors(self.root, f"the merged checkpoint {step}"):
                return self._merge(job_id, step, pieces, now_ms)

    def stages_of(self, job_id: str, step: int) -> int:
        """How many pipeline stages wrote this stored step (0: not a pipeline's)."""
        return max((p.count for p in self._pieces(job_id, step)), default=0)

    def cut_of(self, job_id: str, step: int) -> tuple[tuple[int, int], ...]:
        """Each pipeline stage's blocks [start, end) in this stored step, in stage order; ()
        when data parallel wrote it (the layout a restart keeps: recovery.kept_cut)."""
        return tuple((p.start, p.end) for p in sorted(self._pieces(job_id, step),
                                                      key=lambda p: p.index))

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
        require_free(self.root, sum(f.bytes for f in files), f"checkpoint {step}")
        # Idempotent: the same step uploaded again replaces the old copy whole.
        with disk_errors(self.root, f"checkpoint {step}"):
            receive_folder(chunks, files, final, f"checkpoint {step}",
                           hint="the worker retries the upload", extra=extra)

    def verify(self, checkpoint: Checkpoint) -> str | None:
        """What is wrong with a stored checkpoint at rest (a file missing, or not its recorded
        size and sha256), its pipeline pieces included; None when it is intact."""
        folders = [(self.step_dir(checkpoint.job_id, checkpoint.step), checkpoint.files)]
        stages = self._job_dir(checkpoint.job_id) / "stages" / f"{int(checkpoint.step):07d}"
        for meta in sorted(stages.glob(f"stage-*/{PIECE_META}")):
            try:
                files = [FileDigest(**f) for f in json.loads(meta.read_text())["files"]]
            except (OSError, ValueError, KeyError, TypeError):
                return f"{meta.parent.name}'s {PIECE_META} is unreadable"
            folders.append((meta.parent, files))
        for folder, files in folders:
            for f in files:
                path = folder / f.name
                if not path.is_file():
                    return f"{path.name} is missing"
                if path.stat().st_size != f.bytes or sha256_file(path) != f.sha256:
                    return f"{path.name} does not match its sha256"
        return None

    def copy_step(self, checkpoint: Checkpoint, to_job: str) -> None:
        """``checkpoint`` (its adapter and pipeline pieces) stored again as ``to_job``'s, same
        step: hard links where the filesystem allows (stored files are never written in place)."""
        src = self._job_dir(checkpoint.job_id)
        step = f"{int(checkpoint.step):07d}"
        with disk_errors(self.root, f"checkpoint {checkpoint.step}"):
            for part in (Path(step), Path("stages") / step):
                if (src / part).is_dir():
                    shutil.copytree(src / part, self._job_dir(to_job) / part,
                                    copy_function=_link_or_copy, dirs_exist_ok=True)

    def remove_step(self, job_id: str, step: int) -> None:
        """Deletes one stored step (retention): its adapter and its pipeline pieces."""
        shutil.rmtree(self.step_dir(job_id, step), ignore_errors=True)
        shutil.rmtree(self._job_dir(job_id) / "stages" / f"{int(step):07d}", ignore_errors=True)

    def remove_job(self, job_id: str) -> None:
        shutil.rmtree(self._job_dir(job_id), ignore_errors=True)

    def files(self, checkpoint: Checkpoint) -> Iterator[tuple[str, bytes]]:
        folder = self.step_dir(checkpoint.job_id, checkpoint.step)
        if not folder.exists():
            raise NotFoundError(
                f"checkpoint {checkpoint.step} of {checkpoint.job_id} is missing on disk")
        return send_files(folder, checkpoint.files)
