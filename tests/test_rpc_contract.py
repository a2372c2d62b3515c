"""The contract's promises, checked through real gRPC servers on loopback: an error keeps its
class (and so its exit code) across the wire, and every rpc whose proto comment says it is safe to
call twice is (Ray's rule: idempotent, or say that it is not)."""

from __future__ import annotations

import hashlib
import os
import time

import grpc
import pytest

from herd import errors
from herd.rpc import auth, pki
from herd.rpc.channel import bind, secure_channel, secure_server
from herd.rpc.status import abort, rpc_errors

HOST = "127.0.0.1"

RAISED = [errors.ConfigError, errors.DatasetError, errors.PlacementError, errors.DoesNotFitError,
          errors.PeerLostError, errors.AuthError, errors.NotFoundError, errors.ChecksumError,
          errors.ProtocolError, errors.HerdError]


@pytest.fixture
def raising_server(cluster_ca):
    """A server whose one method aborts with the error class named in the request."""
    def handler(request: bytes, context):
        cls = next(c for c in RAISED if c.__name__ == request.decode())
        abort(context, cls(f"the server says {cls.__name__}", hint="fix it there"))

    me = cluster_ca.issue("coordinator", "raiser")
    server = secure_server(me, auth.rules("test.Raise", {"Raise": "client"}), max_workers=2)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "test.Raise", {"Raise": grpc.unary_unary_rpc_method_handler(handler)})])
    port = bind(server, me, f"{HOST}:0")
    server.start()
    channel = secure_channel(f"{HOST}:{port}", cluster_ca.issue("client", "tester"),
                             pki.dns_name("coordinator"))
    yield f"{HOST}:{port}", channel.unary_unary("/test.Raise/Raise")
    channel.close()
    server.stop(grace=0).wait()


@pytest.mark.parametrize("cls", RAISED, ids=lambda c: c.__name__)
def test_a_servers_error_reaches_the_client_as_the_same_class(raising_server, cls):
    target, call = raising_server
    with pytest.raises(errors.HerdError) as got:
        with rpc_errors(target):
            call(cls.__name__.encode(), timeout=5)
    assert type(got.value) is cls
    assert got.value.exit_code == cls.exit_code
    assert got.value.message == f"the server says {cls.__name__}\n  hint: fix it there"


# --- a real coordinator ----------------------------------------------------------------------

class FakeLauncher:
    """The scheduler's launcher, recording instead of calling workers."""

    def __init__(self):
        self.started, self.stopped = [], []

    def prepare_rank(self, launch, on_progress):
        pass

    def start_rank(self, launch):
        self.started.append(launch)

    def stop_job(self, w, job_id, attempt=0):
        self.stopped.append((w.worker_id, job_id))


class Ids:
    """The identities a test's processes hold, all from the session's cluster CA."""

    def __init__(self, ca):
        self.ca = ca
        self.coordinator = ca.issue("coordinator", "coord")
        self.client = ca.issue("client", "tester")
        self.worker = ca.issue("worker", "w1")


def serve(ids: Ids, state, workers: list, port: int = 0):
    """A real CoordinatorService on loopback over the stores in ``state`` (db, blobs/,
    adapters/; no zeroconf), whose launcher only records: (server, port, scheduler)."""
    from coordinator.artifacts import AdapterStore, BlobStore
    from coordinator.registry import Registry
    from coordinator.scheduler import Scheduler
    from coordinator.service import RULES, CoordinatorServicer, add_to_server
    from coordinator.store import JobStore

    server = secure_server(ids.coordinator, RULES, max_workers=4)
    port = bind(server, ids.coordinator, f"{HOST}:{port}")
    s = Scheduler(JobStore(state / "db"), lambda: list(workers), FakeLauncher())
    add_to_server(CoordinatorServicer(s, Registry(ids.coordinator), BlobStore(state / "blobs"),
                                      AdapterStore(state / "adapters")), server)
    server.start()
    return server, port, s


@pytest.fixture
def coordinator(tmp_path, cluster_ca):
    """A real coordinator (``serve``) under tmp_path/coordinator, whose workers the test lists.
    Yields its address, the identities (``Ids``), the scheduler and the workers list."""
    ids = Ids(cluster_ca)
    workers: list = []
    server, port, s = serve(ids, tmp_path / "coordinator", workers)
    yield f"{HOST}:{port}", ids, s, workers
    server.stop(grace=0).wait()


def running_on(s, name: str, worker: str = "w1", attempt: int = 1, ranks: int = 1) -> None:
    """Mark a submitted job as running its ``attempt`` on ``worker`` (what placement would do),
    ``ranks`` of them there: a worker's uploads and fetches are only taken for a job it runs, a
    checkpoint only from the rank that saves it."""
    from coordinator.domain import JobState

    job = s.store.get_job(name)
    job.state, job.attempt, job.worker_ids = JobState.RUNNING, attempt, [worker] * ranks
    s.store.put_job(job)


def test_herd_submit_of_a_dataset_the_coordinator_refuses_exits_3(coordinator, tmp_path, capsys,
                                                                  monkeypatch):
    from herd.cli import laptop

    target, ids, _, _ = coordinator
    ids.client.save(tmp_path / "tls")
    data = tmp_path / "data"
    data.mkdir()
    (data / "valid.jsonl").write_text('{"text": "ok"}\n')  # no train.jsonl: refused by the server
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"model: /nonexistent/model\ndata: {data}\n")
    assert laptop.main(["submit", str(cfg), "--no-check", "--coordinator", target,
                        "--tls-dir", str(tmp_path / "tls")]) == 3
    err = capsys.readouterr().err
    assert "herd submit: the dataset has no train.jsonl" in err
    assert "hint: a dataset folder holds train.jsonl" in err


def test_herd_submit_of_a_bad_line_the_coordinator_refuses_names_its_file_and_line(
        coordinator, tmp_path, capsys):
    """--no-check skips the laptop's check; the coordinator reads the uploaded records itself
    (structurally: it holds no tokenizer) and refuses the job by file and line, exit 3."""
    from herd.cli import laptop

    target, ids, _, _ = coordinator
    ids.client.save(tmp_path / "tls")
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text('{"text": "ok"}\n{"text": "cut\n{"text": 7}\n'
                                      '{"text": "ok"}\n')
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"model: /nonexistent/model\ndata: {data}\nbatch_size: 1\n")
    assert laptop.main(["submit", str(cfg), "--no-check", "--coordinator", target,
                        "--tls-dir", str(tmp_path / "tls")]) == 3
    err = capsys.readouterr().err
    assert f"dataset {data} has 2 problem(s)" in err, err  # the user's folder, not a temp one
    assert "train.jsonl: 1 malformed JSON line (line 2); line 2: Unterminated string starting " \
        "at column 10" in err, err
    assert "train.jsonl: 1 record whose 'text' is not a string (line 3)" in err, err


# --- a real worker agent ---------------------------------------------------------------------

@pytest.fixture
def agent(tmp_path):
    """A real WorkerService on loopback (no zeroconf); ``start(identity)`` gives its address and
    state. Its model root is the filesystem (the tests' tiny models live in temp folders)."""
    from pathlib import Path

    from herd.rpc.ports import kept_ports
    from worker.agent.machine import probe
    from worker.agent.policy import Policy
    from worker.agent.service import RULES, Worker, WorkerServicer, add_to_server

    def start(identity):
        server = secure_server(identity, RULES, max_workers=4)
        port = bind(server, identity, f"{HOST}:0")
        worker = Worker(identity.name, HOST, port, *kept_ports(2, HOST), probe(),
                        tmp_path / "worker", identity, policy=Policy(model_roots=(Path("/"),)))
        add_to_server(WorkerServicer(worker), server)
        server.start()
        started.append((server, worker))
        return f"{HOST}:{port}", worker

    started: list = []
    yield start
    for server, worker in started:
        worker.stop_all()
        server.stop(grace=0).wait()


def _job(name: str, model: str = "/nonexistent/model", **cluster):
    from coordinator.domain import FileDigest, Job
    from herd.config import parse_config

    cfg = parse_config({"model": model, "iters": 100_000, "batch_size": 4, "num_layers": -1,
                        "cluster": {"workers": 1, **cluster}})
    return Job(job_id=name, name=name, config=cfg, dataset=[FileDigest("train.jsonl", "a" * 64, 1)],
               workers_needed=1, iters=cfg.iters)


def test_a_peer_the_server_lost_is_named_not_the_server(agent, tmp_path, cluster_ca):
    """The worker's agent cannot reach the coordinator it was given: the coordinator's call
    fails naming that address (the agent's own PeerLostError), not the worker it called."""
    from coordinator.worker_client import WorkerClient
    from herd.rpc.ports import free_ports
    from protos.v1 import common_pb2, worker_pb2

    ids = Ids(cluster_ca)
    target, _ = agent(ids.worker)
    gone = f"{HOST}:{free_ports(1)[0]}"  # nothing listens here
    rank = cluster_ca.issue("rank", pki.rank_scope("j", 1))
    request = worker_pb2.StartRankRequest(
        job_id="j", attempt=1, rank=0, world_size=1, config_yaml="model: m\n", coordinator=gone,
        dataset=[common_pb2.FileDigest(name="train.jsonl", sha256="a" * 64, bytes=1)],
        rank_cert_pem=rank.cert_pem, rank_key_pem=rank.key_pem)
    client = WorkerClient(target, ids.coordinator, "w1")
    try:
        with pytest.raises(errors.PeerLostError) as lost:
            client.start_rank(request)
    finally:
        client.close()
    assert lost.value.message.startswith(f"{gone} is unreachable"), lost.value.message
    assert f"{target} is unreachable" not in lost.value.message


# --- uploads resume ----------------------------------------------------------------------

MIB = 1024 * 1024


def test_a_broken_upload_resumes_from_the_bytes_the_coordinator_kept(coordinator, tmp_path):
    """A laptop's upload cut after 3 MiB of 8: the coordinator keeps what arrived, says how much
    (MissingBlobs), and the next upload sends only the rest; the blob is whole and checked."""
    from herd.cli.connection import CoordinatorConnection
    from herd.digest import sha256_file
    from herd.rpc.files import read_chunks
    from protos.v1 import coordinator_pb2

    target, ids, _, _ = coordinator
    data = tmp_path / "big.bin"
    data.write_bytes(os.urandom(8 * MIB))
    sha = sha256_file(data)

    partial = tmp_path / "coordinator" / "blobs" / f".{sha}.part-upload"

    def cut_after_3_mib():
        yield coordinator_pb2.PutBlobRequest(sha256=sha, size=8 * MIB)  # (as put_blob says it)
        for n, block in enumerate(read_chunks(data)):
            if n == 3:  # (once the server wrote them: a cancel may overtake chunks in flight)
                for _ in range(100):
                    if partial.exists() and partial.stat().st_size == 3 * MIB:
                        break
                    time.sleep(0.1)
                raise ConnectionResetError("the laptop's Wi-Fi went away")
            yield coordinator_pb2.PutBlobRequest(data=block)

    with CoordinatorConnection(target, ids.client) as c:
        with pytest.raises(errors.HerdError):
            with rpc_errors(target):
                c.stub.PutBlob(cut_after_3_mib(), timeout=30)
        held = c.missing([sha])[sha]
        assert held == 3 * MIB  # every chunk that arrived is kept
        with pytest.raises(errors.ProtocolError, match="resumes at byte 4194304, but 3145728"):
            c.put_blob(data, sha, held=4 * MIB)  # (past what is held: refused, not a hole)
        sent = []
        c.put_blob(data, sha, sent.append, held=held)
        assert sum(sent) == 5 * MIB  # the rest, no more
        assert c.missing([sha]) == {}
    blobs = tmp_path / "coordinator" / "blobs"
    assert [p.name for p in blobs.iterdir()] == [sha]  # (no partial left)
    assert (blobs / sha).read_bytes() == data.read_bytes()


def test_a_cut_that_ends_as_a_clean_end_of_stream_keeps_what_arrived(tmp_path):
    """gRPC may end a cancelled call's request stream as a clean end (a loaded coordinator in
    CI: the bytes that had arrived were thrown away as a corrupted upload). An upload that said
    its size and ends short of it was cut: kept; one that said none, or all of it, is checked."""
    from coordinator.artifacts import BlobStore

    blobs = BlobStore(tmp_path / "blobs")
    data = os.urandom(3 * MIB)
    sha = hashlib.sha256(data).hexdigest()
    with pytest.raises(errors.PeerLostError, match=f"cut at byte {MIB} of {3 * MIB}"):
        blobs.put(sha, iter([data[:MIB]]), size_said=3 * MIB)
    assert blobs.held(sha) == MIB
    assert blobs.put(sha, iter([data[MIB:]]), offset=MIB, size_said=3 * MIB) == 3 * MIB
    assert blobs.has(sha) and blobs.held(sha) == 0
    other = hashlib.sha256(b"x" * 10).hexdigest()
    with pytest.raises(errors.ChecksumError):  # (short, size unsaid: corrupted, not kept)
        blobs.put(other, iter([b"x" * 5]))
    assert blobs.held(other) == 0


def test_an_upload_goes_on_across_a_coordinator_restart(tmp_path, cluster_ca, capsys):
    """The coordinator killed mid-upload and started again on the same state: put_blob waits for
    it, asks where to resume, and sends the rest; a start-over would send 40 MiB before the cut
    and all 64 again."""
    import threading

    from herd.cli.connection import CoordinatorConnection
    from herd.digest import sha256_file

    ids, state, workers = Ids(cluster_ca), tmp_path / "coordinator", []
    server, port, _ = serve(ids, state, workers)
    data = tmp_path / "shard.safetensors"
    data.write_bytes(os.urandom(64 * MIB))
    sha = sha256_file(data)
    servers, bar, chunks = [server], [], []

    def restart():
        servers[0].stop(grace=0).wait()
        time.sleep(1.0)  # (a supervisor's restart takes a while: the laptop's tries fail)
        for _ in range(100):  # (the old listener's port is released soon after its stop)
            again, bound, _ = serve(ids, state, workers, port)
            servers.append(again)
            if bound == port:
                return
            time.sleep(0.1)

    def on_bytes(n: int) -> None:
        bar.append(n)
        if threading.current_thread() is not threading.main_thread():  # (gRPC's sending thread)
            chunks.append(n)  # (the main thread's calls set the bar to what the server kept)
            if sum(chunks) == 40 * MIB:
                threading.Thread(target=restart).start()

    try:
        with CoordinatorConnection(f"{HOST}:{port}", ids.client) as c:
            c.put_blob(data, sha, on_bytes, patience_s=60)
            assert c.missing([sha]) == {}
    finally:
        for s in servers:
            s.stop(grace=0).wait()
    assert len(servers) >= 2  # (the cut happened)
    assert "herd: the upload of shard.safetensors was cut" in capsys.readouterr().err  # said once
    assert sum(bar) == 64 * MIB  # the progress bar ends at the file's size
    # What was in flight at the cut (gRPC's window, socket buffers: a few MiB, or nothing when
    # the server had read it all, as on a loaded machine: CI) is sent again.
    assert 64 * MIB <= sum(chunks) < 64 * MIB + 16 * MIB
    assert (state / "blobs" / sha).read_bytes() == data.read_bytes()


def test_an_upload_of_a_blob_already_in_flight_does_not_share_its_partial_file(tmp_path):
    """Two laptops uploading the same bytes at once: the second writes a file of its own (from
    byte 0; a resume is told to wait), and both end with the one blob."""
    from coordinator.artifacts import BlobStore
    from herd.digest import sha256_file
    from herd.rpc.files import read_chunks

    blobs = BlobStore(tmp_path / "blobs")
    data = tmp_path / "train.jsonl"
    data.write_bytes(os.urandom(3 * MIB))
    sha = sha256_file(data)
    blobs.root.joinpath(f".{sha}.part-upload").write_bytes(data.read_bytes()[:MIB])

    def first():  # the upload in flight, resumed at 1 MiB; the second runs within it
        for n, block in enumerate(read_chunks(data, MIB)):
            if n == 0:
                with pytest.raises(errors.PeerLostError, match="in flight"):
                    blobs.put(sha, read_chunks(data, MIB), offset=MIB)
                assert blobs.put(sha, read_chunks(data)) == 3 * MIB
            yield block

    assert blobs.put(sha, first(), offset=MIB) == 3 * MIB
    assert [p.name for p in blobs.root.iterdir()] == [sha]
    assert (blobs.root / sha).read_bytes() == data.read_bytes()


# --- rpcs whose proto comment says they are safe to call twice -------------------------------

def test_put_blob_twice_keeps_one_blob(coordinator, tmp_path):
    """PutBlob: 'Idempotent: a blob already held is accepted.'"""
    from herd.cli.connection import CoordinatorConnection
    from herd.digest import sha256_file

    target, ids, _, _ = coordinator
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "the cat is red."}\n' * 1000)
    sha = sha256_file(data)
    with CoordinatorConnection(target, ids.client) as c:
        c.put_blob(data, sha)
        c.put_blob(data, sha)
    blobs = tmp_path / "coordinator" / "blobs"
    assert [p.name for p in blobs.iterdir()] == [sha]
    assert (blobs / sha).read_bytes() == data.read_bytes()


def _checkpoint(folder, step: int, value: float):
    import mlx.core as mx

    from worker.rank.checkpoint import write_manifest

    folder.mkdir(parents=True)
    mx.save_safetensors(str(folder / "adapters.safetensors"),
                        {"model.layers.0.q.lora_a": mx.full((2, 3), value)})
    (folder / "adapter_config.json").write_text('{"num_layers": -1}')
    write_manifest(folder, step)
    return folder


def test_put_checkpoint_twice_per_step_stores_it_once(coordinator, tmp_path):
    """PutCheckpoint: 'Idempotent per (job, step)', a stage's piece included: the same upload
    again leaves one checkpoint with the same bytes, and a piece again merges nothing new."""
    from herd.cli.connection import CoordinatorConnection
    from herd.stage_cut import StagePiece
    from worker.agent.coordinator_client import CoordinatorClient

    target, ids, s, _ = coordinator
    for name in ("plain", "piped"):
        s.submit(_job(name))
        running_on(s, name, ranks=2 if name == "piped" else 1)  # (a stage per rank)
    folder = _checkpoint(tmp_path / "step4", 4, 1.0)
    client = CoordinatorClient(target, ids.worker)
    try:
        for _ in range(2):
            client.put_checkpoint("plain", 1, 4, folder)
        assert [c.step for c in s.store.checkpoints("plain")] == [4]
        with CoordinatorConnection(target, ids.client) as c:
            c.pull("plain", 4, tmp_path / "pulled")
        assert ((tmp_path / "pulled" / "adapters.safetensors").read_bytes()
                == (folder / "adapters.safetensors").read_bytes())

        s0 = _checkpoint(tmp_path / "s0", 4, 1.0)
        s1 = _checkpoint(tmp_path / "s1", 4, 2.0)
        client.put_checkpoint("piped", 1, 4, s0, StagePiece(0, 2, 0, 1))
        client.put_checkpoint("piped", 1, 4, s1, StagePiece(1, 2, 1, 2))
        merged = (tmp_path / "coordinator" / "adapters" / "piped" / "0000004" /
                  "adapters.safetensors").read_bytes()
        events = len(s.store.events("piped"))
        client.put_checkpoint("piped", 1, 4, s1, StagePiece(1, 2, 1, 2))
        assert [c.step for c in s.store.checkpoints("piped")] == [4]
        assert len(s.store.events("piped")) == events  # no second "checkpoint 4 stored"
        assert (tmp_path / "coordinator" / "adapters" / "piped" / "0000004" /
                "adapters.safetensors").read_bytes() == merged
    finally:
        client.close()


def test_report_rank_exit_twice_changes_the_job_once(coordinator):
    """ReportRank: 'Safe to retry (latest wins)': an agent that retries an exit report (its first
    reply lost) neither fails nor restarts the job twice."""
    from coordinator.domain import Checkpoint, FileDigest, JobState, WorkerRecord
    from protos.v1 import coordinator_pb2
    from worker.agent.coordinator_client import CoordinatorClient

    target, ids, s, workers = coordinator
    workers.append(WorkerRecord(worker_id="w1", host=HOST, port=1, ring_port=2, exchange_port=3,
                                memory_bytes=2**34, free_memory_bytes=2**34))
    client = CoordinatorClient(target, ids.worker)
    try:
        for name, code, after in (("ok", 0, JobState.SUCCEEDED),
                                  ("killed", -9, JobState.RESTARTING)):
            s.submit(_job(name, max_restarts=1))
            s.tick()
            assert s.store.get_job(name).state is JobState.RUNNING
            # The final adapter is stored before the exit is reported (worker/agent/relay.py);
            # the killed rank got as far as an earlier one (after the final one it would succeed).
            step = 100_000 if code == 0 else 50_000
            s.on_checkpoint(Checkpoint(name, step, [FileDigest("a", "b" * 64, 1)], 0))
            exit_ = coordinator_pb2.ReportRankRequest(
                job_id=name, attempt=1, rank=0, worker_id="w1",
                exit=coordinator_pb2.RankExit(exit_code=code, error="" if code == 0 else "killed"))
            assert client.report(exit_) is True
            events = s.store.events(name)
            assert client.report(exit_) is True
            assert s.store.get_job(name).state is after
            assert s.store.events(name) == events
    finally:
        client.close()


def test_cancel_job_twice_cancels_once(coordinator):
    """CancelJob: 'Idempotent; a finished job is unchanged.'"""
    from coordinator.domain import EventKind, JobState
    from herd.cli.connection import CoordinatorConnection
    from protos.v1 import common_pb2, coordinator_pb2

    target, ids, s, _ = coordinator
    s.submit(_job("c"))
    with CoordinatorConnection(target, ids.client) as c:
        replies = [c.call("CancelJob", coordinator_pb2.CancelJobRequest(job_id="c")).state
                   for _ in range(2)]
    assert replies == [common_pb2.JOB_STATE_CANCELLED] * 2
    states = [e.state for e in s.store.events("c") if e.kind is EventKind.STATE]
    assert states == [JobState.QUEUED, JobState.CANCELLED]


def test_start_rank_twice_runs_one_rank_and_stop_job_twice_stops_it_once(
        coordinator, agent, tmp_path, tiny_model):
    """StartRank: 'idempotent for the same (job, attempt, rank)': the second call returns the
    running rank's pid and starts nothing. StopJob: 'Idempotent': the second finds nothing."""
    from coordinator import convert
    from coordinator.domain import RankLaunch, WorkerRecord
    from herd.cli.connection import CoordinatorConnection
    from herd.digest import file_digest
    from protos.v1 import worker_pb2, worker_pb2_grpc

    target, ids, s, _ = coordinator
    address, worker = agent(ids.worker)
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "the cat is red."}\n' * 8)
    with CoordinatorConnection(target, ids.client) as c:
        c.put_blob(data, file_digest(data).sha256)
    job = _job("twice", model=str(tiny_model))
    job.dataset = [file_digest(data)]
    s.submit(job)
    running_on(s, "twice")  # the worker fetches its dataset, and reports
    job.attempt = 1
    me = WorkerRecord(worker_id="w1", host=HOST, port=0, ring_port=0, exchange_port=0,
                      memory_bytes=0)
    request = convert.launch_to_pb(RankLaunch(job, 0, me, [f"{HOST}:1"], [f"{HOST}:2"]), target,
                                   ids.ca.issue("rank", pki.rank_scope("twice", 1)))
    channel = secure_channel(address, ids.coordinator, pki.dns_name("worker", "w1"))
    try:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        pids = [stub.StartRank(request, timeout=120).pid for _ in range(2)]
        assert pids[0] == pids[1] == worker.rank.proc.pid
        stop = worker_pb2.StopJobRequest(job_id="twice")
        assert [stub.StopJob(stop, timeout=30).was_running for _ in range(2)] == [True, False]
        assert worker.rank.proc.poll() is not None
        deadline = time.monotonic() + 15  # its relay reports the exit, then the rank is done
        while worker.rank.running() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not worker.rank.running()
    finally:
        channel.close()


def test_an_upload_has_time_for_its_size_on_a_slow_uplink():
    """One deadline of 600 s cut every dataset over ~300 MB on a 4 Mbit/s uplink, however often
    it was retried (an outside run): an upload's deadline grows with its size, room for 2
    Mbit/s."""
    from herd.rpc.channel import TRANSFER_DEADLINE_S, transfer_deadline_s

    for size in (10**6, 400 * 10**6, 5 * 10**9):
        at_4_mbit = size / (4e6 / 8)
        assert transfer_deadline_s(size) > 1.5 * at_4_mbit, size
        assert transfer_deadline_s(size) >= TRANSFER_DEADLINE_S


def test_a_file_stream_longer_than_declared_stops_at_the_declared_size(tmp_path):
    """PutCheckpoint's sizes are bounded when declared (blob_access.check_upload_size); the
    stream itself was written on past them until it ended, filling the coordinator's disk with
    whatever a peer sent (a review). It stops at the first byte past what was declared."""
    from herd.digest import FileDigest
    from herd.rpc.files import write_files

    sent = [0]

    def endless():
        while True:
            sent[0] += 1
            yield "adapters.safetensors", b"x" * MIB

    declared = [FileDigest("adapters.safetensors", hashlib.sha256(b"x" * MIB).hexdigest(), MIB)]
    (tmp_path / "into").mkdir()
    with pytest.raises(errors.ChecksumError, match="longer than the 1048576 bytes declared"):
        write_files(endless(), declared, tmp_path / "into", "checkpoint 2", "send it again",
                    "checkpoint")
    assert sent[0] == 2 and (tmp_path / "into" / "adapters.safetensors").stat().st_size == MIB
