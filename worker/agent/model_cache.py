"""The worker's model cache: model files by sha256, bounded, least recently used first out.

<root>/blobs/<sha256> holds whole, checked files; <root>/partial/<sha256> the bytes of a transfer
that broke, which the next try resumes. A job's model folder is a folder of symlinks into
blobs/ (a pipeline stage's holds only its shards), so a model two jobs share, or a file two
models share, is on disk once. A file's last use is its mtime, set each time a job uses it.
Files pinned by a job that runs (or is being prepared) are never evicted.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from herd import log
from herd.digest import FileDigest, human_bytes, sha256_file
from herd.errors import PlacementError
from herd.rpc.names import check_path, check_sha, inside

logger = log.get(__name__)
# Checking cached files rehashes them (sha256 releases the GIL): a few at a time.
CHECK_THREADS = 4


class ModelCache:
    def __init__(self, root: Path, worker_id: str, max_bytes: int = 0):
        self.root, self.worker_id, self.max_bytes = root, worker_id, max_bytes
        self.blobs, self.partial = root / "blobs", root / "partial"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.partial.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._pins: dict[tuple, frozenset[str]] = {}

    def blob(self, sha: str) -> Path:
        return self.blobs / check_sha(sha)

    def part(self, sha: str) -> Path:
        return self.partial / check_sha(sha)

    def part_bytes(self, sha: str) -> int:
        part = self.part(sha)
        return part.stat().st_size if part.exists() else 0

    # --- what is held ----------------------------------------------------------------------

    def check(self, files: list[FileDigest]) -> tuple[list[FileDigest], list[FileDigest]]:
        """(held and intact, to fetch). A held file whose bytes no longer hash to its sha256 (a
        bad disk, a hand edit) is removed, so it is fetched again."""
        def intact(f: FileDigest) -> bool:
            path = self.blob(f.sha256)
            if not path.exists():
                return False
            if path.stat().st_size == f.bytes and sha256_file(path) == f.sha256:
                return True
            logger.warning("cached_file_corrupt", file=f.name, sha256=f.sha256[:12])
            path.unlink(missing_ok=True)
            return False

        with ThreadPoolExecutor(CHECK_THREADS) as pool:
            ok = list(pool.map(intact, files))
        return ([f for f, good in zip(files, ok) if good],
                [f for f, good in zip(files, ok) if not good])

    def touch(self, shas: set[str]) -> None:
        for sha in shas:
            try:
                os.utime(self.blob(sha))
            except FileNotFoundError:
                pass

    def used_bytes(self) -> int:
        return sum(p.stat().st_size for d in (self.blobs, self.partial) for p in d.iterdir())

    # --- pins ------------------------------------------------------------------------------

    def pin(self, key: tuple, shas: set[str]) -> None:
        with self._lock:
            self._pins[key] = frozenset(shas)

    def unpin(self, key: tuple) -> None:
        with self._lock:
            self._pins.pop(key, None)

    def unpin_job(self, job_id: str, attempt: int = 0) -> None:
        """The job's pins (of ``attempt`` and older ones; 0: all)."""
        with self._lock:
            self._pins = {k: v for k, v in self._pins.items()
                          if k[0] != job_id or (attempt and k[1] > attempt)}

    def pinned(self) -> set[str]:
        with self._lock:
            return set().union(*self._pins.values())

    # --- whole models held (coordinator/placement.py prefers a worker that holds the job's) --

    def note_whole(self, digest: str, shas: set[str]) -> None:
        """A stored model, ``digest``, is here whole: every one of its files (``shas``)."""
        with self._lock:
            held = {d: s for d, s in self._held().items() if self._all_here(s)}
            held[digest] = sorted(shas)
            tmp = self.root / ".held.json.tmp"
            tmp.write_text(json.dumps(held))
            os.replace(tmp, self.root / "held.json")

    def whole_models(self) -> list[str]:
        """The stored models whose every file is still here (none evicted or found corrupt)."""
        return sorted(d for d, shas in self._held().items() if self._all_here(shas))

    def _held(self) -> dict[str, list[str]]:
        try:
            held = json.loads((self.root / "held.json").read_text())
        except (OSError, ValueError):
            return {}
        return held if isinstance(held, dict) else {}

    def _all_here(self, shas) -> bool:
        return isinstance(shas, list) and all(
            isinstance(s, str) and len(s) == 64 and (self.blobs / s).exists() for s in shas)

    # --- room ------------------------------------------------------------------------------

    def reserve(self, need: int, keep: set[str]) -> None:
        """Makes room for ``need`` more bytes: evicts the least recently used files that no
        pinned job and not ``keep`` needs, or, when even that is not enough, refuses with the
        figures (PlacementError) before evicting anything."""
        free = shutil.disk_usage(self.root).free
        held = [(p.stat().st_mtime, p.name, p.stat().st_size) for p in self.blobs.iterdir()
                if not p.name.startswith(".")]
        protected = self.pinned() | keep
        evictable = sorted(h for h in held if h[1] not in protected)
        short = need - free
        over_bound = self.max_bytes and self.used_bytes() + need - self.max_bytes > short
        if over_bound:
            short = self.used_bytes() + need - self.max_bytes
        can_free = sum(size for _, _, size in evictable)
        if short > can_free:
            bound = f", a cache bounded to {self.max_bytes:,} bytes" if self.max_bytes else ""
            raise PlacementError(
                f"worker {self.worker_id} cannot hold the model: its files need {need:,} bytes "
                f"({human_bytes(need)}) more on {self.root}; the disk has {free:,} bytes "
                f"({human_bytes(free)}) free{bound}, and {can_free:,} bytes of other models could "
                "be evicted",
                # (the bound, not the disk, stops it: its hint said to free disk space)
                hint="start that worker with a larger --model-cache-max (now "
                f"{human_bytes(self.max_bytes)})" if over_bound else
                "free disk space on that worker, or start it with a --model-cache on a larger disk")
        freed = 0
        for _, sha, size in evictable:
            if freed >= short:
                break
            (self.blobs / sha).unlink(missing_ok=True)
            freed += size
            logger.info("cached_file_evicted", sha256=sha[:12], bytes=size)

    # --- a job's folder --------------------------------------------------------------------

    def view(self, folder: Path, files: list[FileDigest]) -> Path:
        """``folder`` as the model's files by name: symlinks into the cache (rebuilt whole)."""
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        for f in files:
            link = inside(folder, *check_path(f.name, "model").split("/"))
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(self.blob(f.sha256))
        return folder
