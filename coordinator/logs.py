"""LogStore: each rank's output (its rank.log), relayed by its agent while the rank runs, kept
per job and attempt so ``herd logs`` reads it from the coordinator, also after the worker is gone.

<root>/<job_id>/attempt-<a>/rank-<r>.log. A piece is written at the offset the agent read it
from, so a retried report rewrites the same bytes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from coordinator.artifacts import disk_errors, require_free
from herd.errors import NotFoundError, ProtocolError
from herd.rpc.names import is_job_id

MAX_READ = 1 << 20  # one reply's worth; a client pages with the offsets
# A rank's log is kept up to this much (a long run's output is a few MB); the rest is dropped.
MAX_LOG_BYTES = 256 * 1024 * 1024
# The agent sends pieces in order and resends a failed one: a piece starts where the log ends,
# or a little past it when one was lost (worker/agent/relay.py sends 256 KB pieces).
MAX_GAP = 4 * 1024 * 1024


class LogStore:
    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, job_id: str, attempt: int, rank: int) -> Path:
        if not is_job_id(job_id) or attempt < 1 or rank < 0:
            raise NotFoundError(f"no log for job {job_id!r} attempt {attempt} rank {rank}")
        return self.root / job_id / f"attempt-{int(attempt)}" / f"rank-{int(rank)}.log"

    def write(self, job_id: str, attempt: int, rank: int, offset: int, data: bytes) -> None:
        """A piece at ``offset``: ProtocolError for one more than MAX_GAP past the end (a hole
        of at most that, zeros where a lost piece was, never a 1 TB sparse file a reader would
        page through); beyond MAX_LOG_BYTES the rest is dropped."""
        path = self._path(job_id, attempt, rank)
        size = path.stat().st_size if path.exists() else 0
        if not 0 <= offset <= size + MAX_GAP:
            raise ProtocolError(f"rank log piece at byte {offset}: the log has {size} bytes")
        data = data[:max(0, MAX_LOG_BYTES - offset)]
        if offset < size:
            # Only a piece sent again (its reply lost) may cover stored bytes, and only with the
            # same bytes: a worker rewrote a finished job's log from byte 0 (an outside run).
            with open(path, "rb") as f:
                f.seek(offset)
                if f.read(min(len(data), size - offset)) != data[:size - offset]:
                    raise ProtocolError(f"rank log piece at byte {offset} rewrites what is "
                                        f"stored ({size} bytes): a log only grows")
            data, offset = data[size - offset:], size
        if not data:
            return
        # Logs never take the room kept for the job database and checkpoints: a StorageError
        # makes the agent keep the piece and send it again later (rank logs had filled a
        # coordinator's last megabytes, and a submit then failed on the links it writes: CI).
        require_free(self.root, len(data), f"rank {rank}'s log")
        path.parent.mkdir(parents=True, exist_ok=True)
        with disk_errors(self.root, f"rank {rank}'s log"), \
                open(path, "r+b" if path.exists() else "wb") as f:
            # A piece past the end (an earlier one lost) leaves a hole of zero bytes, not a shift.
            f.seek(offset)
            f.write(data)

    def read(self, job_id: str, attempt: int, rank: int, offset: int,
             max_bytes: int = 0) -> bytes:
        path = self._path(job_id, attempt, rank)
        if not path.exists():
            return b""
        with open(path, "rb") as f:
            f.seek(max(0, offset))
            return f.read(min(max_bytes or MAX_READ, MAX_READ))

    def remove(self, job_id: str) -> None:
        if is_job_id(job_id):
            shutil.rmtree(self.root / job_id, ignore_errors=True)
