"""Faults injected into a running job across hosts (network namespaces, tests/netns.py): the
cluster, a `herd watch` that timestamps every line, and one function that runs a fault from
submission to the final adapter. Shared by tests/test_faults_multihost.py (short faults) and
bench/faults.py (the review's durations, and the detection table)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.conftest import (
    SAME_UPDATE,
    initial_adapter,
    load_adapter,
    update_diff,
    write_job,
)
from tests.netherd import HerdNet

SAVE_EVERY = 4
# A step of the tiny model takes milliseconds: each fault, from the checkpoint that triggers it
# to the next fault, costs the job 4-20 iterations while the test reacts, and a fast machine
# ran out of iterations before the sixth fault with 120 (CI). 320 leaves room for any speed.
JOB = dict(iters=320, save_every=SAVE_EVERY, steps_per_report=4, **SAME_UPDATE)
# Coordinator options: restarts after 0.5 s, doubling (the policy itself is unit-tested), and a
# lost worker is given up on (the job shrinks) after ELASTIC_GRACE_S: longer than the tests' cuts.
ELASTIC_GRACE_S = 20.0
COORDINATOR_ARGS = ("--restart-backoff", "0.5", "--elastic-grace", str(ELASTIC_GRACE_S))


class Watch:
    """``herd watch --plain`` on the CLI host, each line kept with when it arrived."""

    def __init__(self, herd: HerdNet | None, host, job_id: str, coordinator: str,
                 env: dict | None = None):
        """On ``host`` (a namespace), or on this machine when ``host`` is None."""
        self.lines: list[tuple[float, str]] = []
        self._changed = threading.Condition()
        self._done = False
        args = ["-m", "herd", "watch", job_id, "--plain", "--coordinator", coordinator]
        out = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.proc = (host.python(*args, env=herd.env(host), **out) if host is not None else
                     subprocess.Popen([sys.executable, *args], env=env, **out))
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append((time.monotonic(), line.rstrip()))
                self._changed.notify_all()
        with self._changed:
            self._done = True
            self._changed.notify_all()

    def wait(self, pattern: str, after: float = 0.0, timeout: float = 240) -> tuple[float, str]:
        """The first line matching ``pattern`` that arrived after ``after``."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for t, line in self.lines:
                    if t >= after and rx.search(line):
                        return t, line
                left = deadline - time.monotonic()
                if left <= 0 or self._done:
                    raise AssertionError(f"no line matching {pattern!r}:\n{self.text()[-4000:]}")
                self._changed.wait(min(left, 1.0))

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def settled(self, after: float, timeout: float = 600) -> None:
        """Back to normal after a fault healed at ``after``: the job's last state is running,
        and it stored a checkpoint since then (since it last started, and since ``after``)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                states = [(t, ln) for t, ln in self.lines if ": state " in ln]
                placed = [ln for _, ln in states if ": state placing" in ln]
                if (states and states[-1][1].endswith("state running")
                        and not (placed and "shrunk" in placed[-1])):
                    since = max(after, states[-1][0])
                    if any(t > since and re.search(r": checkpoint \d+ stored$", ln)
                           for t, ln in self.lines):
                        return
                if time.monotonic() > deadline or self._done:
                    raise AssertionError(f"the job did not settle:\n{self.text()[-4000:]}")
                self._changed.wait(1.0)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()


class Cluster:
    """A coordinator on host c, workers on w1 and w2, the CLI on cli (tests/netns.py's lan)."""

    def __init__(self, net, root: Path):
        self.net, self.root = net, Path(root)
        self.herd = HerdNet(net, self.root)
        self.c, self.w1, self.w2, self.cli = (net.hosts[h] for h in ("c", "w1", "w2", "cli"))
        self.procs: dict[str, subprocess.Popen] = {}

    @property
    def address(self) -> str:
        return f"{self.c.address()}:{HerdNet.COORDINATOR_PORT}"

    def start(self) -> None:
        self.start_coordinator()
        self.start_worker(self.w1)
        self.start_worker(self.w2)
        self.herd.wait_workers(self.cli, 2)

    def start_coordinator(self) -> None:
        self.procs["c"] = self.herd.coordinator(self.c, *COORDINATOR_ARGS)

    def start_worker(self, host) -> None:
        self.procs[host.name] = self.herd.worker(host)

    def cli_run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.herd.herd(self.cli, *args, "--coordinator", self.address, check=check)

    def submit(self, cfg: Path) -> str:
        return self.cli_run("submit", str(cfg)).stdout.strip().splitlines()[-1]

    def wait_idle(self, timeout: float = 180) -> None:
        """Both workers listed and running nothing (a fault leaves the cluster as it found it)."""
        deadline, rows = time.monotonic() + timeout, []
        while time.monotonic() < deadline:
            out = self.cli_run("workers", check=False).stdout.strip().splitlines()[1:]
            rows = [ln.split() for ln in out]
            if len(rows) == 2 and all(r[-1] == "-" for r in rows):
                return
            time.sleep(1.0)
        raise AssertionError(f"workers not idle: {rows}")

    def rank_pid(self, host, job_id: str, after_attempt: int = 0, timeout: float = 0.0) -> int:
        """The pid of ``job_id``'s newest rank on ``host`` (of an attempt after ``after_attempt``,
        waiting up to ``timeout`` for it to start)."""
        deadline = time.monotonic() + timeout
        while True:
            pid_files = [p for p in (self.root / host.name / "worker" / "jobs" / job_id).glob(
                "attempt-*/rank.pid") if _attempt(p.parent) > after_attempt]
            if pid_files or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert pid_files, f"no running rank of {job_id} on {host.name}"
        return int(max(pid_files, key=lambda p: _attempt(p.parent)).read_text().split()[0])

    def attempt(self, host, job_id: str) -> int:
        """The newest attempt of ``job_id`` that ``host`` has a folder for (0: none)."""
        folders = (self.root / host.name / "worker" / "jobs" / job_id).glob("attempt-*")
        return max(map(_attempt, folders), default=0)

    def wait_listed(self, worker_id: str, timeout: float = 120) -> None:
        """Until ``herd workers`` lists ``worker_id`` (admitted again by the registry)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.cli_run("workers", check=False).stdout.strip().splitlines()[1:]
            if any(ln.split()[:1] == [worker_id] for ln in out):
                return
            time.sleep(0.5)
        raise AssertionError(f"{worker_id} was not admitted again within {timeout:.0f}s")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        self.procs[name].send_signal(sig)
        self.procs[name].wait(timeout=60)


def reference(folder: Path, model: Path, data: Path):
    """One uninterrupted process with the jobs' config and global batch: (adapter, its start)."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = write_job(folder / "single.yaml", model, data, adapter_path=str(folder / "adapters"),
                    **JOB)
    proc = subprocess.run([sys.executable, "-m", "herd", "train", str(cfg), "--quiet"],
                          env={**os.environ, "OPENBLAS_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_adapter(folder / "adapters"), initial_adapter(cfg)


def _iters(lines, before: float = float("inf")) -> list[tuple[float, int]]:
    found = [(t, re.search(r"iter (\d+)/", ln)) for t, ln in lines if t < before]
    return [(t, int(m[1])) for t, m in found if m]


def run_fault(cluster: Cluster, reference, folder: Path, model: Path, data: Path, exchange: str,
              timeout_s: float = 10.0, **fault) -> dict:
    """One fault in its own job (``run_faults``): its result, with the job's outcome."""
    job = run_faults(cluster, reference, folder, model, data, exchange, [("fault", fault)],
                     timeout_s)
    return {**job["faults"][0], **{k: v for k, v in job.items() if k != "faults"}}


def run_faults(cluster: Cluster, reference, folder: Path, model: Path, data: Path,
               exchange: str, faults: list[tuple[str, dict]], timeout_s: float = 10.0) -> dict:
    """Submits a job and injects each fault in turn: the first once checkpoint 8 is stored, each
    next once the job stores a checkpoint again after the previous one was dealt with. A fault
    is ``inject(job_id)``, optionally ``heal(job_id)`` ``heal_after_s`` after it, and the line
    that shows it was detected (``detect``, default a restart). Returns, per fault: detection
    time, that line, the checkpoint resumed from and the iterations redone; for the job: its
    outcome, its adapter's difference from one process's, its measured step time, its events."""
    folder.mkdir(parents=True, exist_ok=True)
    cluster.wait_idle()
    cfg = write_job(folder / f"{exchange}.yaml", model, data, **JOB,
                    cluster={"workers": 2, "exchange": exchange, "max_restarts": 3,
                             "exchange_timeout_s": timeout_s})
    job_id = cluster.submit(cfg)
    watch = Watch(cluster.herd, cluster.cli, job_id, cluster.address)
    done, after, first, unhealed = [], 0.0, None, []
    try:
        for name, f in faults:
            if first is None:
                watch.wait(r": checkpoint 8 stored$", timeout=300)
            else:
                watch.settled(after)
            t0 = time.monotonic()
            first = first or t0
            unhealed = [f["heal"]] if f.get("heal") else []
            f["inject"](job_id)
            t_detect, line = watch.wait(f.get("detect", r"state restarting: "), after=t0,
                                        timeout=600)
            if unhealed:
                if f.get("heal_on"):  # healed once the job shows this line
                    watch.wait(f["heal_on"], after=t0, timeout=600)
                time.sleep(max(0.0, t0 + f.get("heal_after_s", 0.0) - time.monotonic()))
                unhealed.pop()(job_id)
            after = time.monotonic()
            done.append({"name": name, "t0": t0, "t_detect": t_detect,
                         "detected_s": t_detect - t0, "line": line})
        _, end = watch.wait(rf"{job_id}: state (succeeded|failed|cancelled)", timeout=900)
    finally:
        for heal in unhealed:  # a failed check never leaves the cluster cut or a worker down
            heal(job_id)
        watch.close()
        with open(folder / "watch.log", "w") as log:  # for a failure's post-mortem
            for t, ln in watch.lines:
                log.write(f"{t:.2f} {ln}\n")
    lines = watch.lines
    for i, d in enumerate(done):
        since = done[i - 1]["t_detect"] if i else 0.0
        window = [n for t, n in _iters(lines, before=d["t_detect"]) if t >= since]
        reached = max(window or [n for _, n in _iters(lines, before=d["t_detect"])] or [0])
        nxt = done[i + 1]["t0"] if i + 1 < len(done) else float("inf")
        resumed = [(t, int(m[1])) for t, ln in lines if d["t_detect"] <= t < nxt
                   and (m := re.search(r"resuming from checkpoint (\d+)", ln))]
        d["resumed"] = resumed[0][1] if resumed else None
        d["redone"] = max(0, reached - resumed[0][1]) if resumed else 0
        # the newest checkpoint the coordinator held when it restarted the job
        d["stored"] = max((int(m[1]) for t, ln in lines if resumed and t <= resumed[0][0]
                           and (m := re.search(r": checkpoint (\d+) stored$", ln))), default=None)
        # which worker held rank 0, whose agent uploads the checkpoints
        placed = [m[1] for t, ln in lines if t < d["t0"]
                  and (m := re.search(r"state placing: starting \d+ ranks on (\w+)", ln))]
        d["uploader"] = placed[-1] if placed else None
    steps = _iters(lines, before=first)
    rates = [(t2 - t1) / (i2 - i1) for (t1, i1), (t2, i2) in zip(steps, steps[1:]) if i2 > i1]
    result = {"job_id": job_id, "faults": done, "text": watch.text(), "lines": lines,
              "outcome": end.split("state ", 1)[1], "step_s": max(rates, default=0.0),
              "rel": float("nan")}
    if result["outcome"] == "succeeded":
        out = folder / "pulled"
        cluster.cli_run("pull", job_id, "-o", str(out))
        want, start = reference
        result["rel"] = update_diff(load_adapter(out), want, start)
    return result


def _attempt(folder: Path) -> int:
    return int(folder.name.split("-")[1])


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def scenarios(cluster: Cluster, cut_s: float, ring_cut_s: float, stop_s: float,
              lost_s: float | None = None):
    """(name, run_fault keyword arguments) for each fault of the table. The lost worker is cut
    off for ``lost_s``, or until the job shrank (None), then comes back: the job then grows back
    at a checkpoint."""
    stopped: list[int] = []

    def stop_rank(job_id):
        stopped.append(cluster.rank_pid(cluster.w2, job_id))
        os.kill(stopped[-1], signal.SIGSTOP)

    def cont_rank(_):
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    def kill_agent(job_id):
        rank = cluster.rank_pid(cluster.w2, job_id)
        cluster.kill("w2")
        deadline = time.monotonic() + 30
        while _alive(rank) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(rank), "the rank outlived its agent"
        cluster.start_worker(cluster.w2)

    lost: dict[str, int] = {}

    def lose_worker(job_id):
        lost["attempt"] = cluster.attempt(cluster.w1, job_id)
        cluster.net.cut(cluster.w2)

    def return_worker(job_id):
        # The shrunk job's rank is held (SIGSTOP, as in a long step: one rank has no collective
        # to stall in, so nothing watches it) until the returned worker is admitted again: the
        # tiny job would otherwise finish its last iterations in a second, before the registry's
        # retry (up to registry.MAX_RETRY_S) lets the worker back, and never grow. A real job has
        # hours left; what is tested is that it grows back at its next checkpoint.
        rank = None
        try:
            rank = cluster.rank_pid(cluster.w1, job_id, after_attempt=lost["attempt"],
                                    timeout=60)
            os.kill(rank, signal.SIGSTOP)
        except (AssertionError, ProcessLookupError):
            rank = None  # it had started and ended already: the check on growing back fails
        cluster.net.restore(cluster.w2)
        try:
            cluster.wait_listed(cluster.w2.name)
        finally:
            if rank is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(rank, signal.SIGCONT)

    def restart_coordinator(_):
        cluster.kill("c")
        time.sleep(3.0)
        cluster.start_coordinator()

    def kill_rank(job_id):
        os.kill(cluster.rank_pid(cluster.w2, job_id), signal.SIGKILL)

    return [
        ("killed rank (SIGKILL)", dict(inject=kill_rank)),
        (f"stopped rank (SIGSTOP {stop_s:.0f}s)",
         dict(inject=stop_rank, heal=cont_rank, heal_after_s=stop_s)),
        (f"worker cut off {cut_s:.0f}s", dict(
            inject=lambda _: cluster.net.cut(cluster.w2),
            heal=lambda _: cluster.net.restore(cluster.w2), heal_after_s=cut_s)),
        (f"worker-to-worker link cut {ring_cut_s:.0f}s", dict(
            inject=lambda _: cluster.net.block(cluster.w1, cluster.w2),
            heal=lambda _: cluster.net.unblock(cluster.w1, cluster.w2), heal_after_s=ring_cut_s)),
        ("killed agent (restarted at once)", dict(inject=kill_agent, mlx_only=True)),
        ("lost worker (" + (f"gone {lost_s:.0f}s" if lost_s else "gone until the job shrank")
         + ": shrink, grow back)", dict(
            inject=lose_worker, heal=return_worker,
            **({"heal_after_s": lost_s} if lost_s else {"heal_on": r"shrunk to \d+ of"}),
            mlx_only=True)),
        (f"coordinator cut off from the workers {cut_s:.0f}s", dict(
            inject=lambda _: [cluster.net.block(cluster.c, w) for w in (cluster.w1, cluster.w2)],
            heal=lambda _: [cluster.net.unblock(cluster.c, w) for w in (cluster.w1, cluster.w2)],
            heal_after_s=cut_s, detect="stopped answering the coordinator")),
        ("coordinator killed (restarted after 3 s)", dict(
            inject=restart_coordinator, detect=r"re-adopted attempt \d+", mlx_only=True)),
    ]
