"""A rank dies with its agent.

A rank the agent started must not outlive it: a killed agent's rank would train on beside the
attempt that replaces it (and upload to nobody). Two mechanisms, each enough on its own:

- **Linux**: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``: the kernel kills this process when the thread
  that started it exits (the agent starts ranks from one long-lived thread,
  worker/agent/rank_process.py). It survives the OpenBLAS re-exec. If the agent died before the
  call, the parent is no longer the agent: exit at once.
- **Everywhere (the macOS path)**: the agent passes the read end of a pipe whose write end only it
  holds; when the agent process ends, for any reason, the kernel closes that end and a read here
  returns EOF. A daemon thread waits for it and kills this process. (A process stopped with
  SIGSTOP reads nothing until continued; Linux's signal needs no reading.)

Plain POSIX and ctypes: no MLX, no third-party package.
"""

from __future__ import annotations

import os
import signal
import threading

from herd.parent_death import die_with_parent

AGENT_PID_ENV = "HERD_AGENT_PID"
LIFELINE_FD_ENV = "HERD_LIFELINE_FD"


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def watch_pipe(fd: int) -> threading.Thread:
    """Kill this process when ``fd`` (a pipe's read end, written by no one) reaches EOF."""

    def wait() -> None:
        try:
            while os.read(fd, 1):
                pass
        except OSError:
            pass
        _die()

    t = threading.Thread(target=wait, daemon=True, name="lifeline")
    t.start()
    return t


def tie_to_agent(pdeathsig: bool = True) -> list[str]:
    """Ties this process's life to the agent that started it (from its environment); nothing
    when no agent did (``herd train`` by hand). Returns the mechanisms set, for the log."""
    agent = os.environ.get(AGENT_PID_ENV)
    fd = os.environ.get(LIFELINE_FD_ENV)
    ties = []
    if agent and pdeathsig and die_with_parent():
        ties.append("pdeathsig")
        if os.getppid() != int(agent):  # the agent died before the signal was armed
            _die()
    if fd:
        watch_pipe(int(fd))
        ties.append("pipe")
    return ties
