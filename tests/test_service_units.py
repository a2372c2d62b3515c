"""The control plane without processes: converters, the job state machine stepped with a fake
launcher and clock, the SQLite store across a reopen, and the adapter store's checks."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

from coordinator import convert
from coordinator.artifacts import PIECE_META, AdapterStore, BlobStore
from coordinator.domain import (
    TRANSITIONS,
    Checkpoint,
    EventKind,
    FileDigest,
    Job,
    JobEvent,
    JobState,
    RankProgress,
    WorkerRecord,
    check_transition,
)
from coordinator.placement import policy_refusal
from coordinator.scheduler import Scheduler
from coordinator.store import _MIGRATIONS, JobStore
from herd.config import config_from_yaml, parse_config
from herd.errors import (
    AuthError,
    ChecksumError,
    ConfigError,
    DatasetError,
    HerdError,
    NotFoundError,
    PeerLostError,
    PlacementError,
    StorageError,
)

GB = 1024**3


def worker(i: int, mem: int = 16 * GB, **kw) -> WorkerRecord:
    return WorkerRecord(worker_id=f"w{i}", host=f"10.0.0.{i}", port=7000 + i, ring_port=8000 + i,
                        exchange_port=9000 + i, memory_bytes=mem, free_memory_bytes=mem,
                        chip="Apple M2 Ultra", **kw)


def job(workers: int = 2, iters: int = 10, model: str = "/nonexistent/model") -> Job:
    cfg = {"model": model, "data": "data", "iters": iters, "num_layers": -1,
           "batch_size": 4 if 4 % workers == 0 else 4 * workers,  # splits over the workers
           "cluster": {"workers": workers}}
    return Job(job_id=f"j{workers}-{iters}", name="t", config=parse_config(cfg),
               dataset=[FileDigest("train.jsonl", "a" * 64, 10)], workers_needed=workers,
               iters=iters)


# --- converters ------------------------------------------------------------------------------

def test_converters_round_trip():
    p = RankProgress(rank=1, worker_id="w2", iteration=7, train_loss=1.5, val_loss=2.5,
                     learning_rate=1e-4, tokens_per_second=900.0, trained_tokens=1234,
                     peak_memory_gb=0.5, exchange="mlx", world_size=2)
    assert convert.progress_from_pb(convert.progress_to_pb(p)) == p
    w = worker(3, running_job_id="x", model_roots=("/models", "/hf"), allow_remote_code=True,
               cached_models=("d" * 64,))
    assert convert.worker_from_pb(convert.worker_to_pb(w)) == w
    c = Checkpoint("j", 20, [FileDigest("adapters.safetensors", "b" * 64, 99)], 1700)
    assert convert.checkpoint_from_pb(convert.checkpoint_to_pb(c)) == c
    for e in [JobEvent("j", 1, 5, EventKind.STATE, JobState.FAILED, "why"),
              JobEvent("j", 2, 6, EventKind.PROGRESS, progress=p, step=7),
              JobEvent("j", 3, 7, EventKind.CHECKPOINT, step=20, message="stored")]:
        assert convert.event_from_pb(convert.event_to_pb(e)) == e
    for s in JobState:
        assert convert.state_from_pb(convert.state_to_pb(s)) is s


# --- the state machine -----------------------------------------------------------------------

class FakeLauncher:
    def __init__(self, fail_rank: int | None = None):
        self.started, self.stopped, self.fail_rank = [], [], fail_rank

    def prepare_rank(self, launch, on_progress):
        pass

    def start_rank(self, launch):
        if launch.rank == self.fail_rank:
            raise HerdError("model path missing")
        self.started.append(launch)

    def stop_job(self, w, job_id, attempt=0):
        self.stopped.append((w.worker_id, job_id))


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


@pytest.fixture
def rig(tmp_path):
    workers: list[WorkerRecord] = []
    launcher, clock = FakeLauncher(), Clock()
    s = Scheduler(JobStore(tmp_path / "db"), lambda: list(workers), launcher, clock,
                  placement_timeout_s=60)
    return s, workers, launcher, clock


def states(s: Scheduler, job_id: str) -> list[str]:
    return [e.state.value for e in s.store.events(job_id) if e.kind is EventKind.STATE]


def test_job_waits_with_a_reason_then_runs_and_succeeds(rig):
    s, workers, launcher, clock = rig
    workers.append(worker(1))
    j = s.submit(job(workers=2))
    s.tick()
    got = s.store.get_job(j.job_id)
    assert got.state is JobState.QUEUED
    assert got.message == "waiting: needs 2 workers, 1 verified: missing 1"
    workers.append(worker(2, mem=32 * GB))
    s.tick()
    got = s.store.get_job(j.job_id)
    assert got.state is JobState.RUNNING
    assert got.worker_ids == ["w2", "w1"]  # most free memory first
    ring = launcher.started[0].ring_hosts
    assert ring == ["10.0.0.2:8002", "10.0.0.1:8001"]
    peers = [la.exchange_peers for la in launcher.started]
    assert peers == [["10.0.0.2:9002", "10.0.0.1:9001"]] * 2
    assert not s.on_progress(j.job_id, 1, RankProgress(rank=0, iteration=3, train_loss=2.0))
    # Agents report a rank's exit after uploading its checkpoints: the final one is stored.
    s.on_checkpoint(Checkpoint(j.job_id, 10, [FileDigest("adapters.safetensors", "e" * 64, 1)],
                               clock.t * 1000))
    s.on_exit(j.job_id, 1, 0, "w2", 0, "")
    assert s.store.get_job(j.job_id).state is JobState.RUNNING  # rank 1 still running
    s.on_exit(j.job_id, 1, 1, "w1", 0, "")
    assert states(s, j.job_id) == ["queued", "placing", "running", "succeeded"]
    assert s.store.latest_progress(j.job_id)[0].iteration == 3
    assert s.on_progress(j.job_id, 1, RankProgress(rank=0)) is True  # late report: stop


def test_a_waiting_job_says_its_reason_once_until_the_words_or_counts_change(rig):
    """Free memory drifting a tenth of a GB, and the workers named changing order, made a new
    "waiting:" event each tick: 28 four-line ones a minute in `herd watch` (an outside run)."""
    from coordinator.queue import same_wait

    s, workers, launcher, clock = rig
    workers.append(worker(1))
    j = s.submit(job(workers=4, iters=12))
    for _ in range(3):
        s.tick()
    workers.append(worker(2))
    for _ in range(3):
        s.tick()
    said = [e.message for e in s.store.events(j.job_id) if e.message.startswith("waiting:")]
    assert said == ["waiting: needs 4 workers, 1 verified: missing 3",
                    "waiting: needs 4 workers, 2 verified: missing 2"], said
    drifted = ("the job does not fit: needs 78.0 GB on the fullest worker; the largest offers "
               "{} GB. Workers: w128 {} GB, w64 {} GB")
    before = "waiting: " + drifted.format(20.9, 20.9, 20.8)
    assert same_wait(before, drifted.replace("w128 {} GB, w64 {} GB", "w64 {} GB, w128 {} GB")
                     .format(21.0, 21.0, 20.9))
    assert not same_wait(before, drifted.replace("w64", "w96").format(20.9, 20.9, 20.8))


def test_a_job_ending_in_a_partial_accumulation_succeeds_with_its_last_step(rig):
    """iters 7 with accumulation 3: the last optimizer step ends micro-batch 6, whose checkpoint
    is the final adapter (micro-batch 7 is computed and never applied, as in mlx-lm)."""
    s, workers, launcher, clock = rig
    workers += [worker(1), worker(2)]
    j = job(iters=7)
    cfg = j.config.model_dump(exclude_unset=True)
    j.config = parse_config({**cfg, "grad_accumulation_steps": 3})
    s.submit(j)
    s.tick()
    s.on_checkpoint(Checkpoint(j.job_id, 6, [FileDigest("adapters.safetensors", "e" * 64, 1)],
                               clock.t * 1000))
    s.on_exit(j.job_id, 1, 0, "w2", 0, "")
    s.on_exit(j.job_id, 1, 1, "w1", 0, "")
    got = s.store.get_job(j.job_id)
    assert got.state is JobState.SUCCEEDED, got.message


def test_a_job_behind_a_running_one_queues_for_as_long_as_it_runs(rig, tmp_path):
    """Enough workers, all held by another job: a queue, with no deadline, and the waiting line
    says which job holds them. Too few workers at all: the placement timeout holds, counted from
    the coordinator's start when it restarted meanwhile (its downtime is not the job's wait)."""
    s, workers, launcher, clock = rig  # placement_timeout_s=60
    workers += [worker(1), worker(2)]
    first = s.submit(job(iters=10))
    s.tick()
    second = job(iters=20)
    s.submit(second)
    s.tick()
    # its workers say they run its ranks (else, an hour later, the attempt would be given up)
    workers[:] = [dataclasses.replace(w, running_job_id=first.job_id, running_attempt=1)
                  for w in workers]
    clock.t += 3600
    s.tick()
    assert s.store.get_job(first.job_id).state is JobState.RUNNING
    got = s.store.get_job(second.job_id)
    assert got.state is JobState.QUEUED, got.message
    assert got.message == (f"waiting: needs 2 workers, 2 verified (2 busy: running "
                           f"{first.job_id}): 0 free")
    s.on_checkpoint(Checkpoint(first.job_id, 10, [FileDigest("adapters.safetensors", "e" * 64,
                                                             1)], clock.t * 1000))
    s.on_exit(first.job_id, 1, 0, "w2", 0, "")
    s.on_exit(first.job_id, 1, 1, "w1", 0, "")
    workers[:] = [worker(1), worker(2)]
    s.tick()
    assert s.store.get_job(second.job_id).state is JobState.RUNNING
    # Too few at all: the deadline holds, from the later of submit and the coordinator's start.
    three = job(workers=3)
    s.submit(three)
    clock.t += 50
    s.store.close()
    again = Scheduler(JobStore(tmp_path / "db"), lambda: list(workers), FakeLauncher(), clock,
                      placement_timeout_s=60)
    clock.t += 30  # 80 s since submit, 30 since this coordinator started
    again.tick()
    assert again.store.get_job(three.job_id).state is JobState.QUEUED
    clock.t += 31
    again.tick()
    got = again.store.get_job(three.job_id)
    assert got.state is JobState.FAILED and "could not be placed within 60s" in got.message


def test_a_failed_rank_fails_the_job_and_stops_the_others(rig):
    s, workers, launcher, _ = rig
    workers += [worker(1), worker(2)]
    j = s.submit(job())
    s.tick()
    s.on_exit(j.job_id, 1, 1, "w2", 3, "DatasetError: bad line 4")
    got = s.store.get_job(j.job_id)
    assert got.state is JobState.FAILED
    assert got.message == "rank 1 on w2 exited with code 3: DatasetError: bad line 4"
    assert sorted(launcher.stopped) == [("w1", j.job_id), ("w2", j.job_id)]
    assert s.store.attempts(j.job_id) == [(1, ["w1", "w2"], "failed")]


def test_a_rank_that_cannot_start_fails_the_job(rig):
    s, workers, launcher, _ = rig
    workers += [worker(1), worker(2)]
    launcher.fail_rank = 1
    j = s.submit(job())
    s.tick()
    got = s.store.get_job(j.job_id)
    assert got.state is JobState.FAILED
    assert "rank 1 could not start on w2: model path missing" in got.message


def test_a_killed_rank_restarts_from_the_last_checkpoint_until_max_restarts(rig):
    """max_restarts bounds the failures in a row that stored no new checkpoint; each restart
    waits its backoff (coordinator/recovery.py)."""
    s, workers, launcher, clock = rig
    workers += [worker(1), worker(2), worker(3)]
    j = job()
    cfg = j.config.model_dump(exclude_unset=True)
    cfg["cluster"] = {"workers": 2, "max_restarts": 1}
    j.config = parse_config(cfg)
    s.submit(j)
    s.tick()
    s.on_checkpoint(Checkpoint(j.job_id, 4, [FileDigest("adapters.safetensors", "d" * 64, 1)], 0))
    s.on_exit(j.job_id, 1, 1, "w2", -9, "killed by SIGKILL")
    got = s.store.get_job(j.job_id)
    assert got.state is JobState.RESTARTING
    assert got.message == ("attempt 1 failed: rank 1 on w2 exited with code -9: killed by SIGKILL;"
                           " restarting from checkpoint 4 in 5s")
    s.on_exit(j.job_id, 1, 0, "w1", -15, "stopped by the agent")  # the stopped peer: ignored
    s.tick()
    assert s.store.get_job(j.job_id).state is JobState.RESTARTING  # backing off
    clock.t += 5
    s.tick()
    got = s.store.get_job(j.job_id)
    assert (got.state, got.attempt) == (JobState.RUNNING, 2)
    assert [la.resume_step for la in launcher.started[-2:]] == [4, 4]
    s.on_worker_lost(got.worker_ids[0])
    got = s.store.get_job(j.job_id)
    assert got.state is JobState.FAILED and got.message.endswith(
        "was lost (attempt 2); 2 attempts in a row stored no new checkpoint "
        "(cluster.max_restarts: 1)")
    assert [a[2] for a in s.store.attempts(j.job_id)] == ["restarting", "failed"]
    assert states(s, j.job_id) == ["queued", "placing", "running", "restarting", "placing",
                                   "running", "failed"]


def test_reports_of_an_old_attempt_do_not_touch_the_running_one(rig):
    """A rank of attempt 1 stopped late (its agent was cut off) reports its exit, progress and
    log lines while attempt 2 runs: none is taken for attempt 2's."""
    s, workers, launcher, clock = rig
    workers += [worker(1), worker(2)]
    j = s.submit(job())
    s.tick()
    s.on_exit(j.job_id, 1, 1, "w2", -9, "killed by SIGKILL")
    clock.t += 5
    s.tick()
    assert (s.store.get_job(j.job_id).state, s.store.get_job(j.job_id).attempt) == (
        JobState.RUNNING, 2)
    assert not s.on_progress(j.job_id, 2, RankProgress(rank=0, iteration=2, train_loss=3.0))
    s.on_exit(j.job_id, 1, 0, "w1", 7, "lost a peer")  # attempt 1's other rank, at last
    assert s.on_progress(j.job_id, 1, RankProgress(rank=0, iteration=9, train_loss=1.0))
    assert s.on_log(j.job_id, 1, "from attempt 1")
    got = s.store.get_job(j.job_id)
    assert (got.state, got.attempt) == (JobState.RUNNING, 2), got.message
    assert [p.iteration for p in s.store.latest_progress(j.job_id)] == [2]
    assert not any(e.message == "from attempt 1" for e in s.store.events(j.job_id))


def test_the_state_machine_refuses_what_its_table_does_not_allow():
    """Ended jobs stay ended; a job starts by being placed; every state can end."""
    for state in JobState:
        for to in JobState:
            j = dataclasses.replace(job(), state=state)
            if to in TRANSITIONS[state]:
                check_transition(j, to)
            else:
                with pytest.raises(ValueError, match=f"{state.value} -> {to.value}"):
                    check_transition(j, to)
    assert all(not TRANSITIONS[s] for s in JobState if s.final)
    assert JobState.RUNNING not in TRANSITIONS[JobState.QUEUED] | TRANSITIONS[JobState.RESTARTING]
    assert all({JobState.FAILED, JobState.CANCELLED} <= TRANSITIONS[s]
               for s in JobState if not s.final)


def test_a_worker_whose_owner_would_refuse_the_job_is_left_out_and_named(rig):
    """Workers report their owners' policies: a job goes to those that would run it, waits
    naming the others while too few would, and is refused at submit when every verified worker
    would refuse it (the worker's own check stays: tests/test_auth_service.py)."""
    s, workers, launcher, clock = rig
    outside = worker(1, mem=64 * GB, model_roots=("/elsewhere",))  # (the most memory)
    workers += [outside, worker(2, model_roots=("/nonexistent",)), worker(3)]  # (3: no report)
    one = s.submit(job(workers=1))
    s.tick()
    assert s.store.get_job(one.job_id).worker_ids == ["w2"]
    two = s.submit(job(workers=2))  # w2 busy, w1 refuses, w3 idle
    s.tick()
    got = s.store.get_job(two.job_id)
    assert got.state is JobState.QUEUED
    assert got.message == ("waiting: needs 2 workers, 2 verified (1 busy: running j1-10): 1 free"
                           " (w1 would refuse it: the model folder is outside its model roots "
                           "(/elsewhere))")
    with pytest.raises(PlacementError, match="2 of the 3 verified workers would run this job, "
                       "and it needs 3: w1 would refuse it: the model folder is outside"):
        s.submit(job(workers=3))
    code = job(workers=1)
    code.config = parse_config({**code.config.model_dump(exclude_unset=True),
                                "model": "org/model", "trust_remote_code": True})
    workers[2] = worker(3, model_roots=("/nonexistent",))
    with pytest.raises(PlacementError) as e:
        s.submit(code)
    assert e.value.message.startswith("org/model: 0 of the 3 verified workers would run this "
                                       "job, and it needs 1: w1 would refuse it: it runs no code")
    assert "--allow-remote-code" in e.value.hint
    workers[0] = worker(1, model_roots=("/elsewhere",), allow_remote_code=True)
    assert s.submit(code).state is JobState.QUEUED  # one worker runs code: it may go there
    stored = job(workers=3)  # the coordinator's copy: no path on the workers
    stored.model_digest = "d" * 64
    clock.t += 1
    assert not any(policy_refusal(stored, w) for w in workers)


def test_placement_timeout_fails_with_what_is_missing(rig):
    s, workers, _, clock = rig
    j = s.submit(job(workers=3))
    s.tick()
    assert s.store.get_job(j.job_id).state is JobState.QUEUED
    clock.t += 61
    s.tick()
    got = s.store.get_job(j.job_id)
    assert got.state is JobState.FAILED
    assert got.message == "could not be placed within 60s: needs 3 workers, 0 verified: missing 3"


def test_cancel_and_worker_loss(rig):
    s, workers, launcher, _ = rig
    workers += [worker(1), worker(2), worker(3), worker(4)]
    a, b = s.submit(job(workers=2, iters=1)), s.submit(job(workers=2, iters=2))
    s.tick()
    assert s.store.get_job(b.job_id).worker_ids == ["w3", "w4"]  # busy workers are skipped
    assert s.cancel(a.job_id) is JobState.CANCELLED
    assert {w for w, jid in launcher.stopped if jid == a.job_id} == {"w1", "w2"}
    assert s.cancel(a.job_id) is JobState.CANCELLED  # idempotent
    s.on_worker_lost("w4")
    got = s.store.get_job(b.job_id)
    assert (got.state, got.message) == (
        JobState.RESTARTING,
        "attempt 1 failed: worker w4 was lost; restarting from the start in 5s")
    with pytest.raises(NotFoundError):
        s.cancel("nope")


def test_the_waiting_line_names_the_worker_a_restart_misses(rig):
    """An agent killed mid-job: the survivor's rank fails first ("lost a peer", naming the
    survivor), the lost worker leaves the registry; the restart's waiting line names it."""
    s, workers, launcher, clock = rig
    workers += [worker(1), worker(2)]
    j = s.submit(job(workers=2))
    s.tick()
    s.on_exit(j.job_id, 1, 0, "w1", 5, "lost a peer of the MLX group")
    workers.remove(next(w for w in workers if w.worker_id == "w2"))
    clock.t += 10  # past the restart's back-off
    s.tick()
    got = s.store.get_job(j.job_id)
    assert got.message == ("waiting: needs 2 workers, 1 verified: missing 1 (of attempt 1's "
                           "workers, w2 is gone or busy)")


@pytest.mark.parametrize("lost_first", [False, True])
def test_the_failure_line_names_the_worker_that_went_not_only_the_survivor(rig, lost_first):
    """A 3-stage job whose middle worker's agent is killed: the survivors' ranks report "lost a
    peer" and the coordinator's health checks find the killed one gone, in either order. The
    failure line a user reads names the worker that went, not only the survivor (an outside
    run: it named the innocent worker-1 alone)."""
    s, workers, launcher, clock = rig
    workers += [worker(1), worker(2), worker(3)]
    j = s.submit(job(workers=3))
    s.tick()
    for w in workers:
        w.running_job_id, w.running_attempt = j.job_id, 1
    if lost_first:
        s.on_worker_lost("w2", "health failed 2 times: unreachable", True)
    s.on_exit(j.job_id, 1, 0, "w1", 5, "lost a peer of the MLX group")
    if not lost_first:
        s.on_worker_lost("w2", "health failed 2 times: unreachable", True)
    s.on_exit(j.job_id, 1, 2, "w3", 5, "lost a peer of the MLX group")  # late: changes nothing
    got = s.store.get_job(j.job_id)
    assert got.state is JobState.RESTARTING
    assert got.message.startswith("attempt 1 failed: rank 0 on w1 exited with code 5: lost a "
                                  "peer of the MLX group")
    assert "worker w2 stopped answering the coordinator (health failed 2 times: unreachable)" \
        in got.message, got.message
    assert "w3" not in got.message  # a survivor's late report is not a cause
    said = [e.message for e in s.store.events(j.job_id) if "w2" in e.message]
    assert said, "no event names the lost worker"
    # Later losses of an unrelated worker, or of the same one again, add nothing.
    s.on_worker_lost("w2", "health failed 2 times: unreachable", True)
    s.on_worker_lost("w9", "health failed 2 times: unreachable", True)
    assert s.store.get_job(j.job_id).message == got.message


def test_store_survives_a_reopen_and_a_restart_readopts_or_resumes_active_jobs(tmp_path):
    """A coordinator restarted on its state folder fails nothing: an attempt whose worker still
    runs its rank is re-adopted, one whose worker does not restarts from its last checkpoint
    once the grace period is over."""
    workers = [worker(1), worker(2)]
    clock = Clock()
    s = Scheduler(JobStore(tmp_path / "db"), lambda: list(workers), FakeLauncher(), clock)
    done = s.submit(job(workers=1, iters=1))
    s.tick()
    s.on_checkpoint(Checkpoint(done.job_id, 1, [FileDigest("adapters.safetensors", "c" * 64, 5)],
                               9))
    s.on_exit(done.job_id, 1, 0, "w1", 0, "")
    kept, lost = s.submit(job(workers=1, iters=5)), s.submit(job(workers=1, iters=6))
    s.tick()
    s.on_checkpoint(Checkpoint(lost.job_id, 2, [FileDigest("adapters.safetensors", "d" * 64, 5)],
                               clock.t * 1000))
    s.store.close()
    store = JobStore(tmp_path / "db")
    assert store.schema_version() == len(_MIGRATIONS)
    launcher = FakeLauncher()
    again = Scheduler(store, lambda: list(workers), launcher, clock)
    again.recover()
    assert store.get_job(done.job_id).state is JobState.SUCCEEDED
    assert [c.step for c in store.checkpoints(done.job_id)] == [1]
    on = {store.get_job(j.job_id).worker_ids[0]: j.job_id for j in (kept, lost)}
    kept_on = next(w for w in workers if on[w.worker_id] == kept.job_id)
    kept_on.running_job_id, kept_on.running_attempt = kept.job_id, 1  # its Health says so
    again.tick()
    assert store.get_job(kept.job_id).state is JobState.RUNNING
    assert store.get_job(lost.job_id).state is JobState.RUNNING  # within the grace period
    clock.t += 31
    again.tick()
    # Not its failure (a `herd down`, say): restarted at once, not counted, no "flapping".
    got = store.get_job(lost.job_id)
    assert (got.state, got.attempt) == (JobState.RUNNING, 2)
    restarting = [e.message for e in store.events(lost.job_id)
                  if e.state is JobState.RESTARTING][-1]
    assert "could not re-adopt attempt 1" in restarting, restarting
    assert restarting.endswith("restarting from checkpoint 2 in 0s"), restarting
    assert store.attempt_history(lost.job_id)[0].outcome == "interrupted"
    assert store.get_job(kept.job_id).state is JobState.RUNNING
    assert "re-adopted attempt 1" in [e.message for e in store.events(kept.job_id)][-1]
    assert launcher.started[-1].resume_step == 2


def test_a_coordinator_stopped_while_its_workers_fetch_fails_nothing(tmp_path):
    """An outside run: a coordinator stopped (SIGTERM, as a service restart sends) while its
    workers fetched a model failed the job for good, with the gRPC error its own exit caused
    ("Stream removed"). The job stays placing; the restarted coordinator retries it at once."""
    workers, clock = [worker(1)], Clock()

    class CutByStop(FakeLauncher):
        def prepare_rank(self, launch, on_progress):
            s.stopping.set()  # Coordinator.stop() sets it before it closes its channels
            raise PeerLostError("Stream removed (Channel closed!)")

    s = Scheduler(JobStore(tmp_path / "db"), lambda: list(workers), CutByStop(), clock)
    j = s.submit(job(workers=1))
    s.tick()
    assert s.store.get_job(j.job_id).state is JobState.PLACING
    s.store.close()
    launcher = FakeLauncher()
    again = Scheduler(JobStore(tmp_path / "db"), lambda: list(workers), launcher, clock)
    again.recover()
    clock.t += 31  # its adoption grace: no rank of attempt 1 reports
    again.tick()
    again.tick()
    got = again.store.get_job(j.job_id)
    assert (got.state, got.attempt) == (JobState.RUNNING, 2), got.message
    assert again.store.attempt_history(j.job_id)[0].outcome == "interrupted"


def test_resume_from_another_job_copies_its_checkpoint_or_says_why_not(tmp_path):
    """`herd submit --resume-from`: the checkpoint is copied as the new job's own (the first
    attempt then resumes from it, as a restart would); a step it could not resume at, or a
    damaged checkpoint, is refused before anything is stored."""
    from coordinator.jobs import start_from

    store, adapters = JobStore(tmp_path / "db"), AdapterStore(tmp_path / "adapters")
    source = job(iters=8)
    store.put_job(source)
    data = b"weights"
    files = [FileDigest("adapters.safetensors", hashlib.sha256(data).hexdigest(), len(data))]
    store.add_checkpoint(adapters.receive(source.job_id, 4, files,
                                          [("adapters.safetensors", data)], 1))
    longer, same = job(iters=12), job(iters=4)
    longer.job_id, same.job_id = "longer-1", "same-1"
    got = start_from(longer, source.job_id, store, adapters, 5)
    assert (got.job_id, got.step, got.files) == ("longer-1", 4, files)
    assert adapters.verify(got) is None  # the copy is whole
    with pytest.raises(ConfigError, match="the step after @ is a number"):
        start_from(longer, f"{source.job_id}@", store, adapters, 5)
    with pytest.raises(ConfigError, match="checkpoint 4 must fall before the last optimizer step"):
        start_from(same, source.job_id, store, adapters, 5)  # nothing left to train
    accum = job(iters=12)
    accum.job_id = "accum-1"
    accum.config = parse_config({**accum.config.model_dump(exclude_unset=True),
                                 "grad_accumulation_steps": 3})
    with pytest.raises(ConfigError, match="on an optimizer step of grad_accumulation_steps 3"):
        start_from(accum, source.job_id, store, adapters, 5)
    (adapters.step_dir(source.job_id, 4) / "adapters.safetensors").write_bytes(b"damaged")
    with pytest.raises(NotFoundError, match="checkpoint 4 of .* is damaged"):
        start_from(longer, source.job_id, store, adapters, 5)
    # Another layout: a data-parallel checkpoint cannot seed pipeline stages, and a pipeline's
    # checkpoint (its optimizer state in its stage pieces) resumes only into as many stages.
    piped = job(iters=12)
    piped.job_id = "piped-1"
    piped.config = parse_config({**piped.config.model_dump(exclude_unset=True), "cluster": {
        "workers": 2, "parallelism": {"data": 1, "pipeline": 2}}})
    with pytest.raises(ConfigError, match="was not written by pipeline stages; a job cut into 2"):
        start_from(piped, source.job_id, store, adapters, 5)
    for index in (0, 1):
        meta = adapters._piece_dir(source.job_id, 4, index) / PIECE_META
        meta.parent.mkdir(parents=True)
        meta.write_text(json.dumps({"index": index, "count": 2, "start": index, "end": index + 1}))
    with pytest.raises(ConfigError, match="written by 2 pipeline stages, which hold its optimizer "
                                          "state and position; this job's layout is auto"):
        start_from(longer, source.job_id, store, adapters, 5)


def test_a_job_stored_by_an_older_herd_stays_readable_when_a_rule_is_added(tmp_path):
    """Cross-field rules are checked at submit. A record written before a rule existed (here: a
    batch of 1 over 2 workers, refused since) must not make `herd jobs` fail for every job."""
    import sqlite3

    store = JobStore(tmp_path / "db")
    store.put_job(job(workers=2))
    store.close()
    with sqlite3.connect(tmp_path / "db") as db:  # what the older herd had written
        text = db.execute("SELECT config_yaml FROM jobs").fetchone()[0]
        assert "batch_size: 4" in text
        # (and field rules added since: a schedule's argument count, true for a number)
        db.execute("UPDATE jobs SET config_yaml=?", (
            text.replace("batch_size: 4", "batch_size: 1")
            + "lr_schedule: {name: cosine_decay, arguments: [1.0e-5]}\nseed: true\n",))
    store = JobStore(tmp_path / "db")
    [old] = store.list_jobs()
    assert (old.config.batch_size, old.config.cluster.workers) == (1, 2)
    assert old.config.lr_schedule.arguments == [1e-5]
    with pytest.raises(ConfigError, match="smaller than the 2 data-parallel ranks"):
        config_from_yaml(text.replace("batch_size: 4", "batch_size: 1"), "a new submission")
    with pytest.raises(ConfigError, match="do not fit cosine_decay"):  # still refused, too
        config_from_yaml(text + "lr_schedule: {name: cosine_decay, arguments: [1.0e-5]}\n",
                         "a new submission")


# --- artifacts -------------------------------------------------------------------------------

def test_adapter_store_checks_every_file_and_writes_atomically(tmp_path):
    store = AdapterStore(tmp_path)
    a, b = b"x" * 3000, b"y" * 10
    files = [FileDigest("adapters.safetensors", hashlib.sha256(a).hexdigest(), len(a)),
             FileDigest("adapter_config.json", hashlib.sha256(b).hexdigest(), len(b))]
    chunks = [("adapters.safetensors", a[:1000]), ("adapters.safetensors", a[1000:]),
              ("adapter_config.json", b)]
    c = store.receive("job-1", 20, files, iter(chunks), 0)
    assert (tmp_path / "job-1" / "0000020" / "adapters.safetensors").read_bytes() == a
    assert b"".join(d for n, d in store.files(c) if n == "adapters.safetensors") == a
    bad = [("adapters.safetensors", a[:-1] + b"z"), ("adapter_config.json", b)]
    with pytest.raises(ChecksumError):
        store.receive("job-1", 40, files, iter(bad), 0)
    assert sorted(p.name for p in (tmp_path / "job-1").iterdir()) == ["0000020"]
    with pytest.raises(DatasetError):
        store.receive("job-1", 60, [FileDigest("../evil", "0" * 64, 0)], iter([]), 0)
    with pytest.raises(NotFoundError):
        store.step_dir("../x", 1)


def test_a_received_checkpoint_is_checked_file_by_file(tmp_path):
    from herd.rpc.files import receive_checkpoint
    from protos.v1 import common_pb2, coordinator_pb2

    a, empty = b"w" * 2500, b""
    info = common_pb2.CheckpointInfo(step=4, files=[
        common_pb2.FileDigest(name="adapters.safetensors", sha256=hashlib.sha256(a).hexdigest(),
                              bytes=len(a)),
        common_pb2.FileDigest(name="trainer_state.json", sha256=hashlib.sha256(empty).hexdigest(),
                              bytes=0)])

    def stream(*chunks, header=True):
        if header:
            yield coordinator_pb2.GetAdapterReply(header=info)
        for name, data in chunks:
            yield coordinator_pb2.GetAdapterReply(chunk=common_pb2.FileChunk(name=name, data=data))

    good = tmp_path / "good"
    good.mkdir()
    got = receive_checkpoint(stream(("adapters.safetensors", a[:1000]),
                                    ("adapters.safetensors", a[1000:])),
                             good, "checkpoint", hint="pull again")
    assert got.step == 4 and (good / "adapters.safetensors").read_bytes() == a
    assert (good / "trainer_state.json").read_bytes() == b""  # sent as no chunk at all
    for bad, match in [(stream(("adapters.safetensors", a[:-1] + b"x")), "corrupted"),
                       (stream(("adapters.safetensors", a[:1000])), "corrupted"),
                       (stream(), "missing"),
                       (stream(("../evil", b"x")), "unexpected file"),
                       (stream(("adapters.safetensors", a), header=False), "unexpected file"),
                       (stream(header=False), "no checkpoint header")]:
        folder = tmp_path / f"bad{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        with pytest.raises(ChecksumError, match=match):
            receive_checkpoint(bad, folder, "checkpoint", hint="pull again")


def test_blob_store_is_content_addressed(tmp_path):
    blobs = BlobStore(tmp_path)
    data = b"line\n" * 1000
    sha = hashlib.sha256(data).hexdigest()
    assert blobs.put(sha, [data[:7], data[7:]]) == len(data)
    assert b"".join(blobs.read(sha)) == data
    with pytest.raises(ChecksumError):
        blobs.put("0" * 64, [data])
    assert not blobs.has("0" * 64)
    assert [p.name for p in Path(tmp_path).iterdir()] == [sha]


def test_a_job_too_big_for_every_worker_says_so(tiny_model):
    from coordinator.placement import place
    from herd.config import parse_config
    from herd.errors import PlacementError

    cfg = parse_config({"model": str(tiny_model), "batch_size": 4, "cluster": {"workers": 2}})
    small = [worker(1, mem=2_000_000), worker(2, mem=2_000_000)]
    with pytest.raises(PlacementError, match="does not fit"):
        place(cfg, small)
    assert place(cfg, [worker(1), worker(2)]).worker_ids == ["w1", "w2"]
    # Free memory, not installed memory: a 64 GB machine whose apps hold all but 1.5 MB is not
    # the roomiest, and does not fit this model (it fits in 2 MB, as above)
    full = dataclasses.replace(worker(3, mem=64 * GB), free_memory_bytes=1_500_000)
    one = parse_config({"model": str(tiny_model), "batch_size": 4, "cluster": {"workers": 1}})
    assert place(one, [full, worker(1, mem=2 * GB)]).worker_ids == ["w1"]
    with pytest.raises(PlacementError, match="does not fit"):
        place(one, [full])


def test_a_mac_offers_what_its_gpu_may_wire():
    from coordinator.placement import usable_bytes

    mac = worker(1, mem=192 * GB)
    mac.os = "macOS 15.1"
    assert usable_bytes(mac) == int(192 * GB * 0.75)
    mac.wired_limit_mb = 180_000
    assert usable_bytes(mac) == 180_000 * 2**20
    assert usable_bytes(worker(2, mem=24 * GB)) == 24 * GB  # Linux: free memory


def test_a_rank_lost_without_an_exit_report_fails_the_job(rig):
    s, workers, launcher, clock = rig
    workers += [worker(1), worker(2)]
    j = s.submit(job())
    s.tick()
    assert s.store.get_job(j.job_id).state is JobState.RUNNING
    for w in workers:  # what their Health now says
        w.running_job_id = j.job_id
    s.tick()
    workers[1].running_job_id = ""   # its agent restarted: idle, and no exit report came
    s.tick()
    clock.t += 10
    s.tick()
    assert s.store.get_job(j.job_id).state is JobState.RUNNING  # within the grace period
    clock.t += 11
    s.tick()
    got = s.store.get_job(j.job_id)
    assert got.state is JobState.RESTARTING
    assert got.message == ("attempt 1 failed: worker w2 is no longer running its rank "
                           "(no exit report for 20s); restarting from the start in 5s")


# --- the CLI refuses bad input before it contacts anyone -------------------------------------

def test_submit_exit_codes_for_bad_config_and_dataset(tmp_path, tiny_model, capsys, monkeypatch,
                                                      cluster_ca):
    from herd.cli import laptop as client

    monkeypatch.setenv("HERD_HOME", str(tmp_path / "home"))
    cluster_ca.issue("client", "tester").save(tmp_path / "home" / "tls")
    bad_cfg = tmp_path / "bad.yaml"
    bad_cfg.write_text(f"model: {tiny_model}\ndata: {tmp_path}\nalpha: 16\n")
    assert client.main(["submit", str(bad_cfg), "--coordinator", "127.0.0.1:1"]) == 2
    assert "mlx-lm's LoRA config uses 'scale'" in capsys.readouterr().err
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text('{"text": "ok"}\nnot json\n')
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"model: {tiny_model}\ndata: {data}\nbatch_size: 1\nnum_layers: -1\n")
    assert client.main(["submit", str(cfg), "--coordinator", "127.0.0.1:1"]) == 3
    assert "train.jsonl" in capsys.readouterr().err
    (data / "train.jsonl").write_text('{"text": "ok"}\n' * 4)
    # Valid: now it tries the (absent) coordinator and says so, with exit code 5.
    assert client.main(["submit", str(cfg), "--coordinator", "127.0.0.1:1"]) == 5
    assert "unreachable" in capsys.readouterr().err


# --- pipelines -------------------------------------------------------------------------------

def _pinned(j: Job, **cluster) -> Job:
    cfg = j.config.model_dump(exclude_unset=True)
    cfg["cluster"] = cluster
    j.config = parse_config(cfg)
    return j


def test_a_pipeline_job_starts_every_stage_with_its_blocks(rig, tiny_model):
    s, workers, launcher, _ = rig
    workers += [worker(1), worker(2, mem=32 * GB)]
    j = s.submit(_pinned(job(model=str(tiny_model)), workers=2,
                         parallelism={"data": 1, "pipeline": 2}))
    s.tick()
    got = s.store.get_job(j.job_id)
    assert got.state is JobState.RUNNING
    placing = [e.message for e in s.store.events(j.job_id) if e.state is JobState.PLACING][0]
    assert placing == "starting 2 ranks on w2, w1 as 1 x 2 (data x pipeline), blocks 0:1,1:2"
    started = sorted(launcher.started, key=lambda la: la.rank)
    got = [(la.rank, la.worker.worker_id, la.stage_layers, la.data_parallel) for la in started]
    assert got == [(0, "w2", ((0, 1), (1, 2)), 1), (1, "w1", ((0, 1), (1, 2)), 1)]
    assert started[0].ring_hosts == ["10.0.0.2:8002", "10.0.0.1:8001"]


def test_two_pipelines_are_laid_on_the_ring_so_every_hop_is_a_neighbour(tiny_model):
    from coordinator import planner
    from coordinator.placement import place, usable_bytes
    from herd.config import parse_config

    cfg = parse_config({"model": str(tiny_model), "batch_size": 4,
                        "cluster": {"workers": 4, "parallelism": {"data": 2, "pipeline": 2}}})
    ws = [worker(i, mem=(8 + i) * GB) for i in range(1, 5)]
    p = place(cfg, ws)
    plan = planner.plan_job(json.loads((tiny_model / "config.json").read_text()), cfg,
                            [planner.WorkerMemory(w.worker_id, usable_bytes(w)) for w in ws])
    # Replica 0's stages 0, 1 on ranks 0, 1; replica 1's stages 1, 0 on ranks 2, 3.
    assert p.worker_ids == [*plan.assignments[0], *reversed(plan.assignments[1])]
    assert (p.stage_layers, p.data_parallel, p.pipeline_stages) == ([(0, 1), (1, 2)], 2, 2)
    with pytest.raises(ConfigError, match="MLX ring"):  # (at submit, not waiting to be placed)
        parse_config({"model": str(tiny_model), "batch_size": 4,
                      "cluster": {"workers": 4, "parallelism": {"data": 2, "pipeline": 2},
                                  "exchange": "grpc"}})


def _stage_checkpoint(folder: Path, step: int, names: list[str], value: float) -> Path:
    """A stage's checkpoint folder as worker/rank/checkpoint.py writes it (stage-local names)."""
    import mlx.core as mx

    from worker.rank.checkpoint import write_manifest

    folder.mkdir(parents=True)
    mx.save_safetensors(str(folder / "adapters.safetensors"),
                        {n: mx.full((2, 3), value) for n in names})
    mx.save_safetensors(str(folder / "trainer_state.safetensors"), {"step": mx.array(step)})
    (folder / "adapter_config.json").write_text('{"num_layers": -1}')
    (folder / "trainer_state.json").write_text(json.dumps({"iteration": step}))
    write_manifest(folder, step)
    return folder


@pytest.fixture
def coordinator_rpc(tmp_path, cluster_ca):
    """A real CoordinatorService on loopback (scheduler, stores; no zeroconf, no workers).
    Yields its address, a dict of identities (coordinator, client, worker w1) and the
    scheduler."""
    from coordinator.registry import Registry
    from coordinator.service import RULES, CoordinatorServicer, add_to_server
    from herd.rpc.channel import bind, secure_server

    ids = {role: cluster_ca.issue(role, name)
           for role, name in (("coordinator", "coord"), ("client", "tester"), ("worker", "w1"))}
    server = secure_server(ids["coordinator"], RULES, max_workers=4)
    port = bind(server, ids["coordinator"], "127.0.0.1:0")
    s = Scheduler(JobStore(tmp_path / "db"), lambda: [], FakeLauncher(), Clock())
    add_to_server(CoordinatorServicer(s, Registry(ids["coordinator"]),
                                      BlobStore(tmp_path / "blobs"),
                                      AdapterStore(tmp_path / "adapters")), server)
    server.start()
    yield f"127.0.0.1:{port}", ids, s
    server.stop(grace=0).wait()


def test_stage_pieces_merge_into_one_adapter_and_each_stage_resumes_from_its_own(
        tmp_path, coordinator_rpc):
    import mlx.core as mx

    from herd.cli.connection import CoordinatorConnection
    from herd.stage_cut import StagePiece
    from worker.agent.coordinator_client import CoordinatorClient
    from worker.agent.domain import RankSpec
    from worker.agent.rank_process import RankProcess
    from worker.rank.checkpoint import verify_manifest

    target, ids, s = coordinator_rpc
    j = s.submit(job())
    # As placement would run it; both stages' ranks on w1, this test's one worker identity (each
    # stage's rank uploads its own piece: coordinator/blob_access.py check_uploader).
    j.state, j.attempt, j.worker_ids = JobState.RUNNING, 1, ["w1", "w1"]
    s.store.put_job(j)
    s.store.start_attempt(j.job_id, 1, j.worker_ids, 0, stages=2)
    # Blocks 0:2 and 2:3; each stage names its blocks from 0.
    a0, a1 = "model.layers.0.q.lora_a", "model.layers.1.q.lora_a"
    s0 = _stage_checkpoint(tmp_path / "s0", 4, [a0, a1], 1.0)
    s1 = _stage_checkpoint(tmp_path / "s1", 4, [a0], 2.0)

    def piece(i, start, end):
        return StagePiece(index=i, count=2, start=start, end=end)

    client = CoordinatorClient(target, ids["worker"])
    # Only pieces of the attempt's own layout: a whole checkpoint, or a piece of 3 stages, is
    # refused; so is a piece for a data-parallel attempt (an outside run: rank 1 of one stored
    # "stage 1" pieces, and --resume-from then read the job as a pipeline's).
    for wrong in (None, StagePiece(index=1, count=3, start=2, end=3)):
        with pytest.raises(AuthError, match="runs in 2 pipeline stages"):
            client.put_checkpoint(j.job_id, 1, 4, s1, wrong)
    dp = s.submit(job(iters=12))
    dp.state, dp.attempt, dp.worker_ids = JobState.RUNNING, 1, ["w0", "w1"]
    s.store.put_job(dp)
    s.store.start_attempt(dp.job_id, 1, dp.worker_ids, 0, stages=1)
    with pytest.raises(AuthError, match="runs data parallel; worker w1 sent a piece of 2"):
        client.put_checkpoint(dp.job_id, 1, 4, s1, piece(1, 2, 3))
    assert s.store.checkpoints(dp.job_id) == []
    client.put_checkpoint(j.job_id, 1, 4, s1, piece(1, 2, 3))
    assert s.store.checkpoints(j.job_id) == []  # waits for stage 0
    client.put_checkpoint(j.job_id, 1, 4, s0, piece(0, 0, 2))
    assert [c.step for c in s.store.checkpoints(j.job_id)] == [4]
    assert "checkpoint 4 stored" in [e.message for e in s.store.events(j.job_id)]

    # `herd pull` gets one mlx-lm adapter with the model's block numbers.
    conn = CoordinatorConnection(target, ids["client"])
    conn.pull(j.job_id, 0, tmp_path / "pulled")
    conn.close()
    merged = mx.load(str(tmp_path / "pulled" / "adapters.safetensors"))
    assert {k: v[0, 0].item() for k, v in merged.items()} == {
        a0: 1.0, a1: 1.0, "model.layers.2.q.lora_a": 2.0}
    # (with the report files every pulled adapter carries: coordinator/reports.py)
    assert sorted(p.name for p in (tmp_path / "pulled").iterdir()) == [
        "adapter_config.json", "adapters.safetensors", "loss.png", "metrics.jsonl"]

    # A restarted stage 1 (rank 1 of a 1 x 2 ring) fetches its own piece, checked and whole.
    def spec(cut):
        return RankSpec(job_id=j.job_id, attempt=2, rank=1, world_size=2, config=j.config,
                        dataset=[], coordinator=target, ring_hosts=[], exchange_peers=[],
                        resume_step=4, stage_layers=cut, data_parallel=1)

    rank = RankProcess(spec(((0, 2), (2, 3))), "w1", tmp_path / "worker", ids["worker"])
    resume = rank._fetch_resume()
    got = resume / "stages" / "stage-01"
    assert verify_manifest(got)["step"] == 4
    assert (got / "adapters.safetensors").read_bytes() == (s1 / "adapters.safetensors").read_bytes()
    # An attempt cut differently cannot resume these pieces, and says why.
    other = RankProcess(spec(((0, 1), (1, 3))), "w1", tmp_path / "worker2", ids["worker"])
    with pytest.raises(PlacementError, match="resumes only with the same cut"):
        other._fetch_resume()
    client.close()


def test_a_worker_reads_the_blobs_of_its_jobs_stored_model_and_no_others(tmp_path,
                                                                          coordinator_rpc,
                                                                          tiny_model):
    """PrepareRank fetches a stored model's files through GetBlob: a worker gets exactly those
    of the model its current job runs on (and the job's dataset), never another model's, and
    nothing once it runs no rank of that job."""
    from herd.cli.connection import CoordinatorConnection
    from herd.errors import AuthError
    from herd.models.manifest import folder_manifest, model_files
    from protos.v1 import common_pb2, coordinator_pb2
    from worker.agent.coordinator_client import CoordinatorClient

    target, ids, s = coordinator_rpc
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text('{"other": true}')
    (other / "w.safetensors").write_bytes(b"not the job's")
    (other / "tokenizer.json").write_text("{}")
    digests = {}
    with CoordinatorConnection(target, ids["client"]) as conn:
        for folder in (tiny_model, other):
            manifest = folder_manifest(folder)
            for path in model_files(folder):
                conn.put_blob(path, manifest.by_name()[path.name].sha256)
            files = [common_pb2.FileDigest(name=f.name, sha256=f.sha256, bytes=f.bytes)
                     for f in manifest.files]
            for reply in conn.stub.AddModel(coordinator_pb2.AddModelRequest(
                    name=folder.name, files=files), timeout=30):
                digests[folder] = reply.model.digest or digests.get(folder)
    mine, theirs = folder_manifest(tiny_model), folder_manifest(other)
    j = s.submit(job())
    j.state, j.attempt, j.worker_ids = JobState.RUNNING, 1, ["w1"]
    j.model_digest = digests[tiny_model]
    s.store.put_job(j)
    client = CoordinatorClient(target, ids["worker"])
    try:
        config = mine.by_name()["config.json"]
        assert client.read_blob(config.sha256, config.bytes) == (
            tiny_model / "config.json").read_bytes()
        with pytest.raises(AuthError, match="runs no job with blob"):
            client.read_blob(theirs.by_name()["config.json"].sha256, 15)
        j.worker_ids = ["w2"]  # the next attempt runs elsewhere
        s.store.put_job(j)
        with pytest.raises(AuthError, match="runs no job with blob"):
            client.read_blob(config.sha256, config.bytes)
    finally:
        client.close()


def test_a_watch_ends_with_the_final_event_even_when_the_state_is_stored_first(tmp_path):
    """The scheduler stores a final state a moment before its event. A WatchJob stream that
    looked at the state in between ended without the event (`herd watch` then exited "running:",
    seen under load in the fault tests): it now waits for that event."""
    import threading
    import time

    from coordinator.service import CoordinatorServicer

    store = JobStore(tmp_path / "db")
    j = job()
    store.put_job(j)
    store.add_event(j.job_id, 1, EventKind.STATE, state=JobState.QUEUED)
    j.state = JobState.SUCCEEDED
    store.put_job(j)  # the state, and its event only later

    class Context:
        def is_active(self):
            return True

    class Waits:
        health = ""

        def wait_for_events(self, timeout_s):
            time.sleep(0.05)

    servicer = type("S", (), {"store": store, "scheduler": Waits()})()
    later = threading.Timer(0.3, lambda: store.add_event(j.job_id, 2, EventKind.STATE,
                                                          state=JobState.SUCCEEDED))
    later.start()
    from protos.v1 import coordinator_pb2

    got = list(CoordinatorServicer.WatchJob(
        servicer, coordinator_pb2.WatchJobRequest(job_id=j.job_id), Context()))
    later.join()
    assert [convert.event_from_pb(e).state for e in got] == [JobState.QUEUED, JobState.SUCCEEDED]


def test_a_watch_says_when_the_coordinator_cannot_record_progress_and_when_it_can_again(
        tmp_path):
    """A coordinator whose disk is full stores no events, so `herd watch` went silent with no
    reason given (herd status said it): the stream now says so, and when it recovers, without
    moving the watcher's place in the event sequence."""
    import time

    from coordinator.service import CoordinatorServicer
    from protos.v1 import common_pb2, coordinator_pb2

    store = JobStore(tmp_path / "db")
    j = job()
    store.put_job(j)
    store.add_event(j.job_id, 1, EventKind.STATE, state=JobState.RUNNING)
    full = "the job database /state/herd.db cannot be written: disk full (0 MB free on its disk)"
    healths = iter([full, full, "", "", ""])

    class Disk:  # the edge: what the store's last write said, tick by tick
        @property
        def health(self):
            return next(healths, "")

        def wait_for_events(self, timeout_s):
            if self.ticks == 3:
                j.state = JobState.SUCCEEDED
                store.put_job(j)
                store.add_event(j.job_id, 2, EventKind.STATE, state=JobState.SUCCEEDED)
            self.ticks += 1
            time.sleep(0.01)

        ticks = 0

    class Context:
        calls = 0

        def is_active(self):  # (a stream that never ends fails the test, not hangs it)
            self.calls += 1
            assert self.calls < 100
            return True

    servicer = type("S", (), {"store": store, "scheduler": Disk()})()
    got = list(CoordinatorServicer.WatchJob(
        servicer, coordinator_pb2.WatchJobRequest(job_id=j.job_id), Context()))
    logs = [(e.seq, e.message) for e in got if e.kind == common_pb2.JobEvent.KIND_LOG]
    assert logs[0][0] == 0 and f"cannot record this job's progress: {full}" in logs[0][1]
    assert logs[1][0] == 1 and "can write its database again" in logs[1][1]
    assert len(logs) == 2  # once each, not once per tick
    assert [e.seq for e in got if e.kind != common_pb2.JobEvent.KIND_LOG] == [1, 2]


def test_a_shipped_resume_adapter_is_checked_kept_and_readable_only_by_the_jobs_workers(
        tmp_path):
    """A resume adapter sent with a job (herd submit ships resume_adapter_file): refused unless
    the config names one, it is a .safetensors name and its bytes were uploaded; kept with the job
    across a reopened store; its blob readable by the workers of the job's attempt, not others."""
    import dataclasses

    from coordinator.blob_access import check_worker_may_read
    from coordinator.jobs import new_job
    from coordinator.models import ModelStore
    from herd.errors import AuthError

    blobs = BlobStore(tmp_path / "blobs")
    train, adapter = b'{"text": "hello"}\n' * 4, b"not read by the coordinator"
    shas = [hashlib.sha256(b).hexdigest() for b in (train, adapter)]
    blobs.put(shas[0], [train])
    dataset = [FileDigest("train.jsonl", shas[0], len(train))]
    shipped = FileDigest("resume_adapters.safetensors", shas[1], len(adapter))
    config = "model: /nonexistent/model\ndata: d\nresume_adapter_file: /laptop/a.safetensors\n"

    def submit(yaml_text=config, f=shipped):
        return new_job("j", yaml_text, dataset, blobs, resume_adapter=f)

    with pytest.raises(DatasetError, match="was not uploaded"):
        submit()
    with pytest.raises(ConfigError, match="was not sent with the job"):  # read on the workers
        submit(f=None)
    blobs.put(shas[1], [adapter])
    with pytest.raises(ConfigError, match="has no resume_adapter_file"):
        submit("model: /nonexistent/model\ndata: d\n")
    # Evaluate-only, as the HTTP job API may send it: refused as `herd submit` refuses it (the
    # ranks trained it anyway, 1000 iterations nobody asked for: a review).
    with pytest.raises(ConfigError, match="a cluster job trains; this config evaluates only"):
        submit(config + "test: true\n")
    with pytest.raises(ConfigError, match="not a .safetensors file"):
        submit(f=dataclasses.replace(shipped, name="adapter_config.json"))
    with pytest.raises(DatasetError, match="was not uploaded"):  # a size the upload does not have
        submit(f=dataclasses.replace(shipped, bytes=len(adapter) + 1))
    made = submit()
    store = JobStore(tmp_path / "db")
    store.put_job(dataclasses.replace(made, state=JobState.RUNNING, attempt=1, worker_ids=["w1"]))
    store.close()
    store = JobStore(tmp_path / "db")
    got = store.get_job(made.job_id)
    assert got.resume_adapter == shipped and got.blobs() == set(shas)
    models = ModelStore(tmp_path / "models", blobs)
    check_worker_may_read(store.list_jobs(), models, "w1", shas[1])
    with pytest.raises(AuthError):
        check_worker_may_read(store.list_jobs(), models, "w2", shas[1])


def test_herd_jobs_shows_a_shrunk_job_as_running_of_asked_and_one_line_per_job():
    """`herd jobs`: an elastic job running on 1 of its 2 workers says 1/2 (the asked size alone
    hid the shrink); a message with a hint stays on its job's row, not a row of its own."""
    from herd.cli.listing import JOB_HEADER, job_dict, job_row, table
    from protos.v1 import common_pb2

    shrunk = common_pb2.JobStatus(job_id="a", state=common_pb2.JOB_STATE_RUNNING, workers=2,
                                  iters=10, worker_ids=["w1"], model="m")
    waiting = common_pb2.JobStatus(job_id="b", state=common_pb2.JOB_STATE_QUEUED, workers=2,
                                   iters=10, model="m",
                                   message="waiting: needs 2 workers\nhint: start another")
    done = common_pb2.JobStatus(job_id="c", state=common_pb2.JOB_STATE_SUCCEEDED, workers=2,
                                iters=10, worker_ids=["w1"], model="m")
    # a pipeline's loss is its last stage's (rank 1 here): shown, not "-"
    done.ranks.add(rank=0, iteration=10)
    done.ranks.add(rank=1, iteration=10, train_loss=2.5, val_loss=2.75)
    assert (job_dict(done)["train_loss"], job_dict(done)["val_loss"]) == (2.5, 2.75)
    rows = [job_row(job_dict(j)) for j in (shrunk, waiting, done)]
    assert [r[2] for r in rows] == ["1/2", "2", "2"]
    assert rows[1][-1] == "waiting: needs 2 workers; hint: start another"
    assert len(table([JOB_HEADER] + rows).splitlines()) == 4


def test_no_checkpoint_says_why_a_job_has_none():
    """`herd pull` / `--resume-from` on a job with no checkpoint: the hint fits the job's state
    (an ended job will never save one; "not saved yet" was said of failed jobs too)."""
    import dataclasses

    from coordinator.jobs import no_checkpoint

    j = job(workers=1)

    def hint(state, have=()):
        return no_checkpoint(dataclasses.replace(j, state=state), 0, list(have)).hint

    assert hint(JobState.FAILED) == "it failed before saving one"
    assert hint(JobState.QUEUED) == "it has not started yet"
    assert hint(JobState.RUNNING) == "it has not saved one yet (one every 100 steps)"
    assert hint(JobState.SUCCEEDED, [4, 8]) == "stored steps: [4, 8]"
    assert str(no_checkpoint(j, 3, [4]).message) == f"job {j.job_id} has no checkpoint at step 3"


def test_a_job_whose_final_checkpoint_is_stored_succeeds_whatever_ends_its_ranks(rig):
    """A worker lost (or a rank failing) after the final adapter was stored ends the job
    SUCCEEDED, saying what happened; it went back to RESTARTING and waited for a worker (an
    outside review revoked a worker at 400/400)."""
    s, workers, _, _ = rig
    workers += [worker(1), worker(2)]
    j = s.submit(job(workers=2, iters=8))
    s.tick()
    s.on_checkpoint(Checkpoint(j.job_id, 8, [FileDigest("adapters.safetensors", "c" * 64, 5)], 9))
    s.on_worker_lost("w2", "revoked")
    got = s.store.get_job(j.job_id)
    assert (got.state, got.message) == (JobState.SUCCEEDED, "after its final checkpoint (8): "
                                        "worker w2 was lost: revoked")
    k = s.submit(job(workers=2, iters=9))  # checkpoint 8 of 9: not the final one
    s.tick()
    s.on_checkpoint(Checkpoint(k.job_id, 8, [FileDigest("adapters.safetensors", "d" * 64, 5)], 9))
    s.on_worker_lost("w1")
    assert s.store.get_job(k.job_id).state is JobState.RESTARTING


def test_an_attempt_that_never_stepped_on_its_data_subnet_sends_the_next_one_elsewhere(rig):
    """A fast data subnet that is dead (a pulled cable: the interface is still reported) is
    picked again by every restart, failing the job, though the control network works (an
    outside review). An attempt that fails there before any rank's first step moves the next
    attempt to the next path; a failure after progress keeps the path."""
    from herd.netif import Interface

    s, workers, launcher, clock = rig

    def nics(i):
        return [Interface("eth0", "ethernet", (f"10.0.0.{i}/24",), 1000),
                Interface("eth1", "ethernet", (f"10.10.0.{i}/24",), 10000)]

    workers += [worker(1, interfaces=nics(1)), worker(2, interfaces=nics(2))]
    j = s.submit(job(workers=2))
    s.tick()
    assert all(p.startswith("10.10.0.") for p in launcher.started[-1].exchange_peers)
    s.on_exit(j.job_id, 1, 1, "w2", PeerLostError.exit_code, "could not form the MLX ring")
    got = s.store.get_job(j.job_id)
    assert got.state is JobState.RESTARTING and ("no rank made a step on its data subnet "
                                                  "10.10.0.0/24") in got.message, got.message
    clock.t += 60
    s.tick()
    assert all(p.startswith("10.0.0.") for p in launcher.started[-1].exchange_peers)
    assert "data path: MLX ring on 10.0.0.0/24" in " ".join(
        e.message for e in s.store.events(j.job_id))
    s.on_progress(j.job_id, 2, RankProgress(rank=0, worker_id="w1", iteration=3))
    s.on_exit(j.job_id, 2, 1, "w2", -9, "a crash after a step")
    assert "data subnet" not in s.store.get_job(j.job_id).message
    # A rank that refuses its config before any step says nothing of the link: the job fails
    # (no next attempt to send elsewhere), naming only what the rank said.
    workers += [worker(3, interfaces=nics(3)), worker(4, interfaces=nics(4))]
    k = s.submit(job(workers=2, iters=12))
    clock.t += 60
    s.tick()
    placed = s.store.get_job(k.job_id)
    assert placed.state is JobState.RUNNING and placed.worker_ids == ["w3", "w4"]
    s.on_exit(k.job_id, 1, 0, "w3", 2, "cluster.shares has 3 entries for 2 ranks")
    got = s.store.get_job(k.job_id)
    assert got.state is JobState.FAILED and "data subnet" not in got.message, got.message
    # A worker lost (its agent killed) while the ranks still load: not the link's doing (the
    # job was moved off its fast subnet for good: an outside run).
    m = s.submit(job(workers=2, iters=14))
    clock.t += 60
    s.tick()
    assert s.store.get_job(m.job_id).state is JobState.RUNNING
    s.on_worker_lost("w4", "its agent was killed")
    got = s.store.get_job(m.job_id)
    assert got.state is JobState.RESTARTING and "data subnet" not in got.message, got.message


def test_a_delivery_cut_by_a_coordinator_crash_leaves_nothing_behind_after_a_restart(tmp_path):
    """A checkpoint's temporary folder from a delivery the coordinator died in the middle of
    (an outside run found 22 MB of them, kept forever) is removed when the store opens again;
    stored checkpoints stay."""
    from coordinator.artifacts import AdapterStore

    stored = tmp_path / "adapters" / "j-1" / "0000010"
    parts = [tmp_path / "adapters" / "j-1" / ".0000020.part-x1",
             tmp_path / "adapters" / "j-2" / "stages" / "0000020" / ".stage-01.part-x2"]
    for folder in (stored, *parts):
        folder.mkdir(parents=True)
        (folder / "adapters.safetensors").write_bytes(b"x")
    AdapterStore(tmp_path / "adapters")
    assert stored.is_dir() and not any(p.exists() for p in parts)


def test_a_job_is_checked_against_its_model_at_submit_however_it_comes(tiny_model):
    """The CLI checks num_layers against the model on the laptop; the job API's jobs were only
    refused on a worker after placement (an outside run): the coordinator checks both."""
    from coordinator.placement import check_fits

    cfg = parse_config({"model": str(tiny_model), "data": "d", "num_layers": 16})
    with pytest.raises(ConfigError, match="num_layers = 16, but .* has only 2 layers"):
        check_fits(cfg, [])


def test_uploads_no_job_or_model_holds_are_swept_after_a_day(tmp_path):
    """A dataset uploaded to the job API and never used, or shipped by a submit that was then
    refused, stayed on the coordinator's disk for ever (an outside run)."""
    import os

    from coordinator.housekeeping import ORPHAN_GRACE_S, sweep_blobs

    store, blobs = JobStore(tmp_path / "db"), BlobStore(tmp_path / "blobs")
    sha = {}
    for name in ("job", "model", "old orphan", "new orphan", "reused"):
        data = name.encode()
        sha[name] = hashlib.sha256(data).hexdigest()
        blobs.put(sha[name], [data])
    j = job()
    j.dataset = [FileDigest("train.jsonl", sha["job"], 3)]
    store.put_job(j)
    import time

    now = time.time()
    for name in ("job", "model", "old orphan", "reused"):  # uploaded over a day ago
        os.utime(blobs.path(sha[name]), (now - ORPHAN_GRACE_S - 30,) * 2)
    assert blobs.touch(sha["reused"])  # `herd submit` asked for it: about to be used again
    assert not blobs.touch("0" * 64)
    from coordinator.models import ModelStore

    models = ModelStore(tmp_path / "models", blobs)  # a stored model whose weights are "model"
    extra = {"config.json": b"{}", "tokenizer.json": b"{}"}
    for data in extra.values():
        blobs.put(hashlib.sha256(data).hexdigest(), [data])
    models.add([FileDigest("w.safetensors", sha["model"], 5)]
               + [FileDigest(n, hashlib.sha256(d).hexdigest(), len(d)) for n, d in extra.items()],
               "m", 0)
    count, freed = sweep_blobs(store, models, blobs, now)
    assert (count, freed) == (1, len(b"old orphan"))
    assert [n for n in sha if blobs.has(sha[n])] == ["job", "model", "new orphan", "reused"]


def test_a_jobs_events_say_who_submitted_and_who_cancelled_it(coordinator_rpc):
    """Five users on one cluster: nothing said whose job was whose, or who cancelled it ("by the
    user"): the events name the caller's certificate (an outside run)."""
    from herd.cli.connection import CoordinatorConnection
    from protos.v1 import coordinator_pb2

    target, ids, s = coordinator_rpc
    j = s.submit(job(), by="client/alice")
    with CoordinatorConnection(target, ids["client"]) as conn:
        conn.call("CancelJob", coordinator_pb2.CancelJobRequest(job_id=j.job_id))
    told = [(e.state.value, e.message) for e in s.store.events(j.job_id)
            if e.kind is EventKind.STATE]
    assert told == [("queued", "submitted by client/alice"),
                    ("cancelled", "cancelled by client/tester")]


def test_a_job_is_admitted_only_with_room_for_the_checkpoints_it_will_keep(
        tmp_path, coordinator_rpc, tiny_model, tiny_data, monkeypatch):
    """An outside run: admission counted two checkpoints, every one is kept by default, and the
    job was taken, then failed part-way on its own checkpoints. The disk's free space is the
    edge faked here (coordinator/artifacts.py _free_bytes)."""
    from coordinator import artifacts
    from coordinator.placement import checkpoint_bytes, checkpoints_held
    from herd.cli.connection import CoordinatorConnection
    from herd.cli.laptop import job_spec
    from herd.config import load_config
    from protos.v1 import coordinator_pb2
    from tests.conftest import write_job

    cfg = load_config(write_job(tmp_path / "j.yaml", tiny_model, tiny_data, iters=80,
                                save_every=10, cluster={"workers": 1}))
    assert checkpoints_held(cfg, 0) == 8 and checkpoints_held(cfg, 2) == 3
    assert checkpoints_held(cfg.model_copy(update={"iters": 85}), 0) == 9  # and the final
    one = checkpoint_bytes(cfg)
    assert one > 0
    target, ids, s = coordinator_rpc
    spec, files = job_spec(cfg, "j")
    with CoordinatorConnection(target, ids["client"]) as conn:
        for path, sha in files:
            conn.put_blob(path, sha)
        monkeypatch.setattr(artifacts, "_free_bytes",
                            lambda folder: artifacts.RESERVE_BYTES + 7 * one)
        with pytest.raises(StorageError) as e:  # room for 7 of its 8
            conn.call("SubmitJob", coordinator_pb2.SubmitJobRequest(spec=spec))
        said = str(e.value)  # (the hint crosses the wire in the message)
        assert "the job's 8 checkpoints (the coordinator keeps them all) needs" in said, said
        assert "--keep-checkpoints" in said and "save_every" in said, said
        monkeypatch.setattr(artifacts, "_free_bytes",
                            lambda folder: artifacts.RESERVE_BYTES + 8 * one)
        conn.call("SubmitJob", coordinator_pb2.SubmitJobRequest(spec=spec))
        # A second job beside the first, which has all its 8 still to write (each passed alone,
        # then the second filled the disk: an outside run).
        with pytest.raises(StorageError, match=r"beside \d+\.\d MB the unfinished jobs will "
                                               "still write"):
            conn.call("SubmitJob", coordinator_pb2.SubmitJobRequest(spec=spec))
        monkeypatch.setattr(artifacts, "_free_bytes",
                            lambda folder: artifacts.RESERVE_BYTES + 16 * one)
        conn.call("SubmitJob", coordinator_pb2.SubmitJobRequest(spec=spec))
    # A pipeline's checkpoint is also the adapter merged from its stages' pieces.
    from herd.config import Parallelism

    stages = cfg.model_copy(update={"cluster": cfg.cluster.model_copy(update={
        "parallelism": Parallelism(data=1, pipeline=2)})})
    assert checkpoint_bytes(stages) > one


def test_a_submit_needs_no_writable_tmp(tmp_path, coordinator_rpc, tiny_model, tiny_data,
                                        monkeypatch):
    """Under the shipped systemd unit (ProtectSystem=strict: /tmp read-only) every submit failed
    ("No usable temporary directory"): the dataset check's view of the uploaded files is made in
    the state folder (an outside run). A read-only tmpfs as the temporary folder here."""
    import subprocess
    import tempfile

    from herd.cli.connection import CoordinatorConnection
    from herd.cli.laptop import job_spec
    from herd.config import load_config
    from protos.v1 import coordinator_pb2
    from tests.conftest import write_job

    spec, files = job_spec(load_config(write_job(tmp_path / "j.yaml", tiny_model, tiny_data,
                                                 cluster={"workers": 1})), "j")
    ro = tmp_path / "ro-tmp"
    ro.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.strip()}")
    try:
        monkeypatch.setattr(tempfile, "tempdir", str(ro))
        with pytest.raises(OSError):
            tempfile.mkdtemp()  # (the premise: no temporary folder can be made)
        target, ids, s = coordinator_rpc
        with CoordinatorConnection(target, ids["client"]) as conn:
            for path, sha in files:
                conn.put_blob(path, sha)
            job_id = conn.call("SubmitJob", coordinator_pb2.SubmitJobRequest(spec=spec)).job_id
        assert s.store.get_job(job_id).state is JobState.QUEUED
    finally:
        monkeypatch.undo()
        subprocess.run(["umount", str(ro)], check=True)


def test_a_worker_that_cannot_prepare_stops_the_others_fetches():
    """A worker short of disk refused before its own fetch while the others went on pulling
    their shards (tens of GB for a 70B) for an attempt that had already failed (an outside run):
    their next progress report now ends their fetch."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from coordinator.domain import FetchProgress, RankLaunch
    from coordinator.launching import bring_up

    reports = {"w1": 0}
    started = threading.Event()

    class Backend:
        def prepare_rank(self, launch, on_progress):
            if launch.worker.worker_id == "w2":
                started.wait(10)
                raise StorageError("worker w2 cannot hold the model: its files need 2 GB more")
            for _ in range(500):  # a long fetch, reporting as it goes
                reports["w1"] += 1
                started.set()
                if not on_progress(FetchProgress(rank=0)):
                    return
                time.sleep(0.01)

        def start_rank(self, launch):
            raise AssertionError("no rank starts when one could not prepare")

    j = job()
    plan = [RankLaunch(j, r, worker(r + 1), [], []) for r in range(2)]
    with ThreadPoolExecutor(4) as pool:
        results = bring_up(pool, Backend(), plan, lambda launch, fetch: True)
    assert results[0] is None and "cannot hold the model" in results[1].message
    assert reports["w1"] < 500  # stopped, not fetched to the end


def test_keep_checkpoints_applies_to_what_is_already_stored(tmp_path):
    """An operator restarting the coordinator with --keep-checkpoints 1 to free space freed
    nothing: it applied only to checkpoints saved from then on (an outside run)."""
    from coordinator.housekeeping import prune_checkpoints

    store, adapters = JobStore(tmp_path / "db"), AdapterStore(tmp_path / "adapters")
    j = job(iters=40)
    store.put_job(j)
    data = b"weights"
    files = [FileDigest("adapters.safetensors", hashlib.sha256(data).hexdigest(), len(data))]
    for step in (10, 20, 30, 40):
        store.add_checkpoint(adapters.receive(j.job_id, step, files,
                                              [("adapters.safetensors", data)], step))
    assert prune_checkpoints(store, adapters, 0) == 0  # 0: keep all
    assert prune_checkpoints(store, adapters, 2) == 2
    assert [c.step for c in store.checkpoints(j.job_id)] == [30, 40]
    assert [s for s in (10, 20, 30, 40) if adapters.step_dir(j.job_id, s).exists()] == [30, 40]


def test_plan_counts_only_the_jobs_backends_workers(tmp_path, coordinator_rpc, tiny_model,
                                                    capsys):
    """Ray nodes and agents under one coordinator: a Ray job's `herd plan` placed a rank on the
    agent (an outside run), and a zeroconf job's on the Ray nodes; the scheduler only ever
    places a job on its own backend's workers. The plan now takes those alone."""
    import json

    from coordinator.backend import AgentBackend
    from herd.cli.plan import main as plan_main
    from herd.config import config_to_yaml

    target, ids, s = coordinator_rpc
    ray_nodes = [worker(7, resources={"herd_worker": 1.0, "herd_memory_gb": 16.0}),
                 worker(8, resources={"herd_worker": 1.0, "herd_memory_gb": 16.0})]

    class RayNodes(AgentBackend):  # the Ray cluster: an edge (tests/test_ray_backend.py is real)
        pass

    s._backends = {"zeroconf": AgentBackend(lambda: [worker(1)], FakeLauncher()),
                   "ray": RayNodes(lambda: list(ray_nodes), FakeLauncher())}
    ids["client"].save(tmp_path / "tls")
    for backend, expect in (("ray", {"w7", "w8"}), ("zeroconf", {"w1"})):
        cfg = parse_config({"model": str(tiny_model), "num_layers": -1, "batch_size": 2,
                            "cluster": {"backend": backend}})
        path = tmp_path / f"{backend}.yaml"
        path.write_text(config_to_yaml(cfg))
        assert plan_main(["plan", str(path), "--coordinator", target, "--tls-dir",
                          str(tmp_path / "tls"), "--json"]) == 0
        got = json.loads(capsys.readouterr().out)
        assert got["workers_available"] == len(expect), got
        assert set(got["peak_bytes_per_worker"]) | set(got.get("unused", [])) == expect, got


def test_a_model_the_workers_cannot_name_is_refused_at_submit():
    """`../x` or `~root/x` were queued, then every worker's policy refused them as the job
    started (an outside run): refused at submit, with what the workers take."""
    from coordinator.jobs import check_model_reference

    for fine in ("/models/llama", "~/models/m", "org/name", f"org/name@{'a' * 40}", "gpt2"):
        check_model_reference(fine)
    for bad in ("../x", "./m", "~root/.ssh", "a/b/c", ".."):
        with pytest.raises(ConfigError, match="absolute path, from ~/"):
            check_model_reference(bad)


def test_a_job_that_pins_its_data_parallelism_says_it_waits_rather_than_shrink():
    """A pinned {data: 2, ...} job that lost a worker for good waited "needs 4 workers, 3
    verified" with nothing said of the shrink the README describes (an outside run)."""
    from coordinator.placement import Wait, decide_queued

    def lost(parallelism) -> str:
        j = job(workers=4, iters=12)
        cfg = j.config.model_dump(exclude_unset=True)
        j.config = parse_config({**cfg, "cluster": {"workers": 4, "parallelism": parallelism}})
        j.state, j.attempt, j.worker_ids = JobState.RESTARTING, 1, ["w1", "w2", "w3", "w4"]
        decision = decide_queued(j, [worker(1), worker(2), worker(3)], 0, 600)
        assert isinstance(decision, Wait)
        return decision.reason

    said = lost({"data": 4, "pipeline": 1})
    assert said.endswith("(of attempt 1's workers, w4 is gone or busy; cluster.parallelism "
                         "pins data: it waits, never shrinks)"), said
    assert "pins data" not in lost("auto")


def test_a_job_named_from_any_file_gets_an_id_every_call_takes():
    """A config named _draft.yaml made the job "_draft-xxxxxx", which every call that checks a
    job id refused (herd watch, herd pull, herd rm: a review's twin regexes)."""
    from coordinator.jobs import job_name
    from herd.rpc.names import check_job_id

    for raw in ("_draft", "--x__", "___", "a b/c", "é"):
        check_job_id(f"{job_name(raw)}-abc123")
