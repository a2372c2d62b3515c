"""The agent's state folder: which one, who it is, and how much of the past it keeps.

Several agents on one machine each get their own folder and id by default: the first free one of
$HERD_HOME/worker, worker-2, worker-3, ... (a lock file says which are taken), and an id made
once per folder (hostname + random suffix) and kept there, so an agent restarted on its folder is
the same worker to the coordinator and two folders are never the same worker.
"""

from __future__ import annotations

import shutil
import socket
import uuid
from pathlib import Path

from herd.state_lock import FolderInUseError, StateLock

WHO = "a herd worker"
ID_FILE = "worker-id"
PORT_FILE = "port"
MAX_SLOTS = 64


def claim(explicit: Path | None, home: Path) -> StateLock:
    """The agent's folder, locked for this process. An explicit one in use is refused (naming
    it); otherwise the first free default slot."""
    if explicit is not None:
        return StateLock.acquire(explicit, WHO)
    for i in range(1, MAX_SLOTS + 1):
        try:
            return StateLock.acquire(home / ("worker" if i == 1 else f"worker-{i}"), WHO)
        except FolderInUseError:
            continue
    raise FolderInUseError(f"all {MAX_SLOTS} worker folders under {home} are in use",
                           hint="give this agent its own folder with --state-dir")


def worker_id(folder: Path, explicit: str | None) -> str:
    """``explicit``, else the id kept in ``folder`` (made on first use)."""
    if explicit:
        return explicit
    path = folder / ID_FILE
    if path.is_file() and (kept := path.read_text().strip()):
        return kept
    made = f"{socket.gethostname().split('.')[0]}-{uuid.uuid4().hex[:6]}"
    path.write_text(made + "\n")
    return made


def kept_port(folder: Path) -> int:
    """The WorkerService port this agent served on last time (0: none kept), so that a
    coordinator given ``--worker HOST:PORT`` (no zeroconf) finds a restarted agent again."""
    try:
        return int((folder / PORT_FILE).read_text().strip())
    except (OSError, ValueError):
        return 0


def keep_port(folder: Path, port: int) -> None:
    (folder / PORT_FILE).write_text(f"{port}\n")


def prune_attempts(folder: Path, keep: int) -> list[Path]:
    """Retention: deletes all but the ``keep`` newest attempt folders (jobs/<job>/attempt-N:
    the rank's data links, checkpoints already uploaded, its log already relayed), then job
    folders left empty and cached dataset blobs no attempt links any more. 0 keeps everything.
    Returns what it deleted."""
    if keep <= 0:
        return []
    attempts = sorted((p for p in (folder / "jobs").glob("*/attempt-*") if p.is_dir()),
                      key=lambda p: p.stat().st_mtime, reverse=True)
    gone = attempts[keep:]
    for path in gone:
        shutil.rmtree(path, ignore_errors=True)
        if not any(path.parent.iterdir()):
            path.parent.rmdir()
    if gone:
        for blob in (folder / "blobs").glob("*"):
            if blob.is_file() and blob.stat().st_nlink == 1:  # no job folder links it
                blob.unlink(missing_ok=True)
    return gone
