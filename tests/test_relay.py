"""The agent's relay while the coordinator is away (restarting, or its link cut): every report
the rank made meanwhile reaches it once it is back, in order, so `herd watch`, the dashboard and
the pulled metrics.jsonl have no gap. The coordinator is the edge here: a client whose calls
fail while it is "down" (a real restart with real processes: tests/test_faults_multihost.py)."""

from __future__ import annotations

import threading

from herd import log
from herd.errors import PeerLostError
from protos.v1 import coordinator_pb2
from worker.agent import relay as relay_module
from worker.agent.relay import Relay


class AwayCoordinator:
    def __init__(self):
        self.down, self.taken = False, []

    def report(self, request) -> bool:
        if self.down:
            raise PeerLostError("coordinator:7450 is unreachable")
        self.taken.append(request)
        return False


def progress(iteration: int) -> coordinator_pb2.ReportRankRequest:
    r = coordinator_pb2.ReportRankRequest(job_id="j", attempt=1, worker_id="w")
    r.progress.iteration = iteration
    return r


def note(text: str) -> coordinator_pb2.ReportRankRequest:
    return coordinator_pb2.ReportRankRequest(job_id="j", attempt=1, worker_id="w", log=text)


def _relay(client, tmp_path) -> Relay:
    return Relay(None, "w", tmp_path, client, threading.Event(), lambda: None,
                 log.get("test").bind())


def _what(request) -> str:
    kind = request.WhichOneof("report")
    return f"iter {request.progress.iteration}" if kind == "progress" else request.log


def test_reports_made_while_the_coordinator_is_away_all_arrive_in_order(tmp_path):
    coordinator = AwayCoordinator()
    relay = _relay(coordinator, tmp_path)
    relay._send(progress(10))
    coordinator.down = True
    for i in (20, 30, 40):
        relay._send(progress(i))
    relay._send(note("checkpoint 40 saved"))
    relay._send(progress(50))
    coordinator.down = False
    relay._flush(force=True)
    assert [_what(r) for r in coordinator.taken] == [
        "iter 10", "iter 20", "iter 30", "iter 40", "checkpoint 40 saved", "iter 50"]


def test_a_coordinator_away_for_very_long_costs_the_oldest_reports_only(tmp_path, monkeypatch):
    monkeypatch.setattr(relay_module, "MAX_PENDING_REPORTS", 3)
    coordinator = AwayCoordinator()
    relay = _relay(coordinator, tmp_path)
    coordinator.down = True
    for i in range(1, 6):
        relay._send(progress(i))
    coordinator.down = False
    relay._flush(force=True)
    assert [_what(r) for r in coordinator.taken] == ["iter 3", "iter 4", "iter 5"]


def test_a_rank_that_ends_while_the_coordinator_is_away_loses_no_report_nor_log(tmp_path):
    """A rank that finished during a coordinator restart (or cut): its reports and the tail of
    its log still arrive, before its exit (each was tried once, then only the exit was retried:
    rank 1's progress after the cut never reached `herd watch` or the pulled metrics, an outside
    run)."""
    import time

    from herd.config import JobConfig
    from worker.agent.domain import RankSpec

    coordinator = AwayCoordinator()
    spec = RankSpec("j", 1, 1, 2, JobConfig(), [], "c:1", [], [])
    relay = Relay(spec, "w", tmp_path, coordinator, threading.Event(), lambda: None,
                  log.get("test").bind())
    relay._send(progress(10))
    coordinator.down = True
    for i in (20, 30):
        relay._send(progress(i))
    (tmp_path / "rank.log").write_text("iter 30/30 saved\ntrain_done\n")
    ending = threading.Thread(target=relay.report_exit, args=(0,))
    ending.start()
    time.sleep(1.5)  # (its tries fail meanwhile)
    assert ending.is_alive() and len(coordinator.taken) == 1
    coordinator.down = False
    ending.join(30)
    kinds = [r.WhichOneof("report") for r in coordinator.taken]
    assert [_what(r) for r in coordinator.taken[:3]] == ["iter 10", "iter 20", "iter 30"]
    assert kinds[3:] == ["rank_log", "exit"], kinds
    assert coordinator.taken[3].rank_log.data == b"iter 30/30 saved\ntrain_done\n"


# A real shortage of file descriptors (an outside run: ~1,100 unauthenticated connections to a
# worker's agent port used up its 1024; the relay's open() of metrics.jsonl failed and its
# thread ended, so every later checkpoint and the exit stayed on the worker). Run in a child
# process with a low limit, so that using up its descriptors touches no other test.
_STARVED = r'''
import json, os, resource, subprocess, sys, threading, time
from pathlib import Path
from herd import log
from herd.config import JobConfig
from worker.agent.domain import RankSpec
from worker.agent.relay import Relay
from worker.rank import events

folder = Path(sys.argv[1])
metrics = folder / "metrics.jsonl"
taken = []
class Coordinator:
    def report(self, request):
        taken.append(request.WhichOneof("report"))
        return False
spec = RankSpec("j", 1, 0, 1, JobConfig(), [], "c:1", [], [])
relay = Relay(spec, "w", folder, Coordinator(), threading.Event(), lambda: None,
              log.get("test").bind())
rank = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                        stdin=subprocess.PIPE)
thread = threading.Thread(target=relay.run, args=(rank, metrics), daemon=True)
thread.start()
report = lambda i: events.to_line(events.TrainReport(0, i, 2.0, 1e-4, 10.0, i * 10, 0.1,
                                                     "local", 1)) + "\n"
metrics.write_text(report(1))
while "progress" not in taken:
    time.sleep(0.05)
held = [os.open(metrics, os.O_WRONLY | os.O_APPEND)]
try:
    while True:
        held.append(os.open(os.devnull, os.O_RDONLY))
except OSError:
    pass  # EMFILE: this process can open nothing more
os.write(held[0], report(2).encode())  # written while the relay cannot open the file
time.sleep(1.5)  # several turns of the relay, each failing to open metrics.jsonl
starved_alive = thread.is_alive()
for fd in held:
    os.close(fd)
rank.stdin.close()
rank.wait()
thread.join(30)
print(json.dumps({"held": len(held), "starved_alive": starved_alive,
                  "ended": not thread.is_alive(), "taken": taken}))
'''


def test_a_relay_out_of_file_descriptors_carries_on_once_they_are_back(tmp_path):
    import json
    import resource
    import subprocess
    import sys

    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(
            resource.RLIMIT_NOFILE)[1]))

    proc = subprocess.run([sys.executable, "-c", _STARVED, str(tmp_path)], capture_output=True,
                          text=True, timeout=120, preexec_fn=low_limit)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["held"] > 100, got  # the limit was really reached
    assert got["starved_alive"] and got["ended"], (got, proc.stderr[-2000:])
    # The report written while starved arrived once descriptors were back, then the exit.
    assert got["taken"].count("progress") == 2 and got["taken"][-1] == "exit", got
    assert "relay_turn_failed" in proc.stdout + proc.stderr  # said, once


def test_every_herd_process_raises_its_open_file_limit_as_far_as_allowed():
    """systemd's default soft limit is 1024 and launchd's 256: a herd process starts with what
    its hard limit allows (herd/limits.py), so a flood needs far more sockets."""
    import resource
    import subprocess
    import sys

    from herd.limits import MAX_OPEN_FILES

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    expect = MAX_OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, MAX_OPEN_FILES)

    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    code = ("import resource, sys; from herd.cli.main import main; main(['--version']); "
            "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0], file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, preexec_fn=low_limit)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stderr.strip().splitlines()[-1]) == max(256, expect)


def test_a_slow_link_is_said_in_mbit_not_as_zero_gbit():
    from worker.agent.relay import link_rate

    assert [link_rate(b) for b in (22.5e9, 1e9, 5e6, 0.3e6)] == [
        "22.50 Gbit/s", "1.00 Gbit/s", "5 Mbit/s", "0.3 Mbit/s"]


def test_a_worker_keeps_only_its_newest_checkpoint_once_the_coordinator_holds_it(tmp_path,
                                                                                 monkeypatch):
    """The coordinator keeps every checkpoint it took; the worker kept a second copy of each,
    per attempt, and on a long job its disk filled and the job failed (an outside run). Once a
    checkpoint is delivered the older local ones go; one not yet delivered stays."""
    from herd.config import JobConfig
    from herd.errors import AuthError
    from worker.agent.domain import RankSpec
    from worker.rank.checkpoint import write_manifest

    class Coordinator:
        def __init__(self):
            self.taken, self.refuse = [], False

        def put_checkpoint(self, job_id, attempt, step, folder, piece):
            if self.refuse:
                raise AuthError("attempt 1 of job j is not running")
            self.taken.append(step)

        def report(self, request) -> bool:
            return False

    root = tmp_path / "adapters" / "checkpoints"
    for step in (10, 20, 30):
        folder = root / f"{step:07d}"
        folder.mkdir(parents=True)
        (folder / "adapters.safetensors").write_bytes(b"x" * step)
        write_manifest(folder, step)
    (root / ".0000040.tmp-1").mkdir()  # one being written: never touched
    coordinator = Coordinator()
    spec = RankSpec("j", 1, 0, 1, JobConfig(), [], "c:1", [], [])
    relay = Relay(spec, "w", tmp_path, coordinator, threading.Event(), lambda: None,
                  log.get("test").bind())
    monkeypatch.setattr(relay_module, "REFUSED_TRIES", 1)
    monkeypatch.setattr(relay._abandoned, "wait", lambda s: False)  # (no backoff)
    relay._upload(20, str(root / "0000020"))
    assert coordinator.taken == [20]
    assert sorted(p.name for p in root.iterdir()) == [".0000040.tmp-1", "0000020", "0000030"]
    coordinator.refuse = True  # not delivered: the older one stays
    relay._upload(30, str(root / "0000030"))
    assert sorted(p.name for p in root.iterdir()) == [".0000040.tmp-1", "0000020", "0000030"]
