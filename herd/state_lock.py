"""One process per state folder: a worker agent's, or a ``herd up`` cluster's.

Two agents sharing a folder write one job folder, one metrics file and one checkpoint tree from
two ranks; a lock file refuses the second, naming the folder and the process that holds it.
The lock is ``flock`` on ``<folder>/lock``: the kernel drops it when its holder dies however it
dies, so no stale lock is ever left to clean up. Written here, not with the ``filelock`` package,
because the refused process must read who holds the lock (the pid written in the file), and
filelock truncates the file when it tries.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from herd.errors import HerdError

LOCK_FILE = "lock"


def private_folder(folder: Path) -> Path:
    """A state folder only its owner can enter (0700, made or tightened): it holds job configs,
    datasets, adapters, logs and, in a coordinator's log, the join token it printed."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        folder.chmod(0o700)
    except OSError as e:  # a disk remounted read-only: what it holds is what it was
        if e.errno != errno.EROFS:
            raise
    return folder


class FolderInUseError(HerdError):
    """Another live process holds this state folder (exit code 1)."""


class StateLock:
    """Held from ``acquire`` until ``release`` or the process's exit."""

    def __init__(self, folder: Path, fd: int):
        self.folder, self._fd = folder, fd

    @classmethod
    def acquire(cls, folder: Path, what: str) -> StateLock:
        """Claims ``folder`` for this process (``what`` says who, for whoever is refused);
        raises FolderInUseError naming the holder. The folder is made private."""
        private_folder(folder)
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid, holder = read_holder(folder)
            raise FolderInUseError(
                f"{folder} is in use by {holder or 'another process'}"
                + (f" (pid {pid})" if pid else ""),
                hint="give this one its own folder (--state-dir), or stop the other first",
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {what}\n".encode())
        return cls(folder, fd)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = -1


def read_holder(folder: Path) -> tuple[int | None, str]:
    """(pid, what) written by the lock's last holder; (None, "") when unknown."""
    try:
        pid, _, what = (folder / LOCK_FILE).read_text().strip().partition(" ")
        return int(pid), what
    except (OSError, ValueError):
        return None, ""


def held(folder: Path) -> bool:
    """Whether a live process holds ``folder``'s lock now."""
    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
