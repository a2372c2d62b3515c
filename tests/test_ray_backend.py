"""cluster.backend: ray end to end, on a real local Ray cluster: a head (no herd slot, as a Ray
head usually is) and two herd worker nodes from ``ray.cluster_utils.Cluster``, all on 127.0.0.2
(loopback; a separate address so Ray never rewrites it to this machine's LAN address), a real
``herd coordinator`` process driving it, the laptop CLI, real MLX rings between rank actors.

One Ray cluster per module (started once: ~15-30 s), tests in file order. Everything Ray writes
lives under a short temp dir (RAY_TMPDIR; its unix sockets need short paths), so nothing here
touches /tmp/ray or another Ray cluster on this machine.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
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

ray = pytest.importorskip("ray", reason="the Ray backend needs herd's ray extra (make setup)")
pytestmark = pytest.mark.slow
NODE_IP = "127.0.0.2"
HOST = "127.0.0.1"
NODE = {"num_cpus": 1, "node_ip_address": NODE_IP,
        "resources": {"herd_worker": 1, "herd_memory_gb": 8}}


class RayCluster:
    """A Ray head and two herd nodes, and a herd coordinator driving them."""

    def __init__(self, root: Path):
        from ray.cluster_utils import Cluster

        self.root = root
        self.home = root / "home"
        self.port = free_ports(1)[0]
        self.address = f"{HOST}:{self.port}"
        # Ray's nodes inherit this process's environment (HERD_HOME: where rank actors keep
        # their state); ranks on one box share its cores, one BLAS thread each.
        self.env = {"HERD_HOME": str(self.home), "RAY_TMPDIR": str(root),
                    "RAY_USAGE_STATS_ENABLED": "0", "OPENBLAS_NUM_THREADS": "1",
                    "HERD_LOG_LEVEL": "warning", "HERD_ZEROCONF_INTERFACES": HOST,
                    # the nodes' policy (as `herd worker --ray --model-root /` sets it)
                    "HERD_MODEL_ROOTS": "/",
                    # A loaded 2-core machine starts a node's agents slowly: wait for them
                    # (Ray's defaults, ~30 s, killed nodes here under load).
                    "RAY_agent_register_timeout_ms": "300000",
                    "RAY_raylet_start_wait_time_s": "300"}
        self._saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        for k in ("HERD_SECRET", "HERD_COORDINATOR", "RAY_ADDRESS"):
            os.environ.pop(k, None)
        self.herd("init")
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "node_ip_address": NODE_IP, "include_dashboard": False,
            # Declare a node dead after ~10 s of silence (Ray's default: ~15-30 s).
            "_system_config": {"health_check_period_ms": 1000,
                               "health_check_failure_threshold": 10}})
        self.nodes = [self.cluster.add_node(**NODE) for _ in range(2)]
        self.log = root / "coordinator.log"
        with open(self.log, "w") as out:
            self.coordinator = subprocess.Popen(
                [sys.executable, "-m", "herd", "coordinator", "--host", HOST, "--port",
                 str(self.port), "--state-dir", str(root / "coordinator"), "--ray", "auto"],
                stdout=out, stderr=subprocess.STDOUT)
        self.extra: list[subprocess.Popen] = []
        deadline = time.monotonic() + 120
        while "listening on" not in self.log.read_text():
            assert self.coordinator.poll() is None and time.monotonic() < deadline, (
                self.log.read_text()[-3000:])
            time.sleep(0.2)

    def herd(self, *args: str, timeout: float = 120, check: bool = True):
        argv = [sys.executable, "-m", "herd", *args]
        if args[0] not in ("init", "train", "worker", "coordinator", "revoke"):
            argv += ["--coordinator", self.address]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"herd {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n"
                                 f"{proc.stderr[-3000:]}")
        return proc

    def submit(self, cfg: Path) -> str:
        return self.herd("submit", str(cfg)).stdout.strip().splitlines()[-1]

    def workers(self) -> list[list[str]]:
        return [ln.split() for ln in self.herd("workers").stdout.strip().splitlines()[1:]]

    def wait_workers(self, n: int, timeout: float = 120) -> list[list[str]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = self.workers()
            if len(rows) == n:
                return rows
            time.sleep(0.5)
        raise AssertionError(f"expected {n} Ray workers, have {self.workers()}")

    def stop(self) -> None:
        for p in [*self.extra, self.coordinator]:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in [*self.extra, self.coordinator]:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        self.cluster.shutdown()
        for k, v in self._saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def rc():
    root = Path(tempfile.mkdtemp(prefix="hr-", dir="/tmp"))  # short: unix socket paths
    c = RayCluster(root)
    yield c
    c.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def job_yaml(tmp_path_factory, tiny_model, tiny_data):
    d = tmp_path_factory.mktemp("ray-jobs")
    return lambda name, **kw: write_job(d / f"{name}.yaml", tiny_model, tiny_data, **kw)


def train_single(rc: RayCluster, cfg: Path) -> None:
    """One `herd train` process: the adapter every layout must reproduce (SAME_UPDATE)."""
    proc = subprocess.run([sys.executable, "-m", "herd", "train", str(cfg), "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def events(rc: RayCluster, job_id: str) -> str:
    import grpc

    from herd.cli.connection import CoordinatorConnection
    from herd.cli.watch import describe
    from herd.rpc import pki
    from protos.v1 import coordinator_pb2

    coord = CoordinatorConnection(rc.address, pki.Identity.load(rc.home / "tls", "client"))
    lines = []
    try:
        for e in coord.stub.WatchJob(coordinator_pb2.WatchJobRequest(job_id=job_id), timeout=1.0):
            lines.append(describe(e, 0))
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e
    finally:
        coord.close()
    return "\n".join(lines)


def wait_for(rc: RayCluster, job_id: str, text: str, timeout: float = 180) -> str:
    """The job's events up to the first that says ``text``, read from its stream as they come:
    the job runs on meanwhile (a poll that replays every event would act on it seconds late)."""
    import grpc

    from herd.cli.connection import CoordinatorConnection
    from herd.cli.watch import describe
    from herd.rpc import pki
    from protos.v1 import coordinator_pb2

    coord = CoordinatorConnection(rc.address, pki.Identity.load(rc.home / "tls", "client"))
    lines = []
    try:
        for e in coord.stub.WatchJob(coordinator_pb2.WatchJobRequest(job_id=job_id),
                                     timeout=timeout):
            lines.append(describe(e, 0))
            if text in lines[-1]:
                return "\n".join(lines)
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e
    finally:
        coord.close()
    raise AssertionError(f"no {text!r} in {job_id}'s events:\n" + "\n".join(lines)[-3000:])


def test_herd_workers_lists_the_ray_nodes_with_their_resources(rc):
    rows = rc.wait_workers(2)
    print("\n".join(" ".join(r) for r in rows))
    header = rc.herd("workers").stdout.splitlines()[0].split()
    assert header[-2:] == ["JOB", "RESOURCES"], header  # rows are read from the end below
    assert all(r[0].startswith("ray-") and r[1] == f"ray:{NODE_IP}" for r in rows), rows
    assert all("herd_memory_gb=8" in r[-1] and "herd_worker=1" in r[-1] for r in rows), rows
    assert all(r[2:4] == ["8.0", "GiB"] for r in rows), rows  # herd_memory_gb is the memory


@pytest.fixture(scope="module")
def single_adapter(rc, job_yaml, tmp_path_factory) -> Path:
    """One `herd train` process, iters 8, global batch 4: what the Ray jobs below must give."""
    out = tmp_path_factory.mktemp("ray-single") / "adapters"
    train_single(rc, job_yaml("ray-single", adapter_path=str(out), **SHORT))
    return out


SHORT = dict(iters=8, save_every=4, **SAME_UPDATE)


def test_a_two_rank_job_runs_one_rank_per_ray_node_and_equals_herd_train(
        rc, job_yaml, single_adapter, tmp_path):
    cfg = job_yaml("ray-dp2", cluster={"workers": 2, "backend": "ray"}, **SHORT)
    job_id = rc.submit(cfg)
    watch = rc.herd("watch", job_id, "--plain", timeout=300)
    lines = watch.stdout.splitlines()
    tail = watch.stdout[-3000:]
    assert f"{job_id}: state succeeded" in lines, tail
    assert f"{job_id}: checkpoint 8 stored" in lines, tail
    # (an attempt that failed on a loaded machine is retried from its checkpoint, as designed:
    # the attempt that finished is the one read here)
    last = max(i for i, ln in enumerate(lines) if ": state placing" in ln)
    ranks_on = {ln.split("(")[1].split(")")[0] for ln in lines[last:]
                if " rank " in ln and "(" in ln}
    nodes = {r[0] for r in rc.workers()}
    assert len(ranks_on) == 2 and ranks_on == nodes, (ranks_on, nodes, tail)
    fetched = [ln for ln in lines[last:] if ": fetched rank " in ln]  # each actor's model,
    assert len(fetched) == 2 and all(" from local: " in ln for ln in fetched), tail  # first
    deadline = time.monotonic() + 60  # its actors end and its placement group is removed
    while any(r[-2] != "-" for r in rc.workers()) and time.monotonic() < deadline:  # r[-2]: JOB
        time.sleep(0.5)
    assert all(r[-2] == "-" for r in rc.workers()), "a finished job's actors still hold a node"
    out = tmp_path / "pulled"
    rc.herd("pull", job_id, "-o", str(out))
    rel = update_diff(load_adapter(out), load_adapter(single_adapter), initial_adapter(cfg))
    print(f"Ray 2-rank job vs one process: the update differs by {rel:.2e} of its size")
    assert rel <= SAME_UPDATE_RTOL, f"Ray adapter differs from a single process by {rel:.2e}"


def test_a_two_stage_pipeline_job_runs_on_ray_the_same_way(rc, job_yaml, single_adapter,
                                                             tmp_path):
    cfg = job_yaml("ray-pp2", **SHORT, cluster={
        "workers": 2, "backend": "ray", "parallelism": {"data": 1, "pipeline": 2}})
    job_id = rc.submit(cfg)
    watch = rc.herd("watch", job_id, "--plain", timeout=300)
    lines = watch.stdout.splitlines()
    assert f"{job_id}: state succeeded" in lines, watch.stdout[-3000:]
    assert any("as 1 x 2 (data x pipeline), blocks 0:1,1:2" in ln for ln in lines), lines
    assert f"{job_id}: checkpoint 8 stored" in lines
    out = tmp_path / "pulled"
    rc.herd("pull", job_id, "-o", str(out))
    rel = update_diff(load_adapter(out), load_adapter(single_adapter), initial_adapter(cfg))
    print(f"Ray 2-stage pipeline vs one process: the update differs by {rel:.2e}")
    assert rel <= SAME_UPDATE_RTOL, f"pipeline adapter differs from a single process by {rel:.2e}"


def test_the_grpc_exchange_runs_on_ray_the_same_way(rc, job_yaml, single_adapter, tmp_path):
    """`exchange: grpc` between rank actors (their reserved exchange ports, rank credentials the
    coordinator signs): the same adapter as one process."""
    cfg = job_yaml("ray-grpc", cluster={"workers": 2, "backend": "ray", "exchange": "grpc"},
                   **SHORT)
    job_id = rc.submit(cfg)
    watch = rc.herd("watch", job_id, "--plain", timeout=300)
    lines = watch.stdout.splitlines()
    assert f"{job_id}: state succeeded" in lines, watch.stdout[-3000:]
    assert any(ln.endswith("[grpc x2]") for ln in lines), watch.stdout[-3000:]
    out = tmp_path / "pulled"
    rc.herd("pull", job_id, "-o", str(out))
    rel = update_diff(load_adapter(out), load_adapter(single_adapter), initial_adapter(cfg))
    print(f"Ray 2-rank gRPC-exchange job vs one process: the update differs by {rel:.2e}")
    assert rel <= SAME_UPDATE_RTOL, f"gRPC exchange on Ray differs from one process by {rel:.2e}"


def _live_rank_pids(rc: RayCluster, job_id: str) -> list[int]:
    """The job's rank processes still alive on any Ray node (zombies count as gone)."""
    alive = []
    for pid_file in (rc.home / "ray-worker").glob(f"*/jobs/{job_id}/attempt-*/rank.pid"):
        pid = int(pid_file.read_text().split()[0])
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.append(pid)
    return alive


def test_cancel_stops_a_ray_jobs_ranks_and_frees_its_nodes(rc, job_yaml):
    cfg = job_yaml("ray-cancel", iters=100000, save_every=4, steps_per_report=4,
                   cluster={"workers": 2, "backend": "ray"})
    job_id = rc.submit(cfg)
    wait_for(rc, job_id, "checkpoint 4 stored")
    assert len(_live_rank_pids(rc, job_id)) == 2
    assert rc.herd("cancel", job_id).stdout.strip() == f"{job_id}: cancelled"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (
            _live_rank_pids(rc, job_id) or any(r[-2] != "-" for r in rc.workers())):
        time.sleep(0.5)
    assert _live_rank_pids(rc, job_id) == [], "ranks still running 60 s after cancel"
    assert all(r[-2] == "-" for r in rc.workers()), "a cancelled job's actors still hold a node"
    watch = rc.herd("watch", job_id, "--plain", check=False)
    assert watch.returncode == 11 and "cancelled by client/" in watch.stderr, watch.stderr


def test_a_revoked_ray_node_is_no_worker_and_a_job_runs_on_the_others(rc, job_yaml):
    """`herd revoke worker/ray-<node>` (docs/ray.md's remedy): that node leaves `herd workers`
    and is never chosen. It stayed listed, the next job chose it, the scheduler's tick failed
    signing its credential, and the job hung in placing with the queue behind it (an outside
    run). (The revocation is undone after: the module's other tests use both nodes.)"""
    victim = rc.wait_workers(2)[0][0]
    revoked = rc.home / "tls" / "revoked.json"
    before = revoked.read_text() if revoked.exists() else None
    rc.herd("revoke", "--unissued", f"worker/{victim}")  # (issued or not: run alone, not)
    try:
        rows = rc.wait_workers(1, timeout=30)
        assert victim not in [r[0] for r in rows], rows
        cfg = job_yaml("ray-revoked", iters=4, save_every=4,
                       cluster={"workers": 1, "backend": "ray"})
        job_id = rc.submit(cfg)
        seen = wait_for(rc, job_id, "state succeeded", timeout=200)
        assert f"starting 1 ranks on {rows[0][0]}" in seen and victim not in seen, seen
    finally:
        if before is None:
            revoked.unlink(missing_ok=True)
        else:
            revoked.write_text(before)
    rc.wait_workers(2, timeout=60)


def test_a_job_on_another_ray_cluster_is_refused_at_submit(rc, job_yaml):
    """A coordinator drives one Ray cluster: a job naming another is refused before it is
    queued, with both addresses."""
    port = free_ports(1)[0]
    cfg = job_yaml("ray-other", cluster={"workers": 2, "backend": "ray",
                                         "ray_address": f"127.0.0.3:{port}"})
    proc = rc.herd("submit", str(cfg), check=False)
    assert proc.returncode == 4, proc.stderr  # PlacementError
    assert f"asks for 127.0.0.3:{port}" in proc.stderr and NODE_IP in proc.stderr, proc.stderr


@pytest.mark.timeout(600)  # a job, a lost node (~10 s to declare), a node joining, a resumed job
def test_a_killed_raylet_restarts_the_job_from_its_checkpoint_once_a_node_joins(
        rc, job_yaml, tmp_path):
    """Done-when 2: one node's raylet is SIGKILLed mid-job. Ray reports the actor's death and
    then the node's; the attempt fails, and with one herd node left the job waits and says so.
    A node joins with `herd worker --ray`; the job resumes on it from the last checkpoint stored
    before the kill, and its adapter equals one uninterrupted process's."""
    # Long enough to outlast Ray's own detection of the dead node (10 health checks of 1 s)
    # after the kill: 60 iterations finished first on a faster host, and the job succeeded
    # before Ray said the node was gone (seen in CI).
    kw = dict(iters=150, save_every=4, steps_per_report=4, **SAME_UPDATE)
    cfg = job_yaml("ray-killed", cluster={"workers": 2, "backend": "ray", "max_restarts": 2},
                   **kw)
    job_id = rc.submit(cfg)
    seen = wait_for(rc, job_id, "checkpoint 8 stored")
    placed = re.search(r"starting 2 ranks on (ray-\w+), (ray-\w+)", seen)
    victim = next(n for n in rc.nodes if placed and f"ray-{n.node_id[:8]}" == placed.group(1))
    raylet = victim.all_processes["raylet"][0].process
    raylet.kill()  # the raylet alone, by SIGKILL
    # ...and reaped, as init reaps it on a real node: its workers check that their raylet is
    # alive with kill(pid, 0), which a zombie child of this test process still passes, so
    # unreaped the rank would train on until Ray's health checks drop the node (~15 s and more
    # on a loaded machine: the job could end first, as seen in CI).
    raylet.wait(timeout=30)
    stored = max(int(n) for n in re.findall(r"checkpoint (\d+) stored", seen))
    print(f"killed the raylet of {placed.group(1)} (rank 0) after checkpoint {stored}")
    seen = wait_for(rc, job_id, "waiting: needs 2 workers, 1 verified: missing 1")
    # (the reason may carry its hint on the next line; then the restart's backoff)
    restarted = re.search(r"state restarting: attempt 1 failed: .*?; restarting from checkpoint "
                          r"\d+ in \d+s", seen, re.S)
    assert restarted, seen
    print(restarted.group(0))
    # Ray's own feed saw it too (after its health checks): the node left herd's workers.
    assert "ray_node_lost" in (rc.root / "coordinator.log").read_text()
    # A new Mac joins the Ray cluster as a herd node (ports of its own: this machine runs the
    # other nodes too).
    p = free_ports(5)
    join = subprocess.Popen(
        [sys.executable, "-m", "herd", "worker", "--ray", rc.cluster.address, "--host", NODE_IP,
         "--memory", "8GB", "--", "--num-cpus=1", f"--dashboard-agent-listen-port={p[0]}",
         f"--dashboard-agent-grpc-port={p[1]}", f"--metrics-export-port={p[2]}",
         f"--runtime-env-agent-port={p[3]}", "--min-worker-port=0", "--max-worker-port=0"],
        stdout=open(rc.root / "join.log", "w"), stderr=subprocess.STDOUT)
    rc.extra.append(join)
    watch = rc.herd("watch", job_id, "--plain", timeout=300, check=False)
    seen = events(rc, job_id)
    assert "state succeeded" in seen, seen[-3000:] + (rc.root / "join.log").read_text()[-2000:]
    resumed = [int(n) for n in re.findall(r"resuming from checkpoint (\d+)", seen)]
    assert resumed and resumed[-1] >= stored, seen
    assert watch.returncode == 0
    out = tmp_path / "pulled"
    rc.herd("pull", job_id, "-o", str(out))
    single = job_yaml("ray-killed-single", adapter_path=str(tmp_path / "single"), **kw)
    train_single(rc, single)
    rel = update_diff(load_adapter(out), load_adapter(tmp_path / "single"),
                      initial_adapter(single))
    print(f"Ray job after a lost node vs one process: the update differs by {rel:.2e}")
    assert rel <= SAME_UPDATE_RTOL, f"resumed adapter differs from one process by {rel:.2e}"


def test_the_coordinator_stops_cleanly_on_sigterm(rc):
    """(Last: it stops the module's coordinator.) What systemd and `herd down` send: the
    coordinator's own stop runs and it exits 0. A Ray driver exits on SIGTERM by Ray's handler
    and dumps a crash report by absl's: exit 134 or 15 and a stack dump (an outside run)."""
    rc.coordinator.send_signal(signal.SIGTERM)
    assert rc.coordinator.wait(timeout=60) == 0, rc.log.read_text()[-3000:]
    log = rc.log.read_text()
    assert "SIGTERM received" not in log and "Traceback" not in log, log[-3000:]
