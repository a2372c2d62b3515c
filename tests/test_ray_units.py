"""The Ray backend's pure parts, and the scheduler's backend seam stepped with a fake backend
(the real Ray cluster is tests/test_ray_backend.py)."""

from __future__ import annotations

import json
import socket

import pytest

from coordinator import convert, ray_nodes
from coordinator.domain import EventKind, Job, JobState, WorkerRecord
from coordinator.scheduler import Scheduler, Wait
from coordinator.store import JobStore
from herd.config import parse_config
from herd.digest import FileDigest
from herd.errors import ConfigError, PeerLostError, PlacementError
from worker.agent import ray_join
from worker.agent.machine import Machine

GB = 1 << 30


def node(i: int, alive: bool = True, **resources) -> dict:
    return {"NodeID": f"{i:02d}" + "ab" * 27, "Alive": alive, "NodeManagerAddress": f"10.0.0.{i}",
            "Resources": {"CPU": 8.0, "memory": 1e10, "node:10.0.0.1": 1.0, **resources},
            "Labels": {"ray.io/node-id": "x", "herd-os": "macos", "herd-chip": "Apple-M2-Ultra",
                       "herd-wired-limit-mb": "98304"}}


def test_a_ray_node_is_a_herd_worker_only_when_alive_and_offering_the_herd_slot():
    rec = ray_nodes.node_record(node(1, herd_worker=1, herd_memory_gb=128), "job-1")
    assert rec.worker_id == "ray-01ababab" and rec.host == "10.0.0.1"
    assert rec.memory_bytes == 128 * GB and rec.running_job_id == "job-1"
    assert (rec.os, rec.chip, rec.wired_limit_mb) == ("macOS", "Apple M2 Ultra", 98304)
    assert rec.resources == {"CPU": 8.0, "herd_worker": 1.0, "herd_memory_gb": 128.0}
    assert ray_nodes.node_record(node(2, alive=False, herd_worker=1)) is None
    assert ray_nodes.node_record(node(3)) is None  # a plain Ray node: not herd's


def test_a_bundle_asks_for_the_herd_slot_and_the_planners_memory_rounded_up():
    assert ray_nodes.bundle(0) == {"herd_worker": 1.0}
    assert ray_nodes.bundle(GB) == {"herd_worker": 1.0, "herd_memory_gb": 1.0}
    assert ray_nodes.bundle(GB + 1)["herd_memory_gb"] == 1.0001  # never less than planned


def test_worker_records_with_resources_round_trip_through_the_proto():
    rec = ray_nodes.node_record(node(1, herd_worker=1, herd_memory_gb=64))
    assert convert.worker_from_pb(convert.worker_to_pb(rec)) == rec
    assert convert.worker_from_bytes(convert.worker_to_pb(rec).SerializeToString()) == rec


def test_herd_worker_ray_joins_with_resources_and_labels_ray_accepts():
    from ray._private.label_utils import validate_node_labels

    mac = Machine(chip="Apple M2 Ultra (24-core)", memory_bytes=192 * GB, gpu_cores=76,
                  os="macOS 15.1", mlx_version="0.32.4", wired_limit_mb=0)
    cmd = ray_join.ray_start_command(mac, "10.0.0.1:6379", node_ip="10.0.0.7",
                                     extra=["--num-cpus=24"])
    assert cmd[:3] == ["ray", "start", "--block"]
    assert json.loads(cmd[cmd.index("--resources") + 1]) == {"herd_worker": 1.0,
                                                             "herd_memory_gb": 192.0}
    labels = dict(kv.split("=") for kv in cmd[cmd.index("--labels") + 1].split(","))
    validate_node_labels(labels)  # raises on a value Ray would refuse
    assert labels == {"herd-os": "macos", "herd-chip": "Apple-M2-Ultra-24-core",
                      "herd-wired-limit-mb": "0"}
    assert cmd[-5:] == ["--address", "10.0.0.1:6379", "--node-ip-address", "10.0.0.7",
                        "--num-cpus=24"]
    assert "--head" in ray_join.ray_start_command(mac, "head")
    # A Linux box's MemTotal is no whole number of GiB (23.54 here): Ray refuses a fraction
    # above 1 for a node (an outside run: the node never joined). Whole GiB, rounded down, pass
    # Ray's own check.
    from ray._private.resource_and_label_spec import ResourceAndLabelSpec

    def ray_checks(resources: dict) -> None:
        spec = ResourceAndLabelSpec(num_cpus=1, num_gpus=0, memory=GB, object_store_memory=GB,
                                    resources=resources, labels={})
        spec._is_resolved = True  # (its fields are all given: nothing for resolve() to probe)
        spec.to_resource_dict()  # Ray's own check of a node's resources: raises if refused

    linux = Machine(chip="AMD EPYC", memory_bytes=int(23.54 * GB), gpu_cores=0,
                    os="Linux 6.1", mlx_version="0.32.4")
    got = ray_join.resources(linux)
    assert got == {"herd_worker": 1.0, "herd_memory_gb": 23.0}
    ray_checks(got)
    with pytest.raises(ValueError, match="whole numbers"):  # what 23.54 did
        ray_checks({"herd_memory_gb": 23.54})
    # macOS: Ray refuses multi-node clusters unless told; nothing reports usage.
    assert ray_join.ray_env("darwin")["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "1"
    assert ray_join.ray_env("linux")["RAY_USAGE_STATS_ENABLED"] == "0"


def test_ray_address_is_refused_without_backend_ray():
    with pytest.raises(ConfigError, match="ray_address is only read with backend: ray"):
        parse_config({"cluster": {"ray_address": "10.0.0.1:6379"}})
    # An explicit auto without the backend too (it waited as a zeroconf job: an outside run);
    # a whole dump (the job API's "cluster", sent back) names the backend and passes.
    with pytest.raises(ConfigError, match="backend is zeroconf, the default"):
        parse_config({"cluster": {"ray_address": "auto"}})
    whole = parse_config({"cluster": {"workers": 2}}).cluster.model_dump(mode="json")
    assert parse_config({"cluster": whole}).cluster.workers == 2
    assert parse_config({"cluster": {"backend": "ray"}}).cluster.ray_address == "auto"


def test_herd_worker_ray_checks_the_head_answers_before_ray_start():
    """`ray start --address` where nothing listens retried for minutes, silent but for Ray's own
    connect errors (an outside run): refused at once, with the fix."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]  # bound, never listening: refused
    with pytest.raises(PeerLostError, match=f"no Ray head answers at 127.0.0.1:{closed}"):
        ray_join.check_head(f"127.0.0.1:{closed}")
    for bad in ("10.0.0.1", "10.0.0.1:x", "10.0.0.1:70000", ":6379"):
        with pytest.raises(ConfigError, match="HOST:PORT"):
            ray_join.check_head(bad)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        ray_join.check_head(f"127.0.0.1:{s.getsockname()[1]}")  # a listener passes


# --- the scheduler's backend seam, with a fake Ray backend -----------------------------------

class FakeRay:
    """Reserves after ``polls`` ticks, giving each rank its actor's ports."""

    def __init__(self, n: int, polls: int = 2, unreachable: bool = False):
        self.nodes = [WorkerRecord(f"ray-{i}", f"10.0.1.{i}", 0, 0, 0, 16 * GB, 16 * GB)
                      for i in range(n)]
        self.polls, self.unreachable = polls, unreachable
        self.started, self.stopped, self.asked = [], [], []

    def connect(self, job: Job) -> None:
        if self.unreachable:
            raise PlacementError("cannot reach the Ray cluster at 10.0.1.254:6379")

    def workers(self):
        return list(self.nodes)

    def reserve(self, job, attempt, placement, workers):
        self.asked.append((job.job_id, attempt, list(placement.worker_ids)))
        if len(self.asked) <= self.polls:
            return Wait(f"reserving {len(placement.worker_ids)} ranks on Ray")
        from dataclasses import replace

        return {w: replace(workers[w], ring_port=5000 + i, exchange_port=6000 + i)
                for i, w in enumerate(placement.worker_ids)}

    def start_rank(self, launch):
        self.started.append(launch)

    def stop_job(self, worker, job):
        self.stopped.append((job.job_id, job.attempt))


class Clock:
    t = 1000.0

    def __call__(self):
        return self.t


def ray_job(workers: int = 2) -> Job:
    cfg = parse_config({"model": "/nonexistent/model", "data": "data", "iters": 5,
                        "batch_size": 4, "cluster": {"workers": workers, "backend": "ray"}})
    return Job(job_id="rj", name="t", config=cfg, dataset=[FileDigest("train.jsonl", "a" * 64, 1)],
               workers_needed=workers, iters=5)


def scheduler(tmp_path, fake: FakeRay, clock=None) -> Scheduler:
    return Scheduler(JobStore(tmp_path / "db"), lambda: [], None, clock or Clock(),
                     placement_timeout_s=60, backends={"ray": fake})


def test_a_ray_job_waits_for_its_reservation_then_starts_on_the_actors_ports(tmp_path):
    fake, clock = FakeRay(3), Clock()
    s = scheduler(tmp_path, fake, clock)
    job = s.submit(ray_job())
    s.tick()
    s.tick()
    got = s.store.get_job(job.job_id)
    assert got.state is JobState.QUEUED and got.message == "waiting: reserving 2 ranks on Ray"
    assert [a[1] for a in fake.asked] == [1, 1]  # the attempt it would become
    s.tick()
    assert s.store.get_job(job.job_id).state is JobState.RUNNING
    assert [(la.rank, la.ring_hosts) for la in fake.started] == [
        (0, ["10.0.1.0:5000", "10.0.1.1:5001"]), (1, ["10.0.1.0:5000", "10.0.1.1:5001"])]
    assert fake.started[0].exchange_peers == ["10.0.1.0:6000", "10.0.1.1:6001"]
    # Ray reports a rank's actor dead: the same restart policy as a lost worker.
    s.on_rank_lost(job.job_id, 1, 1, "ray-1", "its Ray actor died (node lost)")
    got = s.store.get_job(job.job_id)
    assert got.state is JobState.RESTARTING
    assert "rank 1 on ray-1 was lost: its Ray actor died (node lost)" in got.message
    assert set(fake.stopped) == {(job.job_id, 1)}  # per worker; the real backend stops all once
    s.on_rank_lost(job.job_id, 1, 0, "ray-0", "late")  # an old attempt's news: ignored
    assert s.store.get_job(job.job_id).state is JobState.RESTARTING
    clock.t += s.restart_policy.base_s  # the restart's backoff (coordinator/recovery.py)
    s.tick()
    assert fake.asked[-1][1] == 2 and s.store.get_job(job.job_id).attempt == 2


def test_a_restarted_coordinator_restarts_a_ray_job_at_once(tmp_path):
    """A rank actor is the coordinator's own (the Ray driver's): it ends with it. A restarted
    coordinator restarts the job from its checkpoint at the next tick, saying why (it waited
    30 s for ranks that could not exist: an outside run)."""
    fake, clock = FakeRay(2, polls=0), Clock()
    s = scheduler(tmp_path, fake, clock)
    job = s.submit(ray_job())
    s.tick()
    assert s.store.get_job(job.job_id).state is JobState.RUNNING
    again = Scheduler(s.store, lambda: [], None, clock, placement_timeout_s=60,
                      backends={"ray": fake})
    again.recover()
    again.tick()  # (no time passes: no re-adopt wait)
    got = again.store.get_job(job.job_id)
    assert got.state is JobState.RUNNING and got.attempt == 2, got.message
    said = [e.message for e in again.store.events(job.job_id)]
    assert any("the ranks of a Ray job end with it" in m for m in said), said


def test_a_job_that_forgot_backend_ray_is_told_at_submit_where_the_workers_are(tmp_path):
    """It waited for agents beside two Ray nodes, "0 verified", and nothing said why (an
    outside run)."""
    from coordinator.housekeeping import wait_warning

    s = scheduler(tmp_path, FakeRay(2))
    job = ray_job()
    job.config = parse_config({"model": "/nonexistent/model", "data": "data", "iters": 5,
                               "batch_size": 4, "cluster": {"workers": 2}})
    counts = {n: len(b.workers()) for n, b in s.backends.items()}
    said = wait_warning(job, 0, 60, counts)
    assert said.startswith("rj needs 2 workers and 0 are verified for cluster.backend zeroconf")
    assert said.endswith("; 2 verified worker(s) are ray workers: for them set cluster.backend: "
                         "ray"), said
    assert wait_warning(ray_job(), 2, 60, counts) == ""
    # (its own backend's workers are the count, never a "set cluster.backend" to itself)
    assert "set cluster.backend" not in wait_warning(ray_job(3), 2, 60, counts)


def test_an_unreachable_ray_cluster_fails_the_submit_and_queues_nothing(tmp_path):
    s = scheduler(tmp_path, FakeRay(2, unreachable=True))
    with pytest.raises(PlacementError, match="cannot reach the Ray cluster at 10.0.1.254:6379"):
        s.submit(ray_job())
    assert s.store.list_jobs() == []


def test_a_reservation_that_never_comes_fails_after_the_placement_timeout(tmp_path):
    clock = Clock()
    s = scheduler(tmp_path, FakeRay(2, polls=10**6), clock)
    job = s.submit(ray_job())
    s.tick()
    clock.t += 61
    s.tick()
    got = s.store.get_job(job.job_id)
    assert got.state is JobState.FAILED
    assert got.message == "could not be placed within 60s: reserving 2 ranks on Ray"
    assert [e.message for e in s.store.events(job.job_id) if e.kind is EventKind.LOG] == [
        "waiting: reserving 2 ranks on Ray"]


def test_planner_refusals_are_the_same_on_ray_nodes(tmp_path):
    s = scheduler(tmp_path, FakeRay(1))
    job = s.submit(ray_job(workers=2))
    s.tick()
    assert s.store.get_job(job.job_id).message == "waiting: needs 2 workers, 1 verified: missing 1"


def test_releasing_a_replaced_reservation_keeps_the_new_plans_reservation(tmp_path):
    """A restart planned on a node Ray had not yet marked dead is re-planned on a node that
    joined; the old plan's release (in its own thread) must not forget the new plan's placement
    group, which would then hold its nodes' herd slots forever (every later one pending)."""
    from coordinator.ray_backend import RayBackend, _Attempt

    backend = RayBackend(object, lambda: "", lambda *a: None, lambda *a: None)
    old = _Attempt("j", 2, ["ray-dead", "ray-b"], pg=object(), ready=None, created=0, touched=0)
    new = _Attempt("j", 2, ["ray-b", "ray-new"], pg=object(), ready=None, created=0, touched=0)
    backend._attempts[("j", 2)] = new  # reserve() replaced the old plan before it was released
    backend._teardown(old)  # (its placement group's removal fails here: no Ray; logged)
    assert backend._attempts == {("j", 2): new}
    backend._teardown(new)
    assert backend._attempts == {}


def test_a_ray_session_folder_the_coordinator_cannot_write_is_refused_not_an_abort(tmp_path):
    """Ray's C++ logger aborts the driver's process when its log cannot be written: under the
    shipped systemd unit (a read-only /tmp) the coordinator died on its first Ray job (an
    outside run). A read-only filesystem, as systemd's ProtectSystem makes it: refused first,
    naming the folder."""
    import subprocess

    from coordinator import ray_nodes
    from herd.errors import PlacementError

    logs = tmp_path / "ray" / "session_latest" / "logs"
    logs.mkdir(parents=True)
    ray_nodes.check_session_writable(str(tmp_path))  # writable: nothing to say
    ro = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(logs)],
                        capture_output=True, text=True)
    if ro.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {ro.stderr.strip()}")
    try:
        with pytest.raises(PlacementError, match="cannot write Ray's session folder") as e:
            ray_nodes.check_session_writable(str(tmp_path))
        assert "ReadWritePaths" in e.value.hint
    finally:
        subprocess.run(["umount", str(logs)], check=True)
    refusal = ray_nodes.connect_refusal("10.0.0.1:6379", ConnectionError(
        "AuthenticationError: InvalidAuthToken"))
    assert "token authentication" in refusal.hint and "RAY_AUTH_MODE" in refusal.hint


def test_a_refused_ray_connection_says_what_token_authentication_was_read(tmp_path,
                                                                         monkeypatch):
    """Ray 2.60 turns token authentication on for a head started where ~/.ray/auth_token
    exists; a node or driver with the same file but RAY_AUTH_MODE unset reads it as disabled
    and is refused (an outside run on the docs' commands): the hint says the variable is unset
    (it said "token") and what fixes it."""
    from herd import ray_auth

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    assert "RAY_AUTH_MODE unset (Ray reads it as disabled)" in ray_auth.describe()
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("secret\n")
    refusal = ray_nodes.connect_refusal("10.0.0.1:6379", ConnectionError("Failed to connect"))
    assert "RAY_AUTH_MODE unset (Ray reads it as disabled)" in refusal.hint, refusal.hint
    assert "auth_token present" in refusal.hint and "RAY_AUTH_MODE=token" in refusal.hint
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert "RAY_AUTH_MODE=disabled" in ray_nodes.connect_refusal("h:1", ConnectionError("x")).hint
