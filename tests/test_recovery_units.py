"""Attempts that converge, disks that fill, checkpoints that rot: the control loop stepped with a
fake launcher and clock (tests/test_service_units.py's rig), real SQLite and real files."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest

from coordinator.artifacts import AdapterStore
from coordinator.domain import Checkpoint, EventKind, FileDigest, JobState
from coordinator.recovery import RestartPolicy, control_loop, decide_restart, rollback_config
from coordinator.scheduler import Scheduler
from coordinator.store import Attempt, JobStore
from herd.config import parse_config
from herd.errors import NumericalError, PeerLostError, StorageError
from tests.test_service_units import Clock, FakeLauncher, job, worker


def _job(workers: int = 2, iters: int = 10, max_restarts: int = 2):
    j = job(workers=workers, iters=iters)
    cfg = j.config.model_dump(exclude_unset=True)
    cfg["cluster"] = {"workers": workers, "max_restarts": max_restarts}
    j.config = parse_config(cfg)
    return j


def _ckpt(job_id: str, step: int, clock: Clock) -> Checkpoint:
    return Checkpoint(job_id, step, [FileDigest("adapters.safetensors", "f" * 64, 1)],
                      int(clock.t * 1000))


class StopLog(FakeLauncher):
    def stop_job(self, w, job_id, attempt=0):
        self.stopped.append((w.worker_id, job_id, attempt))


@pytest.fixture
def rig(tmp_path):
    workers = [worker(1), worker(2)]
    launcher, clock = StopLog(), Clock()
    s = Scheduler(JobStore(tmp_path / "db"), lambda: list(workers), launcher, clock,
                  placement_timeout_s=600)
    return s, workers, launcher, clock


def _state(s, job_id):
    got = s.store.get_job(job_id)
    return got.state, got.attempt, got.message


def test_restart_backoff_doubles_and_only_wasted_attempts_count():
    """Pure policy: 5 s, 10 s, 20 s ... capped; an attempt that stored a checkpoint is not
    wasted; three failures within the window are flapping."""
    p = RestartPolicy(base_s=5, cap_s=30, flap_window_s=600)
    ck = [Checkpoint("j", 4, [], created_ms=1_500)]
    made = Attempt(1, ["w1"], 1_000, 2_000, "restarting")  # stored checkpoint 4
    wasted = [Attempt(n, ["w1"], 2_000 + n, 3_000 + n, "restarting") for n in (2, 3)]
    now = Attempt(4, ["w1"], 4_000, None, None)
    d = decide_restart([made, now], ck, 5_000, max_restarts=1, retryable=True, policy=p)
    assert (d.restart, d.wasted, d.delay_s, d.flapping) == (True, 1, 10, False)
    made_now = Attempt(4, ["w1"], 1_000, None, None)  # this attempt itself stored checkpoint 4
    assert decide_restart([made_now], ck, 5_000, 1, True, p).wasted == 0
    assert not decide_restart([made_now], ck, 5_000, 0, True, p).restart  # 0: never
    d = decide_restart([made, *wasted, now], ck, 5_000, max_restarts=2, retryable=True, policy=p)
    assert (d.restart, d.wasted, d.recent, d.delay_s, d.flapping) == (False, 3, 4, 30, True)
    d = decide_restart([made, *wasted, now], ck, 5_000, max_restarts=3, retryable=True, policy=p)
    assert d.restart
    d = decide_restart([now], ck, 5_000, max_restarts=5, retryable=False, policy=p)
    assert not d.restart  # a rank that failed on its own fails again
    # Failures older than the window no longer raise the backoff.
    d = decide_restart([made, *wasted, now], ck, 5_000 + 700_000, 9, True, p)
    assert (d.recent, d.delay_s) == (1, 5)


def test_a_link_that_keeps_failing_backs_off_and_is_reported_as_flapping(rig):
    s, workers, launcher, clock = rig
    j = s.submit(_job(max_restarts=3))
    s.tick()
    s.on_checkpoint(_ckpt(j.job_id, 4, clock))  # attempt 1 made progress
    delays = []
    for attempt in (1, 2, 3, 4):
        s.on_exit(j.job_id, attempt, 0, "w1", 5, "lost a peer of the MLX group")
        state, _, message = _state(s, j.job_id)
        assert state is JobState.RESTARTING, message
        delays.append(int(re.search(r"restarting from checkpoint 4 in (\d+)s", message)[1]))
        assert ("flapping: " in message) == (attempt >= 3), message
        s.tick()
        assert _state(s, j.job_id)[0] is JobState.RESTARTING  # not before its backoff
        clock.t += delays[-1]
        s.tick()
        assert _state(s, j.job_id)[:2] == (JobState.RUNNING, attempt + 1)
        assert launcher.started[-1].resume_step == 4
    assert delays == [5, 10, 20, 40]
    s.on_exit(j.job_id, 5, 1, "w2", 5, "lost a peer of the MLX group")
    state, _, message = _state(s, j.job_id)
    assert state is JobState.FAILED  # 4 attempts in a row stored nothing (max_restarts 3)
    assert message.endswith("(attempt 5); 4 attempts in a row stored no new checkpoint "
                            "(cluster.max_restarts: 3)")


def test_a_coordinator_restart_keeps_a_restarting_jobs_backoff(rig, tmp_path):
    """A restart waiting out its backoff, then the coordinator restarts (a supervisor, while a
    job flaps): the new coordinator waits the rest of it, instead of placing at once (an
    outside run saw a 30 s backoff become 4 s)."""
    s, workers, launcher, clock = rig
    s.restart_policy = RestartPolicy(base_s=30)
    j = s.submit(_job(max_restarts=3))
    s.tick()
    s.on_exit(j.job_id, 1, 1, "w2", -9, "killed")
    assert "in 30s" in _state(s, j.job_id)[2]
    clock.t += 2
    again = Scheduler(s.store, lambda: list(workers), launcher, clock,
                      restart_policy=RestartPolicy(base_s=30))
    again.recover()
    again.tick()
    assert _state(again, j.job_id)[:2] == (JobState.RESTARTING, 1)
    clock.t += 29
    again.tick()
    assert _state(again, j.job_id)[:2] == (JobState.RUNNING, 2)


def test_a_non_finite_step_rolls_back_with_a_lower_learning_rate_only_when_asked(rig):
    """cluster.on_non_finite: rollback: a rank's NumericalError (exit 9) restarts the job at once
    from its last checkpoint with the learning rate times rollback_lr_factor, each time lower,
    max_rollbacks times; then (and without the option, or on another failure) it fails."""
    s, workers, launcher, clock = rig
    j = _job(max_restarts=0)  # rollbacks are not restarts: max_restarts 0 does not stop them
    cfg = j.config.model_dump(exclude_unset=True)
    cfg["cluster"].update(on_non_finite="rollback", rollback_lr_factor=0.25, max_rollbacks=2)
    j.config = parse_config(cfg)
    assert rollback_config(j.config, PeerLostError.exit_code) is None  # not a numerical failure
    plain = _job()
    assert rollback_config(plain.config, NumericalError.exit_code) is None  # not asked for
    j = s.submit(j)
    s.tick()
    s.on_checkpoint(_ckpt(j.job_id, 4, clock))
    for attempt, scale in ((1, 0.25), (2, 0.0625)):
        s.on_exit(j.job_id, attempt, 0, "w1", NumericalError.exit_code,
                  "non-finite gradient at iteration 6")
        state, _, message = _state(s, j.job_id)
        assert state is JobState.RESTARTING, message
        assert message.endswith(f"rolling back to checkpoint 4 with the learning rate x{scale:g} "
                                f"(rollback {attempt} of 2: cluster.on_non_finite)"), message
        s.tick()  # at once: no backoff
        assert _state(s, j.job_id)[:2] == (JobState.RUNNING, attempt + 1)
        started = launcher.started[-1]
        assert started.resume_step == 4
        assert started.job.config.cluster.lr_scale == scale  # what the ranks are sent
        assert s.store.get_job(j.job_id).config.cluster.lr_scale == scale  # and kept
    s.on_exit(j.job_id, 3, 0, "w1", NumericalError.exit_code, "non-finite gradient at iteration 6")
    state, _, message = _state(s, j.job_id)
    assert state is JobState.FAILED and message.endswith(
        "non-finite gradient at iteration 6 (attempt 3); still not finite after 2 rollbacks "
        "(learning rate x0.0625; cluster.max_rollbacks: 2)"), message


def test_stale_ranks_are_stopped_until_gone_and_a_jobs_own_dead_attempt_is_not_busy(rig):
    """The cut-off worker's rank of attempt 1 survives its StopJob (the worker was unreachable);
    when the worker reports it again, it is stopped again, every few seconds, while the new
    attempt is placed on that same worker."""
    s, workers, launcher, clock = rig
    j = s.submit(_job())
    s.tick()
    for w in workers:
        w.running_job_id, w.running_attempt = j.job_id, 1
    s.on_worker_lost("w2")
    assert _state(s, j.job_id)[0] is JobState.RESTARTING
    launcher.stopped.clear()
    clock.t += 5
    s.tick()  # both still run attempt 1's ranks: stale, stopped, and yet free for attempt 2
    state, attempt, _ = _state(s, j.job_id)
    assert (state, attempt) == (JobState.RUNNING, 2)
    assert sorted(w for w, _, _ in launcher.stopped) == ["w1", "w2"]
    assert {a for _, _, a in launcher.stopped} == {1}  # never attempt 2's new ranks
    s._pool.submit(lambda: None).result()
    launcher.stopped.clear()
    workers[0].running_attempt = 2  # w1 runs the new attempt now; w2 still reports attempt 1
    s.tick()
    assert launcher.stopped == []  # asked again only every STALE_STOP_EVERY_S
    clock.t += 5
    s.tick()
    s._pool.submit(lambda: None).result()
    assert launcher.stopped == [("w2", j.job_id, 1)]
    workers[1].running_attempt = 2
    launcher.stopped.clear()
    clock.t += 5
    s.tick()
    s._pool.submit(lambda: None).result()
    assert launcher.stopped == []


def test_no_success_without_the_final_adapter_and_a_full_disk_fails_after_its_grace(rig):
    s, workers, launcher, clock = rig
    a = s.submit(_job(iters=8))
    s.tick()
    clock.t += 1
    b = s.submit(_job(iters=6))
    s.on_checkpoint(_ckpt(a.job_id, 4, clock))  # the final one (8) never arrived
    s.on_exit(a.job_id, 1, 0, "w1", 0, "")
    s.on_exit(a.job_id, 1, 1, "w2", 0, "")
    state, _, message = _state(s, a.job_id)
    assert state is JobState.FAILED
    assert message == ("every rank finished, but the final adapter (checkpoint 8) was never "
                       "stored on the coordinator; see the job's log lines")
    clock.t += 1
    s.tick()
    # A full disk is ridden out: said once, the rank sends the checkpoint again, the job trains
    # on; a checkpoint stored meanwhile starts the grace over. Refused for the whole grace, the
    # job fails with the reason (an outside run: a few MB free failed a job at once).
    full = "the coordinator's disk holding /x is full"
    for _ in range(3):
        s.on_storage_failed(b.job_id, 2, full)
        clock.t += 60
    assert _state(s, b.job_id)[0] is JobState.RUNNING
    said = [e.message for e in s.store.events(b.job_id)
            if e.kind is EventKind.LOG and "checkpoint" in e.message]
    assert said == [f"checkpoint 2 cannot be stored on the coordinator yet: {full}; the rank "
                    "keeps it and sends it again, and the job trains on (it fails if none can "
                    "be stored for 10 min)"], said
    s.on_checkpoint(_ckpt(b.job_id, 2, clock))
    clock.t += s.disk_grace.grace_ms / 1000 - 1
    s.on_storage_failed(b.job_id, 4, full)  # a new grace from here
    assert _state(s, b.job_id)[0] is JobState.RUNNING
    clock.t += s.disk_grace.grace_ms / 1000
    s.on_storage_failed(b.job_id, 4, full)
    state, _, message = _state(s, b.job_id)
    assert state is JobState.FAILED
    assert message == f"checkpoint 4 could not be stored on the coordinator: {full}"
    assert ("w1", b.job_id, 1) in launcher.stopped and ("w2", b.job_id, 1) in launcher.stopped


def _store_checkpoint(store: AdapterStore, job_id: str, step: int, data: bytes, now: int):
    files = [FileDigest("adapters.safetensors", hashlib.sha256(data).hexdigest(), len(data))]
    return store.receive(job_id, step, files, iter([("adapters.safetensors", data)]), now)


def test_a_damaged_checkpoint_is_skipped_for_the_previous_good_one(tmp_path):
    adapters = AdapterStore(tmp_path / "adapters")
    workers = [worker(1), worker(2)]
    launcher, clock = StopLog(), Clock()
    s = Scheduler(JobStore(tmp_path / "db"), lambda: list(workers), launcher, clock,
                  checkpoints=adapters)
    j = s.submit(_job())
    s.tick()
    for step in (2, 4, 6):
        s.on_checkpoint(_store_checkpoint(adapters, j.job_id, step, bytes([step]) * 100,
                                          int(clock.t * 1000)))
    path = adapters.step_dir(j.job_id, 6) / "adapters.safetensors"
    path.write_bytes(b"\x07" + path.read_bytes()[1:])  # one byte flipped at rest
    (adapters.step_dir(j.job_id, 4) / "adapters.safetensors").unlink()
    s.on_exit(j.job_id, 1, 0, "w1", -9, "killed")
    clock.t += 5
    s.tick()
    assert _state(s, j.job_id)[:2] == (JobState.RUNNING, 2)
    assert {la.resume_step for la in launcher.started[-2:]} == {2}
    logs = [e.message for e in s.store.events(j.job_id) if e.kind is EventKind.LOG]
    assert ("checkpoint 6 is damaged (adapters.safetensors does not match its sha256); skipped, "
            "resuming from the one before it") in logs
    assert ("checkpoint 4 is damaged (adapters.safetensors is missing); skipped, resuming from "
            "the one before it") in logs


@contextlib.contextmanager
def tiny_disk(path: Path, size: str):
    """A real small tmpfs (root only): a disk that fills."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                   check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(folder: Path) -> Path:
    ballast = folder / "ballast"
    with open(ballast, "wb", buffering=0) as f:  # (unbuffered: nothing left to fail at close)
        for size in (65536, 4096, 1):
            try:
                while f.write(b"\0" * size):
                    pass
            except OSError:
                pass
    return ballast


def test_a_coordinator_that_starts_on_a_full_disk_waits_for_it_instead_of_exiting(tmp_path):
    """Restarted (a crash, a reboot, `herd up`'s supervisor) while its disk is full, the
    coordinator used to exit at once, again at every restart, and `herd up` then stopped the
    whole cluster, ranks training fine included (an outside run). It waits for the disk,
    saying so once, and starts when it can write."""
    import socket
    import sys

    from herd.rpc import pki

    pki.Authority.create(tmp_path / "home" / "tls")
    with socket.socket() as s_:
        s_.bind(("127.0.0.1", 0))
        port = s_.getsockname()[1]
    with tiny_disk(tmp_path / "disk", "1m") as disk:
        ballast = _fill(disk)
        proc = subprocess.Popen(
            [sys.executable, "-m", "herd", "coordinator", "--state-dir", str(disk / "coord"),
             "--host", "127.0.0.1", "--port", str(port), "--http-port", "-1", "--no-discovery",
             "--no-join"], env={**os.environ, "HERD_HOME": str(tmp_path / "home")},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            lines = iter(proc.stdout.readline, "")
            said = next(ln for ln in lines if "cannot be written" in ln and "{" not in ln)
            assert "waiting until it can be written" in said, said
            assert proc.poll() is None  # still there: nothing for a supervisor to restart
            ballast.unlink()
            started = next(ln for ln in lines if "listening on" in ln or "Traceback" in ln)
            assert "listening on" in started, started
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        assert proc.returncode == 0


def test_a_rank_that_failed_on_its_own_is_the_cause_even_when_its_peer_reported_first(rig):
    """A worker's disk fills: its rank exits 8 naming the disk, but its peer's "lost a peer"
    (exit 5) may reach the coordinator first and start a restart. The late exit of the attempt
    it failed is the cause: the job fails naming the disk, not retried onto the same disk (an
    outside run). A late non-finite step (9) is left to the rollback policy."""
    s, workers, launcher, clock = rig
    j = s.submit(_job(max_restarts=3))
    s.tick()
    s.on_exit(j.job_id, 1, 0, "w1", PeerLostError.exit_code, "lost a peer of the MLX group")
    assert _state(s, j.job_id)[0] is JobState.RESTARTING
    s.on_exit(j.job_id, 1, 1, "w2", NumericalError.exit_code, "non-finite loss")
    assert _state(s, j.job_id)[0] is JobState.RESTARTING
    s.on_exit(j.job_id, 1, 1, "w2", StorageError.exit_code,
              "the worker's disk holding /w2/jobs cannot be written: No space left on device")
    state, _, message = _state(s, j.job_id)
    assert state is JobState.FAILED and message == (
        "attempt 1 failed: rank 1 on w2 exited with code 8: the worker's disk holding /w2/jobs "
        "cannot be written: No space left on device")


def test_a_rank_event_on_a_full_worker_disk_is_a_storage_error_naming_it(tmp_path):
    """The rank's event file on a full disk: exit 8 naming the folder (it was a traceback,
    exit 1)."""
    from worker.rank.events import Done, EventLog

    with tiny_disk(tmp_path / "disk", "256k") as disk:
        log = EventLog(disk / "events.jsonl")
        _fill(disk)
        with pytest.raises(StorageError, match=f"the worker's disk holding {disk} cannot be "
                                               "written: No space left on device"):
            for _ in range(10_000):  # (until the page cache's last free block is used)
                log.append(Done(rank=0, iteration=1))


def test_a_submit_to_a_full_coordinator_disk_is_a_storage_error_before_a_worker_is_touched(
        tmp_path, monkeypatch):
    """The uploaded dataset is checked through links written in the state folder: on a disk
    the rank logs had filled, `herd submit` failed as "Exception calling application: [Errno 28]"
    (exit 1, seen in CI). Under the reserve it is refused by name (exit 8); a disk that fills
    between that check and the links is the same StorageError."""
    from coordinator import artifacts
    from coordinator.artifacts import BlobStore
    from coordinator.jobs import new_job

    with tiny_disk(tmp_path / "disk", "8m") as disk:
        blobs = BlobStore(disk / "blobs")
        train = b'{"text": "hello"}\n' * 4
        sha = hashlib.sha256(train).hexdigest()
        blobs.put(sha, [train])
        dataset = [FileDigest("train.jsonl", sha, len(train))]

        def submit():
            return new_job("j", "model: m/x\ndata: d\nbatch_size: 4\n", dataset, blobs)

        assert submit().job_id.startswith("j-")  # room: taken
        ballast = _fill(disk)
        with pytest.raises(StorageError, match=f"disk holding {disk} is full: a new job") as e:
            submit()
        assert e.value.exit_code == 8
        # The reserve check passed (a disk that filled just after): the links' ENOSPC is named.
        monkeypatch.setattr(artifacts, "_free_bytes", lambda folder: 1 << 30)
        with pytest.raises(StorageError, match=f"disk holding {disk} failed writing the links"):
            submit()
        ballast.unlink()
        assert not list(disk.glob(".dataset-view-*"))  # nothing left behind


def test_rank_logs_leave_the_reserve_to_the_job_database_and_checkpoints(tmp_path):
    """A rank log piece that would eat into artifacts.RESERVE_BYTES is refused (the agent keeps
    it and sends it again), so logs cannot fill the disk under SQLite; taken once there is
    room, at the same offset."""
    from coordinator.artifacts import RESERVE_BYTES
    from coordinator.logs import LogStore

    with tiny_disk(tmp_path / "disk", "8m") as disk:
        logs = LogStore(disk / "logs")
        logs.write("j-1", 1, 0, 0, b"first\n")
        ballast = disk / "ballast"
        ballast.write_bytes(b"\0" * (8 * 1024 * 1024 - RESERVE_BYTES - 64 * 1024))
        with pytest.raises(StorageError, match=f"disk holding {disk / 'logs'} is full: rank 0's "
                                               "log needs"):
            logs.write("j-1", 1, 0, 6, b"x" * 128 * 1024)
        assert logs.read("j-1", 1, 0, 0) == b"first\n"
        ballast.unlink()
        logs.write("j-1", 1, 0, 6, b"second\n")
        assert logs.read("j-1", 1, 0, 0) == b"first\nsecond\n"


def test_a_failed_herd_rm_leaves_the_job_database_as_it_was_and_writable(tmp_path):
    """A DELETE that fails part-way (a trigger stands in for the disk's I/O error) is a
    StorageError with everything of the job still there; the connection is left outside any
    transaction, so a later write survives a restart and a later `herd rm` works. (It stayed
    inside: later writes were lost at the next stop, every later rm failed: a review.)"""
    clock = Clock()
    store = JobStore(tmp_path / "herd.db")
    s = Scheduler(store, lambda: [worker(1), worker(2)], StopLog(), clock)
    j = s.submit(_job())
    s.tick()
    s.on_checkpoint(_ckpt(j.job_id, 2, clock))
    s.cancel(j.job_id)
    store._db.execute("CREATE TRIGGER failing BEFORE DELETE ON checkpoints "
                      "BEGIN SELECT RAISE(ABORT, 'disk I/O error'); END")
    with pytest.raises(StorageError, match="disk I/O error"):
        store.delete_job(j.job_id)
    assert not store._db.in_transaction
    assert store.get_job(j.job_id).state is JobState.CANCELLED  # (rolled back: all still there)
    later = s.submit(_job(iters=12))
    store.close()
    store = JobStore(tmp_path / "herd.db")
    assert {x.job_id for x in store.list_jobs()} == {j.job_id, later.job_id}
    store._db.execute("DROP TRIGGER failing")
    store.delete_job(j.job_id)
    assert [x.job_id for x in store.list_jobs()] == [later.job_id]
    assert not store.checkpoints(j.job_id)
    assert not store._db.execute("SELECT * FROM rank_exits WHERE job_id=?",
                                 (j.job_id,)).fetchall()
    store.close()


def test_what_arrives_for_a_removed_job_is_not_kept_and_a_submit_in_flight_keeps_its_data(
        tmp_path):
    """`herd rm` beside a checkpoint upload and a submit (a review): the checkpoint that arrives
    after is refused and adds no record (it re-created the job's folder and a row nothing
    listed); a removed job's adapter folder left behind goes with the hourly sweep; a dataset a
    submit has just been told is held (MissingBlobs touches it) is not removed with the job."""
    from coordinator import housekeeping
    from coordinator.artifacts import BlobStore
    from herd.errors import NotFoundError

    clock = Clock()
    store = JobStore(tmp_path / "herd.db")
    s = Scheduler(store, lambda: [worker(1), worker(2)], StopLog(), clock)
    j, other = s.submit(_job()), s.submit(_job(iters=12))
    s.tick()
    s.cancel(j.job_id)
    housekeeping.delete_ended_job(store, j.job_id)
    with pytest.raises(NotFoundError):
        s.on_checkpoint(_ckpt(j.job_id, 2, clock))
    assert not store.checkpoints(j.job_id)

    adapters = AdapterStore(tmp_path / "adapters")
    for name in (j.job_id, other.job_id, "gone-2"):
        (adapters.root / name / "0000002").mkdir(parents=True)
    os.utime(adapters.root / "gone-2", (0, 0))
    os.utime(adapters.root / j.job_id, (0, 0))
    assert housekeeping.sweep_adapters(store, adapters, time.time()) == 2
    assert sorted(p.name for p in adapters.root.iterdir()) == [other.job_id]

    blobs = BlobStore(tmp_path / "blobs")
    fresh, old = hashlib.sha256(b"fresh").hexdigest(), hashlib.sha256(b"old").hexdigest()
    blobs.put(fresh, [b"fresh"])
    blobs.put(old, [b"old"])
    os.utime(blobs.root / old, (0, 0))
    housekeeping.remove_unused({fresh, old}, store, type("Models", (), {"list": list})(), blobs)
    assert (blobs.has(fresh), blobs.has(old)) == (True, False)


def test_a_full_disk_is_a_health_state_and_a_clear_refusal_not_a_traceback_loop(tmp_path,
                                                                                capsys):
    """SQLite on a real full disk: writes raise StorageError naming the database and its disk,
    the loop logs the degradation once (not once per tick) and says when it recovers; a
    checkpoint that does not fit is refused before a byte is written."""
    with tiny_disk(tmp_path / "disk", "1m") as disk:
        store = JobStore(disk / "herd.db")
        adapters = AdapterStore(disk / "adapters")
        workers = [worker(1), worker(2)]
        clock = Clock()
        s = Scheduler(store, lambda: list(workers), StopLog(), clock)
        s.submit(_job())
        ballast = _fill(disk)
        with pytest.raises(StorageError) as e:
            s.submit(_job(iters=12))
        assert f"the job database {disk / 'herd.db'} cannot be written" in e.value.message
        assert "MB free on its disk" in e.value.message
        assert s.health == e.value.message
        with pytest.raises(StorageError, match=f"disk holding {disk / 'adapters'} is full"):
            _store_checkpoint(adapters, "j-1", 2, b"x" * 1000, 0)
        assert not list((disk / "adapters").rglob("*.safetensors"))
        stop = threading.Event()
        loop = threading.Thread(target=control_loop, args=(s, stop, 0.01))
        loop.start()
        try:
            # The queued job cannot be placed (its state change cannot be written): the loop
            # waits out the degradation (5 s between tries) instead of a traceback per tick.
            stop.wait(1.0)
            ballast.unlink()  # space again: the next write clears the health state
            for _ in range(600):
                if store.list_jobs()[0].state is JobState.RUNNING:
                    break
                stop.wait(0.05)
        finally:
            stop.set()
            loop.join(timeout=30)
        err = capsys.readouterr().err
        assert err.count("coordinator_degraded") == 1, err
        assert "scheduler_tick_failed" not in err
        assert s.health == "" and store.list_jobs()[0].state is JobState.RUNNING
        store.close()


def test_a_job_that_lost_a_worker_for_good_shrinks_and_grows_back_at_a_checkpoint(tmp_path):
    workers = [worker(1), worker(2)]
    launcher, clock = StopLog(), Clock()
    s = Scheduler(JobStore(tmp_path / "db"), lambda: list(workers), launcher, clock,
                  elastic_grace_s=60)
    j = s.submit(_job(iters=40))
    s.tick()
    s.on_checkpoint(_ckpt(j.job_id, 8, clock))
    lost = workers.pop(1)
    s.on_worker_lost(lost.worker_id)
    clock.t += 30
    s.tick()
    assert _state(s, j.job_id)[0] is JobState.RESTARTING  # within the grace period: it waits
    clock.t += 31
    s.tick()
    state, attempt, message = _state(s, j.job_id)
    assert (state, attempt) == (JobState.RUNNING, 2)
    placing = [e.message for e in s.store.events(j.job_id) if e.state is JobState.PLACING][-1]
    assert placing == ("starting 1 ranks on w1, resuming from checkpoint 8; shrunk to 1 of 2 "
                       "workers after waiting 61s for the rest (the same global batch of 4, over 1 "
                       "ranks); it grows back at a checkpoint once workers return")
    one = launcher.started[-1]
    assert (one.rank, one.ring_hosts, one.resume_step) == (0, ["10.0.0.1:8001"], 8)
    s.on_checkpoint(_ckpt(j.job_id, 12, clock))  # nobody is back yet: it carries on
    assert _state(s, j.job_id)[0] is JobState.RUNNING
    workers.append(lost)  # back
    s.on_checkpoint(_ckpt(j.job_id, 16, clock))
    state, _, message = _state(s, j.job_id)
    assert (state, message) == (JobState.RESTARTING, "growing back to 2 workers from checkpoint "
                                "16: enough are free again")
    s.tick()
    assert _state(s, j.job_id)[:2] == (JobState.RUNNING, 3)
    assert [la.resume_step for la in launcher.started[-2:]] == [16, 16]
    assert [a.outcome for a in s.store.attempt_history(j.job_id)] == [
        "restarting", "grown", None]


def test_a_shrunk_job_shows_its_new_attempts_ranks_once_they_report(tmp_path):
    """2 ranks at iteration 30, one worker lost for good, the job shrunk to 1 rank resuming from
    checkpoint 8: until the new attempt reports, `herd jobs` and the dashboard show where the
    last one got; then only the new attempt's rank (every attempt's mixed, they showed 30 until
    the new one passed it, and /metrics kept the gone rank: a review)."""
    from coordinator.domain import RankProgress
    from coordinator.web.hub import MetricsHub

    workers = [worker(1), worker(2)]
    launcher, clock = StopLog(), Clock()
    s = Scheduler(JobStore(tmp_path / "db"), lambda: list(workers), launcher, clock,
                  elastic_grace_s=60)
    hub = MetricsHub(s.store, lambda t: None)
    j = s.submit(_job(iters=40))
    s.tick()
    s.on_checkpoint(_ckpt(j.job_id, 8, clock))
    for rank in (0, 1):
        s.on_progress(j.job_id, 1, RankProgress(rank=rank, worker_id=f"w{rank + 1}",
                                                iteration=30, train_loss=2.0))
    s.on_worker_lost(workers.pop(1).worker_id)
    clock.t += 61
    s.tick()
    assert _state(s, j.job_id)[:2] == (JobState.RUNNING, 2)
    hub.poll()
    assert [p.iteration for p in s.store.shown_progress(j.job_id, 2)] == [30, 30]
    assert hub.job(j.job_id)["iteration"] == 30
    clock.t += 1
    s.on_progress(j.job_id, 2, RankProgress(rank=0, worker_id="w1", iteration=9, train_loss=1.5))
    hub.poll()
    assert [(p.rank, p.iteration) for p in s.store.shown_progress(j.job_id, 2)] == [(0, 9)]
    view = {v.job_id: v for v in hub.views()}[j.job_id]
    assert (view.iteration, sorted(view.ranks)) == (9, [0])
    assert view.iterations_done == 30  # (the counter /metrics exports still only moves forward)


class Written:
    """What the stored checkpoints were written as (AdapterStore.cut_of: each stage's blocks, ()
    for data parallel), as the test sets it; every one intact."""

    def __init__(self):
        self.cuts: dict[tuple[str, int], tuple] = {}

    def verify(self, checkpoint):
        return None

    def cut_of(self, job_id: str, step: int) -> tuple:
        return self.cuts.get((job_id, step), ())


class Llama70B:
    """The job's model as the coordinator reads it (ModelCatalog): a 70B config.json."""

    def config(self, job):
        from tests.test_planner import LLAMA_70B

        return LLAMA_70B

    def source(self, job):
        from coordinator.domain import ModelSource

        return ModelSource()


GB = 1 << 30
BIG = {"model": "/nonexistent/llama-70b", "data": "d", "num_layers": -1, "iters": 40,
       "quantize": {"bits": 4}, "grad_checkpoint": True}


def _big_job(name: str, batch_size: int, cluster: dict):
    from coordinator.domain import Job

    cfg = parse_config({**BIG, "batch_size": batch_size, "cluster": cluster})
    return Job(job_id=name, name=name, config=cfg, dataset=[FileDigest("train.jsonl", "a" * 64,
               10)], workers_needed=cluster["workers"], iters=40)


def test_a_restart_keeps_the_layout_its_checkpoint_was_written_in(tmp_path):
    """A 70B job with parallelism auto, cut into 2 stages on two 48 GB Macs, restarted on two
    64 GB ones, where the planner alone would run it data parallel (and the stages' checkpoint
    would resume from iteration 1) or cut it elsewhere (and every stage would refuse its piece):
    the restart keeps the checkpoint's stages and blocks. A data-parallel checkpoint likewise
    keeps its job data parallel, waiting, named, where only a pipeline would fit."""
    workers = [worker(1, mem=48 * GB), worker(2, mem=48 * GB)]
    launcher, clock, written = StopLog(), Clock(), Written()
    s = Scheduler(JobStore(tmp_path / "db"), lambda: list(workers), launcher, clock,
                  models=Llama70B(), checkpoints=written, restart_policy=RestartPolicy(base_s=0))
    j = s.submit(_big_job("auto", 2, {"workers": 2, "max_restarts": 5}))
    s.tick()
    cut = ((0, 32), (32, 80))
    assert launcher.started[-1].stage_layers == cut  # the planner's choice on 48 GB
    written.cuts[(j.job_id, 8)] = cut
    s.on_checkpoint(_ckpt(j.job_id, 8, clock))
    workers[:] = [worker(3, mem=64 * GB), worker(4, mem=64 * GB)]  # (alone: data parallel)
    s.on_worker_lost("w1", "revoked")
    s.tick()
    assert _state(s, j.job_id)[:2] == (JobState.RUNNING, 2)
    assert [(la.stage_layers, la.resume_step) for la in launcher.started[-2:]] == [(cut, 8)] * 2
    s.cancel(j.job_id)

    d = s.submit(_big_job("dp", 2, {"workers": 2, "max_restarts": 5}))
    s.tick()
    assert launcher.started[-1].job.job_id == d.job_id and launcher.started[-1].stage_layers == ()
    s.on_checkpoint(_ckpt(d.job_id, 8, clock))  # written data parallel: cut_of says ()
    workers[:] = [worker(5, mem=48 * GB), worker(6, mem=48 * GB)]  # (alone: 2 stages)
    s.on_worker_lost("w3", "revoked")
    s.tick()
    state, attempt, message = _state(s, d.job_id)
    assert (state, attempt) == (JobState.RESTARTING, 1)
    assert "its checkpoint was written data parallel, the layout every later attempt keeps" in (
        message)


def test_a_data_by_pipeline_job_shrinks_by_whole_replicas_and_grows_back(tmp_path):
    """2 x 2 (data x pipeline) on four Macs; one is lost for good: after the grace the job goes
    on as 1 x 2 with the same blocks per stage (its checkpoint's), and grows back to 2 x 2 at a
    checkpoint once the Mac returns. (The ranks' side of it: tests/test_pipeline.py.)"""
    workers = [worker(i, mem=64 * GB) for i in range(1, 5)]
    launcher, clock, written = StopLog(), Clock(), Written()
    s = Scheduler(JobStore(tmp_path / "db"), lambda: list(workers), launcher, clock,
                  models=Llama70B(), checkpoints=written, elastic_grace_s=60)
    j = s.submit(_big_job("pp", 4, {"workers": 4, "parallelism": {"pipeline": 2}}))
    s.tick()
    cut = ((0, 32), (32, 80))
    assert [la.stage_layers for la in launcher.started] == [cut] * 4
    assert launcher.started[-1].data_parallel == 2
    for step in (8, 16, 24):
        written.cuts[(j.job_id, step)] = cut
    s.on_checkpoint(_ckpt(j.job_id, 8, clock))
    lost = workers.pop(1)
    s.on_worker_lost(lost.worker_id)
    clock.t += 61
    s.tick()
    assert _state(s, j.job_id)[:2] == (JobState.RUNNING, 2)
    two = launcher.started[-2:]
    assert [(la.stage_layers, la.data_parallel, la.resume_step) for la in two] == [(cut, 1, 8)] * 2
    assert lost.worker_id not in [la.worker.worker_id for la in two]
    placing = [e.message for e in s.store.events(j.job_id) if e.state is JobState.PLACING][-1]
    assert "shrunk to 2 of 4 workers after waiting 61s for the rest (the same global batch of 4, " \
           "over 1 replicas of 2 stages)" in placing, placing
    s.on_checkpoint(_ckpt(j.job_id, 16, clock))  # nobody back: it carries on
    assert _state(s, j.job_id)[0] is JobState.RUNNING
    workers.append(lost)
    s.on_checkpoint(_ckpt(j.job_id, 24, clock))
    assert _state(s, j.job_id)[0] is JobState.RESTARTING
    s.tick()
    assert _state(s, j.job_id)[:2] == (JobState.RUNNING, 3)
    assert [(la.stage_layers, la.data_parallel, la.resume_step)
            for la in launcher.started[-4:]] == [(cut, 2, 24)] * 4


def test_a_job_placed_on_fewer_workers_than_it_asked_does_not_restart_at_each_checkpoint(
        tmp_path):
    """3 workers asked, one with too little memory: the planner runs it on 2; a checkpoint must
    not 'grow it back' onto the same 2 (it restarted its ranks at every one: an outside run)."""
    workers = [worker(1, mem=192 * GB), worker(2, mem=192 * GB), worker(3, mem=1 * GB)]
    launcher, clock, written = StopLog(), Clock(), Written()
    s = Scheduler(JobStore(tmp_path / "db"), lambda: list(workers), launcher, clock,
                  models=Llama70B(), checkpoints=written)
    j = s.submit(_big_job("three", 6, {"workers": 3}))
    s.tick()
    assert _state(s, j.job_id)[:2] == (JobState.RUNNING, 1)
    assert [(la.worker.worker_id, la.stage_layers) for la in launcher.started] == [
        ("w1", ()), ("w2", ())]  # (data parallel on the two that hold it)
    s.on_checkpoint(_ckpt(j.job_id, 8, clock))
    assert _state(s, j.job_id)[:2] == (JobState.RUNNING, 1) and not launcher.stopped


def test_a_single_pipeline_does_not_shrink():
    """Losing a stage's Mac leaves nothing whole to run on: it waits (the same layout)."""
    from coordinator.elastic import shrink_placement

    pp = parse_config({**BIG, "batch_size": 2, "cluster": {"workers": 2,
                                                            "parallelism": {"pipeline": 2}}})
    assert shrink_placement(pp, [worker(1, mem=192 * GB)], Llama70B().config(None),
                            ((0, 32), (32, 80))) is None


def test_the_adapter_store_says_which_blocks_each_stage_wrote(tmp_path):
    from herd.digest import file_digest
    from herd.rpc.files import send_files
    from herd.stage_cut import StagePiece
    from tests.test_service_units import _stage_checkpoint

    adapters = AdapterStore(tmp_path / "adapters")
    names = ["model.layers.0.q.lora_a"]
    for index, (start, end) in enumerate([(0, 2), (2, 3)]):
        folder = _stage_checkpoint(tmp_path / f"s{index}", 4, names, 1.0)
        files = [file_digest(p) for p in sorted(folder.iterdir())]
        adapters.receive_piece("j", 4, StagePiece(index, 2, start, end), files,
                               send_files(folder, files), 0)
    assert adapters.cut_of("j", 4) == ((0, 2), (2, 3))
    assert adapters.cut_of("j", 8) == ()  # (no pieces: data parallel wrote it)


def test_a_shrunk_job_keeps_the_most_ranks_the_workers_left_hold():
    """A 4-worker job (batch 4) with 3 idle workers left runs on 3 (token weighting splits 4 as
    2, 1, 1); with mlx-lm's averaging, which needs an even split, on 2; one busy worker is not
    counted."""
    from coordinator.elastic import shrink_placement

    four = parse_config({"model": "/nonexistent/model", "data": "data", "batch_size": 4,
                         "cluster": {"workers": 4}})
    left = [worker(1), worker(2), worker(3)]
    assert len(shrink_placement(four, left).worker_ids) == 3
    mean = parse_config({"model": "/nonexistent/model", "data": "data", "batch_size": 4,
                         "cluster": {"workers": 4, "gradient_average": "mlx_lm"}})
    assert len(shrink_placement(mean, left).worker_ids) == 2
    left[0].running_job_id = "other"
    assert len(shrink_placement(four, left).worker_ids) == 2


def _cut_off(s, workers, j) -> list:
    """``j`` placed and running on every worker, then none of them answers the coordinator's
    health checks (its own link cut): the workers that were cut."""
    s.tick()
    for w in workers:
        w.running_job_id, w.running_attempt = j.job_id, 1
    cut = list(workers)
    workers.clear()
    for w in cut:
        s.on_worker_lost(w.worker_id, "health failed 2 times: unreachable", True)
    return cut


def test_a_worker_that_stops_answering_is_waited_for_and_its_attempt_re_adopted(rig):
    """The coordinator's own link drops (both workers stop answering its health checks) while
    the ranks train on: the attempt is not restarted; once the workers answer again running it,
    it is re-adopted, nothing redone. A worker that never comes back fails the attempt after
    the grace; one back without its rank, once its exit report had time to arrive; a rank that
    fails meanwhile, and a revoked worker, at once."""
    s, workers, launcher, clock = rig
    j = s.submit(_job(iters=40, max_restarts=9))
    cut = _cut_off(s, workers, j)
    clock.t += 59
    s.tick()
    assert _state(s, j.job_id) == (JobState.RUNNING, 1, (
        "workers w1, w2 stopped answering the coordinator: waiting for them (their ranks "
        "may train on)")) and launcher.stopped == []
    for w in cut:  # the link is back: admitted again (Describe), before a Health says which
        w.running_attempt = 0  # attempt they run: not yet a verdict
    workers.extend(cut)
    s.tick()
    assert s.reconcile.adopting and "re-adopted" not in s.store.events(j.job_id)[-1].message
    for w in cut:
        w.running_attempt = 1
    s.tick()
    assert _state(s, j.job_id) == (JobState.RUNNING, 1, "") and launcher.stopped == []
    events = [e.message for e in s.store.events(j.job_id)]
    assert events[-3:-1] == [
        f"worker {w} stopped answering the coordinator (health failed 2 times: unreachable); its "
        f"ranks may train on: waiting up to 60s for it before restarting attempt 1 (a rank that "
        "lost it fails sooner)" for w in ("w1", "w2")]  # one deadline for both
    assert events[-1] == ("re-adopted attempt 1: its ranks trained on while workers w1, w2 did "
                          "not answer the coordinator")

    # Gone for good: restarted from its last checkpoint once the grace is over.
    s.on_checkpoint(_ckpt(j.job_id, 8, clock))
    gone = workers.pop(1)
    s.on_worker_lost(gone.worker_id, "health failed 2 times: unreachable", True)
    clock.t += 61
    s.tick()
    state, attempt, message = _state(s, j.job_id)
    assert (state, attempt) == (JobState.RESTARTING, 1)
    assert message.startswith("attempt 1 failed: worker w2 was lost: health failed 2 times: "
                              "unreachable; not back within 60s; restarting from checkpoint 8")
    workers.append(gone)
    gone.running_job_id = workers[0].running_job_id = ""
    clock.t += 5
    s.tick()
    assert _state(s, j.job_id)[:2] == (JobState.RUNNING, 2)
    for w in workers:
        w.running_job_id, w.running_attempt = j.job_id, 2

    # Back at once, but its rank is gone (its agent restarted): the exit report's wait, no more.
    s.on_worker_lost("w2", "health failed 2 times: unreachable", True)
    workers[1].running_job_id, workers[1].running_attempt = "", 0
    s.tick()
    assert _state(s, j.job_id)[0] is JobState.RUNNING
    clock.t += s.reconcile.lost_rank_grace_s + 1
    s.tick()
    state, attempt, message = _state(s, j.job_id)
    assert (state, attempt) == (JobState.RESTARTING, 2)
    assert "worker w2 is no longer running its rank" in message
    clock.t += 10
    s.tick()
    for w in workers:
        w.running_job_id, w.running_attempt = j.job_id, 3

    # A rank that fails while its peer's worker is waited for ends the attempt as before.
    s.on_worker_lost("w2", "health failed 2 times: unreachable", True)
    s.on_exit(j.job_id, 3, 0, "w1", PeerLostError.exit_code, "lost a peer of the MLX group")
    assert _state(s, j.job_id)[:2] == (JobState.RESTARTING, 3)
    clock.t += 20
    s.tick()
    assert _state(s, j.job_id)[:2] == (JobState.RUNNING, 4)

    # Revoked: shut out, not waited for.
    s.on_worker_lost("w2", "revoked")
    state, _, message = _state(s, j.job_id)
    assert state is JobState.RESTARTING and "worker w2 was lost: revoked" in message


def test_a_coordinator_cut_off_from_every_worker_waits_on_and_re_adopts_what_trained_meanwhile(
        rig):
    """The coordinator's own cable is pulled for two minutes: no worker at all answers it, while
    the ranks train on and their agents keep the checkpoints. Past the 60 s grace the attempt is
    not failed (an outside run: it was, and 1,700 iterations were redone): it waits on, up to
    the placement timeout, and is re-adopted when the workers answer again, one after the other,
    nothing stopped. Past that longer wait it fails as before, saying how long it waited."""
    s, workers, launcher, clock = rig
    j = s.submit(_job(iters=4000, max_restarts=9))
    cut = _cut_off(s, workers, j)
    clock.t += 61
    s.tick()
    state, attempt, message = _state(s, j.job_id)
    assert (state, attempt) == (JobState.RUNNING, 1), message
    assert message.startswith("no worker answers the coordinator (its own link, most likely)")
    assert "waiting up to 600s more" in s.store.events(j.job_id)[-1].message
    clock.t += 60  # 121 s: the cable is back; w2 answers a second before w1
    workers.append(cut[1])
    s.tick()
    assert _state(s, j.job_id)[:2] == (JobState.RUNNING, 1)  # not shrunk onto w2, not failed
    clock.t += 1
    workers.insert(0, cut[0])
    s.tick()
    assert _state(s, j.job_id) == (JobState.RUNNING, 1, "") and launcher.stopped == []
    assert s.store.events(j.job_id)[-1].message.startswith("re-adopted attempt 1")

    # Cut off again, for longer than the longer wait: restarted, saying how long it waited.
    workers.clear()
    for w in cut:
        s.on_worker_lost(w.worker_id, "health failed 2 times: unreachable", True)
    clock.t += 61
    s.tick()
    assert _state(s, j.job_id)[0] is JobState.RUNNING
    clock.t += 600
    s.tick()
    state, attempt, message = _state(s, j.job_id)
    assert (state, attempt) == (JobState.RESTARTING, 1)
    assert "not back within 660s" in message, message


def test_a_ray_job_after_a_coordinator_restart_is_not_held_by_the_agents_cut_off_wait(tmp_path):
    """The cut-off wait is for a job's own backend: a Ray-only cluster has no agents at all, and
    a Ray attempt's actors die with the coordinator (the driver), so after a restart it resumes
    from its checkpoint at the end of the re-adoption grace, not 600 s later."""
    from coordinator.backend import AgentBackend

    nodes = [worker(7, resources={"herd_worker": 1.0}), worker(8, resources={"herd_worker": 1.0})]
    clock, store = Clock(), JobStore(tmp_path / "db")

    def coordinator() -> Scheduler:  # no agents; the Ray nodes as the backend reports them
        s = Scheduler(store, lambda: [], FakeLauncher(), clock, placement_timeout_s=600,
                      adopt_grace_s=30)
        s._backends["ray"] = AgentBackend(lambda: list(nodes), FakeLauncher())
        return s

    s = coordinator()
    j = job(workers=2)
    j.config = parse_config({**j.config.model_dump(exclude_unset=True),
                             "cluster": {"workers": 2, "backend": "ray"}})
    s.submit(j)
    s.tick()
    assert store.get_job(j.job_id).state is JobState.RUNNING
    s = coordinator()  # restarted: its actors are gone with the old driver
    s.reconcile.recover()
    clock.t += 31
    s.tick()
    state, message = store.get_job(j.job_id).state, store.get_job(j.job_id).message
    assert state is not JobState.RUNNING or "no worker answers" not in message, message
    assert "could not re-adopt" in " ".join(e.message for e in store.events(j.job_id))


def test_a_worker_that_never_answers_again_counts_towards_the_elastic_grace_from_the_start(
        tmp_path):
    """Waiting for an unreachable worker does not add to the elastic grace: a worker gone for
    good has been gone since it stopped answering, and the job shrinks --elastic-grace after
    that, as it did when a lost worker failed the attempt at once."""
    workers = [worker(1), worker(2)]
    launcher, clock = StopLog(), Clock()
    s = Scheduler(JobStore(tmp_path / "db"), lambda: list(workers), launcher, clock,
                  elastic_grace_s=60, unreachable_grace_s=45)
    j = s.submit(_job(iters=40))
    s.tick()
    s.on_checkpoint(_ckpt(j.job_id, 8, clock))
    s.on_worker_lost(workers.pop(1).worker_id, "health failed 2 times", True)
    clock.t += 46
    s.tick()
    assert _state(s, j.job_id)[:2] == (JobState.RESTARTING, 1)  # the unreachable grace is over
    clock.t += 10
    s.tick()
    assert _state(s, j.job_id)[:2] == (JobState.RESTARTING, 1)  # 56 s gone: not yet
    clock.t += 5
    s.tick()
    assert _state(s, j.job_id)[:2] == (JobState.RUNNING, 2)
    placing = [e.message for e in s.store.events(j.job_id) if e.state is JobState.PLACING][-1]
    assert "shrunk to 1 of 2 workers after waiting 61s for the rest" in placing, placing


def test_a_short_placement_timeout_still_lets_a_job_shrink_after_the_grace(tmp_path):
    """--placement-timeout below the elastic grace: a job that lost a worker for good must still
    wait out the grace and shrink, not fail at the timeout first."""
    workers = [worker(1), worker(2)]
    launcher, clock = StopLog(), Clock()
    s = Scheduler(JobStore(tmp_path / "db"), lambda: list(workers), launcher, clock,
                  placement_timeout_s=30, elastic_grace_s=60)
    j = s.submit(_job(iters=40))
    s.tick()
    s.on_checkpoint(_ckpt(j.job_id, 8, clock))
    s.on_worker_lost(workers.pop(1).worker_id)
    clock.t += 45  # past the placement timeout, within the grace
    s.tick()
    assert _state(s, j.job_id)[0] is JobState.RESTARTING
    clock.t += 20
    s.tick()
    assert _state(s, j.job_id)[:2] == (JobState.RUNNING, 2)  # shrunk onto w1


def test_a_rank_that_cannot_reach_the_coordinator_at_start_is_retried(rig):
    """A worker whose link just came back may not reach the coordinator yet (its neighbour
    cache still says unreachable): another attempt, not a failed job. A bad model path, which
    another attempt cannot fix, still fails it."""
    from herd.errors import PeerLostError, PlacementError

    s, workers, launcher, clock = rig
    errors = [PeerLostError("198.18.0.1:7450 is unreachable: No route to host")]

    def start_rank(launch):
        if launch.rank == 1 and errors:
            raise errors.pop()
        launcher.started.append(launch)

    launcher.start_rank = start_rank
    j = s.submit(_job())
    s.tick()
    state, _, message = _state(s, j.job_id)
    assert state is JobState.RESTARTING, message
    assert message.startswith("attempt 1 failed: rank 1 could not start on w2: 198.18.0.1:7450 "
                              "is unreachable")
    clock.t += 5
    s.tick()
    assert _state(s, j.job_id)[:2] == (JobState.RUNNING, 2)
    k = s.submit(_job(iters=7))
    workers += [worker(3), worker(4)]
    errors.append(PlacementError("model path /m does not exist on worker w4"))
    s.tick()
    assert _state(s, k.job_id)[0] is JobState.FAILED


def test_a_waiting_job_keeps_the_workers_it_needs_from_later_jobs(rig):
    """First in, first out: a stream of one-worker jobs took each worker as it came free and a
    two-worker job waited for ever; and a restarting job in its backoff lost its worker to a job
    that had only been queued (an outside run)."""
    s, workers, launcher, clock = rig
    a = s.submit(_job(workers=1, iters=100))
    clock.t += 1
    b = s.submit(_job(workers=2))
    clock.t += 1
    c = s.submit(_job(workers=1))
    s.tick()
    assert _state(s, a.job_id)[0] is JobState.RUNNING
    assert _state(s, b.job_id)[0] is JobState.QUEUED  # one worker is free, it needs two
    state, _, message = _state(s, c.job_id)
    assert state is JobState.QUEUED, message  # the free worker is kept for b
    assert message == (f"waiting: queued behind {b.job_id}: first in, first out (the workers "
                       "they wait for are kept for them)")
    s.cancel(a.job_id)
    s.tick()
    assert _state(s, b.job_id)[0] is JobState.RUNNING and _state(s, c.job_id)[0] is JobState.QUEUED
    s.cancel(b.job_id)
    s.tick()
    assert _state(s, c.job_id)[0] is JobState.RUNNING
    # A restarting job in its backoff keeps its worker from a job queued after it started.
    s.cancel(c.job_id)
    s.tick()
    r = s.submit(_job(workers=2, max_restarts=3))
    s.tick()
    s.on_checkpoint(_ckpt(r.job_id, 4, clock))
    clock.t += 1
    late = s.submit(_job(workers=1))
    s.on_exit(r.job_id, 1, 0, "w1", 5, "lost a peer of the MLX group")
    assert _state(s, r.job_id)[0] is JobState.RESTARTING
    s.tick()  # r waits out its backoff
    assert _state(s, late.job_id)[0] is JobState.QUEUED
    clock.t += 60
    s.tick()
    assert _state(s, r.job_id)[:2] == (JobState.RUNNING, 2)
