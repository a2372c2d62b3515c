"""Every collective bounded: a rank's heartbeat (worker/rank/heartbeat.py), its agent's watchdog
(worker/agent/watchdog.py), and the lifeline that kills a rank when its agent dies
(worker/rank/lifeline.py) or, after a crash, when its agent restarts (worker/agent/orphans.py).
Pure functions with a fake clock, and real processes for the lifeline (no MLX: fast)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from worker.agent import watchdog
from worker.agent.orphans import stop_orphans
from worker.rank import heartbeat
from worker.rank.heartbeat import Beat, Heartbeat, WatchedExchange


class Clock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_the_heartbeat_measures_steps_and_says_where_the_rank_is(tmp_path, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(heartbeat.time, "monotonic", clock)
    path = tmp_path / "hb"
    hb = Heartbeat(path)
    hb.enter("group")
    assert heartbeat.read(path) == Beat(1, True, "group", 1, 100.0, 0.0)
    clock.t = 102.0
    hb.leave("group")
    clock.t = 110.0
    hb.leave("ready")  # the load took 8 s: the first step time it knows
    assert heartbeat.read(path) == Beat(3, False, "ready", 1, 110.0, 8.0)

    class Sum:
        name, rank, size = "mlx", 0, 2

        def all_sum(self, flat, donate=False):
            seen.append(heartbeat.read(path))
            clock.t += 0.5
            return flat

        def close(self):
            pass

    seen = []
    ex = WatchedExchange(Sum(), hb)
    for _ in range(40):  # the load falls out of the window of recent steps
        clock.t += 1.0
        assert ex.all_sum(7) == 7
    assert seen[0] == Beat(4, True, "all_sum", 2, 111.0, 8.0)  # inside, since it entered
    last = heartbeat.read(path)
    assert (last.inside, last.what, last.count, last.step_s) == (False, "all_sum", 41, 1.5)
    hb.close()
    assert heartbeat.parse(b"") is None and heartbeat.parse(b"3 1 all_") is None  # torn


def test_a_rank_inside_a_collective_past_its_bound_is_stalled():
    inside = Beat(seq=9, inside=True, what="all_sum", count=726, since=1000.0, step_s=0.8)
    # bound = 2 x 0.8 s + 20 s - 1 s (kept for noticing and reporting it: the job's state then
    # changes within 2 x step + exchange_timeout_s)
    assert watchdog.bound_s(inside, 20.0) == pytest.approx(20.6)
    assert watchdog.stalled(inside, 1020.5, 20.0) is None
    reason = watchdog.stalled(inside, 1021.0, 20.0)
    assert reason == ("stalled: all_sum #726 got no further in 21s (bound 21s = 2 x 0.8s step + "
                      "20s exchange_timeout_s - 1s to report it): a peer is stopped or unreachable")
    # A short exchange_timeout_s keeps at least half of it
    assert watchdog.bound_s(Beat(9, True, "all_sum", 1, 0.0, 0.0), 1.0) == pytest.approx(0.5)
    # Outside a collective nothing is bounded: computing ends; a rank stopped while computing
    # leaves its peers inside the next collective, where their watchdogs see it.
    outside = Beat(10, False, "all_sum", 726, 1000.0, 0.8)
    assert watchdog.stalled(outside, 1e9, 20.0) is None
    assert watchdog.stalled(None, 1e9, 20.0) is None  # no beat yet: not watched
    # Forming the group: MLX's ring dials for ~31 s, and the accepting side waits forever.
    group = Beat(1, True, "group", 1, 1000.0, 0.0)
    assert watchdog.stalled(group, 1000.0 + 19 + watchdog.GROUP_FLOOR_S - 0.5, 20.0) is None
    assert "forming its group" in watchdog.stalled(group, 1000.0 + 20 + 60, 20.0)


def test_the_watchdog_fires_once(tmp_path, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(heartbeat.time, "monotonic", clock)
    hb = Heartbeat(tmp_path / "hb")
    fired = []
    dog = watchdog.Watchdog(tmp_path / "hb", 5.0, fired.append, clock=clock)
    assert dog.check() is None  # nothing written yet
    hb.enter("all_sum")
    clock.t += 4.0
    assert dog.check() is None
    clock.t += 1.0
    assert dog.check() is not None and dog.check() is not None
    assert len(fired) == 1 and fired[0].startswith("stalled: all_sum #1 got no further in 5s")


# --- the lifeline: real processes -------------------------------------------------------------

RANK = textwrap.dedent("""
    import sys, time
    from worker.rank.lifeline import tie_to_agent
    print(",".join(tie_to_agent(pdeathsig=sys.argv[1] == "1")), flush=True)
    time.sleep(600)
""")
AGENT = textwrap.dedent("""
    import os, subprocess, sys
    read_end, write_end = os.pipe()
    env = {**os.environ, "HERD_AGENT_PID": str(os.getpid()), "HERD_LIFELINE_FD": str(read_end)}
    rank = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], env=env,
                            pass_fds=(read_end,), start_new_session=True,
                            stdout=subprocess.PIPE, text=True)
    os.close(read_end)
    print(rank.pid, rank.stdout.readline().strip(), flush=True)
    rank.wait()
""")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _wait_gone(pid: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("pdeathsig", [True, False], ids=["linux-pdeathsig", "pipe-only(macos)"])
def test_a_rank_dies_with_its_agent(pdeathsig):
    """SIGKILL the agent: its rank goes too, by Linux's parent-death signal, and by the pipe
    alone (the path macOS takes, which needs nothing Linux-specific)."""
    agent = subprocess.Popen([sys.executable, "-c", AGENT, RANK, "1" if pdeathsig else "0"],
                             cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        pid, ties = agent.stdout.readline().split()
        rank = int(pid)
        assert ties == ("pdeathsig,pipe" if pdeathsig else "pipe")
        assert _alive(rank)
        agent.send_signal(signal.SIGKILL)
        agent.wait(timeout=30)
        assert _wait_gone(rank), "the rank outlived its agent"
    finally:
        agent.kill()
        try:
            os.killpg(int(pid), signal.SIGKILL)
        except (ProcessLookupError, UnboundLocalError, ValueError):
            pass


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_restarted_agent_stops_the_ranks_its_state_folder_names(tmp_path):
    """Only processes that are still the ranks it started: a reused pid is left alone."""
    folders = [tmp_path / "jobs" / "j-1" / f"attempt-{n}" for n in (1, 2, 3)]
    for f in folders:
        f.mkdir(parents=True)
    sleep = [sys.executable, "-c", "import time; time.sleep(600)"]
    orphan = subprocess.Popen(sleep + ["-m", "worker.rank", str(folders[0] / "config.yaml")],
                              start_new_session=True)
    stranger = subprocess.Popen(sleep + ["-m", "worker.rank", "/elsewhere/config.yaml"],
                                start_new_session=True)
    try:
        (folders[0] / "rank.pid").write_text(f"{orphan.pid}\n")
        (folders[1] / "rank.pid").write_text(f"{stranger.pid}\n")  # a pid reused by another
        (folders[2] / "rank.pid").write_text("999999999\n")        # long gone
        # (each exec'd: just after fork, /proc shows the parent's command line, and a loaded
        # machine ran stop_orphans before the orphan's exec: CI)
        for p in (orphan, stranger):
            cmdline = Path(f"/proc/{p.pid}/cmdline")
            deadline = time.monotonic() + 30
            while b"worker.rank" not in cmdline.read_bytes() and time.monotonic() < deadline:
                time.sleep(0.05)
        assert stop_orphans(tmp_path) == [orphan.pid]
        assert orphan.wait(timeout=30) == -signal.SIGTERM
        assert stranger.poll() is None
        assert not list(tmp_path.glob("jobs/*/*/rank.pid"))
    finally:
        for p in (orphan, stranger):
            p.kill()
            p.wait()
