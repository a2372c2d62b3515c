"""Ranks an earlier agent left running: found by the pid files in its state folder, stopped.

A rank dies with its agent (worker/rank/lifeline.py), but not every way: a rank stopped with
SIGSTOP cannot read its lifeline, and a rank started by an older agent has none. Each rank's pid
is kept in its attempt folder while it runs (``rank.pid``); an agent starting on the same state
folder stops every process still named there before it serves.

A pid may have been reused by an unrelated process since, so a process is only stopped when it is
still what the agent started: the leader of its own session (ranks start in a new one) whose
command line is ``-m worker.rank`` with a config inside that very folder. Read from /proc on Linux
and from ``ps`` on macOS (written by hand: two facts about a process do not justify a new
dependency such as psutil).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from herd import log

logger = log.get(__name__)
PID_FILE = "rank.pid"  # worker/agent/rank_process.py writes it


def _cmdline(pid: int) -> str:
    if sys.platform.startswith("linux"):
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            return ""
    try:  # macOS (and other BSDs)
        return subprocess.run(["ps", "-o", "command=", "-p", str(pid)], capture_output=True,
                              text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def is_our_rank(pid: int, folder: Path) -> bool:
    """The process is a rank this agent's state folder started (not a reused pid)."""
    try:
        if os.getsid(pid) != pid:
            return False
    except (ProcessLookupError, PermissionError):
        return False
    cmd = _cmdline(pid)
    return "-m worker.rank" in cmd and str(folder) in cmd


def _alive(pid: int) -> bool:
    """Still running (a zombie waiting for its new parent to reap it is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def stop_orphans(state_dir: Path, grace_s: float = 3.0) -> list[int]:
    """Stops every rank the state folder's pid files name that still runs; returns their pids."""
    stopped = []
    for pid_file in sorted((state_dir / "jobs").glob(f"*/attempt-*/{PID_FILE}")):
        try:
            pid = int(pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pid_file.unlink(missing_ok=True)
            continue
        if is_our_rank(pid, pid_file.parent):
            logger.warning("orphan_rank_stopped", pid=pid, folder=str(pid_file.parent))
            for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(pid, sig)
                except ProcessLookupError:
                    break
                deadline = time.monotonic() + wait
                while _alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.05)
                if not _alive(pid):
                    break
            stopped.append(pid)
        pid_file.unlink(missing_ok=True)
    return stopped
