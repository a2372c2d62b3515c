"""Disks and data on one machine (loopback): a coordinator whose state folder is a real small
tmpfs, two worker agents, the laptop CLI, real MLX rings. A full coordinator disk is said and
ridden out, no checkpoint lost (never SUCCEEDED without its adapter), a damaged latest
checkpoint makes the next attempt resume from the one before it, and ``learning_rate: .inf``
fails at the first non-finite step, naming it."""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import (
    SAME_UPDATE,
    SAME_UPDATE_RTOL,
    free_ports,
    initial_adapter,
    load_adapter,
    update_diff,
    write_job,
)
from tests.faults import Watch
from tests.test_recovery_units import tiny_disk

pytestmark = pytest.mark.slow
HOST = "127.0.0.1"


class Local:
    def __init__(self, root: Path, state: Path):
        self.root, self.state = root, state
        self.port = free_ports(1)[0]
        from herd.rpc import pki

        ca = pki.Authority.create(root / "home" / "tls")  # as `herd init` makes it
        for role in ("coordinator", "client"):
            ca.issue(role, pki.host_label()).save(ca.folder)
        self.env = {**os.environ, "HERD_HOME": str(root / "home"), "HERD_ZEROCONF_INTERFACES": HOST,
                    "OPENBLAS_NUM_THREADS": "1", "HERD_LOG_LEVEL": "info"}
        self.env.pop("HERD_COORDINATOR", None)
        self.procs: list[subprocess.Popen] = []
        tag = secrets.token_hex(3)
        self.workers = [f"fl{tag}-{n}" for n in (1, 2)]  # unique: mDNS is shared on this host

    def spawn(self, name: str, *args: str) -> subprocess.Popen:
        with open(self.root / f"{name}.log", "ab") as log:
            p = subprocess.Popen([sys.executable, "-m", "herd", *args], env=self.env,
                                 stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(p)
        return p

    def start(self) -> None:
        self.spawn("coordinator", "coordinator", "--host", HOST, "--port", str(self.port),
                   "--state-dir", str(self.state), "--restart-backoff", "3", "--no-join")
        for wid in self.workers:  # a local cluster's owner lets it load models from anywhere
            self.spawn(wid, "worker", "--host", HOST, "--id", wid, "--state-dir",
                       str(self.root / wid), "--model-root", "/")

    def herd(self, *args: str, check: bool = True, timeout: float = 300):
        proc = subprocess.run([sys.executable, "-m", "herd", *args, "--coordinator",
                               f"{HOST}:{self.port}"], env=self.env, capture_output=True,
                              text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"herd {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n"
                                 f"{proc.stderr[-3000:]}")
        return proc

    def wait_idle(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = [ln.split() for ln in self.herd("workers", check=False).stdout.splitlines()[1:]]
            if len(rows) == 2 and all(r[-1] == "-" for r in rows):
                return
            time.sleep(0.5)
        raise AssertionError(f"workers not idle: {rows}")

    def watch(self, job_id: str) -> Watch:
        """`herd watch` followed line by line as the job runs."""
        return Watch(None, None, job_id, f"{HOST}:{self.port}", env=self.env)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    root = tmp_path_factory.mktemp("local")
    with tiny_disk(root / "disk", "64m") as disk:
        c = Local(root, disk / "coordinator")
        c.start()
        try:
            rows = []
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and len(rows) < 2:
                rows = c.herd("workers", check=False).stdout.splitlines()[1:]
                time.sleep(0.5)
            assert len(rows) == 2, rows
            yield c
        finally:
            c.stop()


def _fill(folder: Path, leave: int) -> Path:
    """Fill the disk holding ``folder`` until ``leave`` bytes are free."""
    import shutil

    ballast = folder / "ballast"
    free = shutil.disk_usage(folder).free
    with open(ballast, "wb") as f:
        f.truncate(0)
        f.write(b"\0" * max(0, free - leave))
    return ballast


def test_a_full_coordinator_disk_is_ridden_out_and_loses_no_checkpoint(local, tmp_path,
                                                                       tiny_model, tiny_data):
    """A few MB free: the next checkpoint is refused, said, and sent again by its rank once
    there is room, the job training on (it failed at once: an outside run; refused for
    recovery.DISK_GRACE_S it fails: tests/test_recovery_units.py)."""
    local.wait_idle()
    cfg = write_job(tmp_path / "full.yaml", tiny_model, tiny_data, iters=400, save_every=4,
                    steps_per_report=4, cluster={"workers": 2})
    job_id = local.herd("submit", str(cfg)).stdout.strip().splitlines()[-1]
    watch = local.watch(job_id)
    try:
        watch.wait(r"checkpoint 8 stored")
        ballast = _fill(local.state, leave=2 * 1024 * 1024)  # room for SQLite, not a checkpoint
        try:
            _, said = watch.wait(r"checkpoint (\d+) cannot be stored on the coordinator yet: "
                                 rf"the coordinator's disk holding {local.state}/adapters is full")
            refused = int(re.search(r"checkpoint (\d+) cannot", said).group(1))
            # The adapter stored before the disk filled is there to pull meanwhile.
            local.herd("pull", job_id, "-o", str(tmp_path / "pulled"))
            assert (tmp_path / "pulled" / "adapters.safetensors").is_file()
            # A new job is refused at submit, naming the disk (exit 8), before any worker is
            # touched.
            again = local.herd("submit", str(cfg), check=False)
            assert again.returncode == 8, again.stderr
            assert re.search(rf"disk holding {local.state}(/adapters)? is full", again.stderr)
        finally:
            ballast.unlink()
        freed = time.monotonic()
        watch.wait(rf": checkpoint {refused} stored$", after=freed, timeout=120)
        watch.wait(rf": checkpoint {refused + 4} stored$", after=freed, timeout=240)
        assert ": state failed" not in watch.text(), watch.text()[-3000:]
    finally:
        watch.close()
        local.herd("cancel", job_id, check=False)
    steps = [int(x) for x in re.findall(r": checkpoint (\d+) stored$", watch.text(), re.M)]
    assert set(range(4, refused + 8, 4)) <= set(steps), steps  # every one, none skipped


def test_a_damaged_latest_checkpoint_resumes_from_the_one_before(local, tmp_path, tiny_model,
                                                                  tiny_data):
    local.wait_idle()
    # Long enough that the kill below lands mid-job under load (120 tiny iterations could end
    # before a loaded `herd watch` had shown checkpoint 8).
    kw = dict(iters=320, save_every=4, steps_per_report=4, **SAME_UPDATE)
    cfg = write_job(tmp_path / "rot.yaml", tiny_model, tiny_data, **kw,
                    cluster={"workers": 2, "exchange": "mlx", "max_restarts": 2})
    job_id = local.herd("submit", str(cfg)).stdout.strip().splitlines()[-1]
    watch = local.watch(job_id)
    try:
        watch.wait(r"checkpoint 8 stored")
        rank = next((local.root / local.workers[0]).glob(f"jobs/{job_id}/attempt-1/rank.pid"))
        os.kill(int(rank.read_text()), signal.SIGKILL)
        # (on the state line, or on the hint line after it when the peer reported first)
        watch.wait(r"restarting from checkpoint \d+ in 3s", timeout=60)
    finally:
        watch.close()
    time.sleep(0.5)  # the killed rank's relay has uploaded what it had
    steps = sorted(int(p.name) for p in (local.state / "adapters" / job_id).iterdir()
                   if p.name.isdigit())
    latest = local.state / "adapters" / job_id / f"{steps[-1]:07d}" / "adapters.safetensors"
    data = bytearray(latest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte at rest
    latest.write_bytes(bytes(data))
    watch = local.herd("watch", job_id, "--plain", check=False)
    assert watch.returncode == 0, watch.stdout[-3000:] + watch.stderr
    assert (f"checkpoint {steps[-1]} is damaged (adapters.safetensors does not match its "
            "sha256); skipped, resuming from the one before it") in watch.stdout
    assert f"resuming from checkpoint {steps[-2]}" in watch.stdout, watch.stdout[-3000:]
    _same_as_one_process(local, job_id, tmp_path, tiny_model, tiny_data, "resumed", **kw)


def _same_as_one_process(local, job_id: str, tmp_path, model, data, what: str, **kw) -> None:
    """The job's pulled adapter equals one `herd train` process's with ``kw`` (SAME_UPDATE)."""
    local.herd("pull", job_id, "-o", str(tmp_path / "pulled"))
    single = write_job(tmp_path / "single.yaml", model, data, **kw,
                       adapter_path=str(tmp_path / "single"))
    proc = subprocess.run([sys.executable, "-m", "herd", "train", str(single), "--quiet"],
                          env=local.env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rel = update_diff(load_adapter(tmp_path / "pulled"), load_adapter(tmp_path / "single"),
                      initial_adapter(single))
    assert rel <= SAME_UPDATE_RTOL, f"{what} adapter differs from one process by {rel:.2e}"


@pytest.mark.parametrize("layout", [{}, {"parallelism": {"data": 1, "pipeline": 2}}],
                         ids=["data-parallel", "pipeline"])
def test_an_infinite_learning_rate_fails_at_the_first_non_finite_step(local, tmp_path,
                                                                      tiny_model, tiny_data,
                                                                      layout):
    """On data-parallel ranks (the summed gradient is the same on each) and on pipeline stages
    (each holds its own blocks' gradients: the check sums them over every stage first), every
    rank stops at the same step with the same message. (A rate of .inf itself is refused at
    submit now: 1e30 overflows the weights at the first step instead.)"""
    local.wait_idle()
    cfg = write_job(tmp_path / "inf.yaml", tiny_model, tiny_data, iters=40, optimizer="sgd",
                    learning_rate=1e30, cluster={"workers": 2, "max_restarts": 2, **layout})
    job_id = local.herd("submit", str(cfg)).stdout.strip().splitlines()[-1]
    watch = local.herd("watch", job_id, "--plain", check=False)
    assert watch.returncode == 10, watch.stdout[-3000:]
    # Step 1's update makes the weights inf; step 2's loss and gradient are NaN: stopped there,
    # on both ranks alike, never restarted (it would fail the same way).
    assert re.search(r"state failed: rank \d on \S+ exited with code 9: non-finite gradient at "
                     r"iteration 2 \(optimizer step 2\): gradient norm nan", watch.stdout), \
        watch.stdout[-3000:]
    assert "state restarting" not in watch.stdout


def test_a_job_that_asked_for_rollback_retries_the_non_finite_steps_with_a_lower_rate(
        local, tmp_path, tiny_model, tiny_data):
    """cluster.on_non_finite: rollback. SGD at 1e30 makes step 2 NaN (no checkpoint yet): the
    job rolls back to the start with the rate x1e-33 and succeeds, and its adapter is the one a
    single process trains at that rate (so the ranks were given it)."""
    local.wait_idle()
    kw = dict(iters=8, save_every=4, **{**SAME_UPDATE, "learning_rate": 1e30})
    cfg = write_job(tmp_path / "rb.yaml", tiny_model, tiny_data, **kw,
                    cluster={"workers": 2, "on_non_finite": "rollback",
                             "rollback_lr_factor": 1e-33, "max_rollbacks": 1})
    job_id = local.herd("submit", str(cfg)).stdout.strip().splitlines()[-1]
    watch = local.herd("watch", job_id, "--plain", check=False)
    assert watch.returncode == 0, watch.stdout[-3000:]
    assert re.search(r"state restarting: attempt 1 failed: rank \d on \S+ exited with code 9: "
                     r"non-finite gradient at iteration 2 [\s\S]*?; rolling back to the start "
                     r"with the "
                     r"learning rate x1e-33 \(rollback 1 of 1: cluster.on_non_finite\)",
                     watch.stdout), watch.stdout[-3000:]
    _same_as_one_process(local, job_id, tmp_path, tiny_model, tiny_data, "rolled-back", **kw,
                         cluster={"lr_scale": 1e-33})


def test_a_stopped_pipeline_stage_is_found_by_its_peers_watchdog_and_the_job_resumes(
        local, tmp_path, tiny_model, tiny_data):
    """MLX's send/recv have no deadline: a stage stopped mid-job (SIGSTOP) leaves its peer inside
    a transfer, where the peer's agent's watchdog ends it past 2 x step + exchange_timeout_s, and
    the job resumes from its checkpoint on both workers (then it is cancelled: the resumed
    pipeline's exactness is tests/test_pipeline.py's)."""
    local.wait_idle()
    cfg = write_job(tmp_path / "pp.yaml", tiny_model, tiny_data, iters=5000, save_every=8,
                    steps_per_report=8, **SAME_UPDATE,
                    cluster={"workers": 2, "parallelism": {"data": 1, "pipeline": 2},
                             "exchange": "mlx", "exchange_timeout_s": 3, "max_restarts": 2})
    job_id = local.herd("submit", str(cfg)).stdout.strip().splitlines()[-1]
    watch = local.watch(job_id)
    stopped = None
    try:
        watch.wait(r"checkpoint 16 stored")
        pid_file = next((local.root / local.workers[1]).glob(f"jobs/{job_id}/attempt-1/rank.pid"))
        stopped = int(pid_file.read_text().split()[0])
        os.kill(stopped, signal.SIGSTOP)
        when = time.monotonic()
        _, failed = watch.wait(r"attempt 1 failed", after=when, timeout=120)
        print(f"detected after {time.monotonic() - when:.1f}s: {failed}")
        os.kill(stopped, signal.SIGCONT)  # (killed by its own agent's stop by now, usually)
        text = watch.text()
        assert re.search(r"stalled: (send|recv|all_sum) #\d+ got no further in \d+s \(bound \d+s "
                         r"= 2 x [\d.]+s step \+ 3s exchange_timeout_s - 1s to report it\)",
                         text), text[-3000:]
        _, resumed = watch.wait(r"state placing: starting 2 ranks .*resuming from checkpoint "
                                r"(\d+)", after=when, timeout=120)
        step = int(re.search(r"resuming from checkpoint (\d+)", resumed).group(1))
        assert step >= 16, resumed
        watch.wait(rf"checkpoint {step + 8} stored", after=when, timeout=240)  # it trains on
    finally:
        if stopped is not None:
            try:
                os.kill(stopped, signal.SIGCONT)
            except ProcessLookupError:
                pass
        local.herd("cancel", job_id, check=False)
        watch.close()
