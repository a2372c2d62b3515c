"""Only members of the cluster reach any server, each only where its role may go; adverts are
never trusted; joining, revoking, and what a job may ask of a worker.

One real coordinator (its join port included) and real workers on loopback, with real zeroconf
adverts: an honest worker, a rogue advert whose server holds another CA's certificate, a rogue
that claims the honest worker's id, and a member of the cluster that claims it too. Every server
but the honest ones counts the calls that reach it: none may."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from herd.errors import AuthError, HerdError, NotFoundError, PeerLostError, PlacementError
from herd.rpc import discovery, pki
from herd.rpc.channel import CHANNEL_OPTIONS, bind, secure_channel, secure_server
from herd.rpc.join import JoinToken, join, make_token
from protos.v1 import (
    common_pb2,
    coordinator_pb2,
    coordinator_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from tests.conftest import herd, write_job

HOST = "127.0.0.1"


class Counting(grpc.ServerInterceptor):
    """Counts every call that reaches a server (past TLS and HTTP/2), then answers it."""

    def __init__(self):
        self.calls: list[str] = []

    def intercept_service(self, continuation, details):
        self.calls.append(details.method)
        return continuation(details)


def start_worker(root: Path, identity: pki.Identity, zc, advert_id: str, model_roots=(),
                 advert_name: str | None = None):
    """A real worker agent (its service, policy and rank runner) advertised as ``advert_id``
    (under the service name ``advert_name``, default the same)."""
    from herd.rpc.ports import kept_ports
    from worker.agent.machine import probe
    from worker.agent.policy import Policy
    from worker.agent.service import RULES, Worker, WorkerServicer, add_to_server, advert_txt

    server = secure_server(identity, RULES, max_workers=4)
    port = bind(server, identity, f"{HOST}:0")
    worker = Worker(identity.name, HOST, port, *kept_ports(2, HOST), probe(),
                    root / identity.name, identity, policy=Policy(model_roots=tuple(model_roots)))
    add_to_server(WorkerServicer(worker), server)
    server.start()
    txt = {**advert_txt(worker.info()), "id": advert_id}
    advert = discovery.Advertiser(zc, discovery.WORKER_TYPE, advert_name or advert_id, HOST,
                                  port, txt)
    return server, advert, worker


def start_rogue(identity: pki.Identity, zc, advert_id: str, counter: Counting):
    """A WorkerService that answers everything (as the review's rogue did), behind TLS with
    ``identity``, advertised as ``advert_id`` with a huge memory."""
    class Yes(worker_pb2_grpc.WorkerServiceServicer):
        def Describe(self, request, context):
            return worker_pb2.DescribeReply(worker=common_pb2.WorkerInfo(
                worker_id=advert_id, host=HOST, memory_bytes=2**40, free_memory_bytes=2**40))

        def StartRank(self, request, context):
            return worker_pb2.StartRankReply(pid=1)

    server = grpc.server(futures.ThreadPoolExecutor(2), interceptors=[counter])
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(Yes(), server)
    port = server.add_secure_port(f"{HOST}:0", grpc.ssl_server_credentials(
        [(identity.key_pem, identity.cert_pem)]))
    server.start()
    advert = discovery.Advertiser(zc, discovery.WORKER_TYPE, f"{advert_id}-x", HOST, port,
                                  {"id": advert_id, "port": str(port), "memory": str(2**40)})
    return server, advert, f"{HOST}:{port}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model):
    mp = pytest.MonkeyPatch()
    mp.setenv(discovery.INTERFACES_ENV, HOST)
    root = tmp_path_factory.mktemp("auth")
    from coordinator.main import Coordinator

    ca = pki.Authority.create(root / "ca")
    coord = Coordinator(root / "coord", ca, HOST, 0, advertise=False, join_port=0,
                        placement_timeout_s=5)
    coord.registry.health_interval_s = 0.3
    coord.start()
    zc = discovery.make_zeroconf()
    honest = start_worker(root, ca.issue("worker", "honest-w"), zc, "honest-w",
                          model_roots=[tiny_model.parent])
    doomed = start_worker(root, ca.issue("worker", "doomed"), zc, "doomed",
                          model_roots=[tiny_model.parent])
    rogue_count, impostor_count, mallory_count = Counting(), Counting(), Counting()
    foreign = pki.Authority.create(root / "foreign")
    rogues = [start_rogue(foreign.issue("worker", "rogue-w"), zc, "rogue-w", rogue_count),
              # no certificate of this cluster, claiming the honest worker's id
              start_rogue(foreign.issue("worker", "honest-w"), zc, "honest-w", impostor_count),
              # a member of the cluster (its own name: mallory) claiming the honest worker's id
              start_rogue(ca.issue("worker", "mallory"), zc, "honest-w", mallory_count)]
    c = type("Cluster", (), {})()
    c.root, c.ca, c.coord, c.foreign, c.zc = root, ca, coord, foreign, zc
    c.honest, c.doomed, c.rogues = honest, doomed, rogues
    c.counts = {"rogue": rogue_count, "impostor": impostor_count, "mallory": mallory_count}
    c.client = ca.issue("client", "tester")
    yield c
    for server, advert, *_ in [honest, doomed, *rogues]:
        advert.close()
        server.stop(0)
    honest[2].stop_all()
    zc.close()
    coord.stop()
    mp.undo()


def wait(pred, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def code_of(call) -> grpc.StatusCode | None:
    try:
        call()
    except grpc.RpcError as e:
        return e.code()
    return None


def coordinator_stub(c, identity: pki.Identity):
    return coordinator_pb2_grpc.CoordinatorServiceStub(
        secure_channel(c.coord.address, identity, pki.dns_name("coordinator")))


def test_only_members_in_their_roles_reach_a_server(cluster):
    c = cluster
    honest_target = f"{HOST}:{c.honest[2].port}"
    unavailable, denied = grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.PERMISSION_DENIED
    # Without a certificate of this cluster: no call at all (plaintext, or another CA's).
    strangers = [grpc.insecure_channel(c.coord.address, options=CHANNEL_OPTIONS),
                 secure_channel(c.coord.address, c.foreign.issue("client", "tester"),
                                pki.dns_name("coordinator"))]
    for channel in strangers:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        assert code_of(lambda: stub.ListJobs(coordinator_pb2.ListJobsRequest(),
                                             timeout=5)) == unavailable
    for channel in (grpc.insecure_channel(honest_target),
                    secure_channel(honest_target, c.foreign.issue("coordinator", "c"),
                                   pki.dns_name("worker", "honest-w"))):
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        assert code_of(lambda: stub.StopJob(worker_pb2.StopJobRequest(job_id="x"),
                                            timeout=5)) == unavailable
    # Members, outside their role: a worker submits, a rank or a client reports, a client
    # calls a worker.
    as_worker = coordinator_stub(c, c.ca.issue("worker", "honest-w"))
    assert code_of(lambda: as_worker.ListJobs(coordinator_pb2.ListJobsRequest(),
                                              timeout=5)) == denied
    rank = c.ca.issue("rank", pki.rank_scope("j", 1))
    report = coordinator_pb2.ReportRankRequest(job_id="j", attempt=1, worker_id="honest-w",
                                               log="x")
    for who in (rank, c.client):
        assert code_of(lambda: coordinator_stub(c, who).ReportRank(report, timeout=5)) == denied
    client_to_worker = worker_pb2_grpc.WorkerServiceStub(
        secure_channel(honest_target, c.client, pki.dns_name("worker", "honest-w")))
    assert code_of(lambda: client_to_worker.Describe(worker_pb2.DescribeRequest(),
                                                     timeout=5)) == denied
    # A worker reports only as itself.
    other = coordinator_stub(c, c.ca.issue("worker", "doomed"))
    assert code_of(lambda: other.ReportRank(report, timeout=5)) == grpc.StatusCode.UNAUTHENTICATED
    # ...and in role, both answer.
    assert coordinator_stub(c, c.client).ListJobs(coordinator_pb2.ListJobsRequest(),
                                                  timeout=5) is not None
    as_coord = worker_pb2_grpc.WorkerServiceStub(
        secure_channel(honest_target, c.coord.identity, pki.dns_name("worker", "honest-w")))
    assert as_coord.Describe(worker_pb2.DescribeRequest(), timeout=5).worker.worker_id \
        == "honest-w"


def test_a_worker_writes_only_the_logs_of_the_ranks_it_ran(cluster):
    """ReportRank(rank_log): a worker stores output only for a rank it ran, in that attempt
    (kept after the job ends: a rank's last words), never another worker's rank, an attempt
    that never ran, nor a piece far past the log's end (an outside review overwrote another
    rank's log and made a 1 TB sparse log that `herd logs` streamed as NUL bytes)."""
    from coordinator.domain import Job, JobState
    from coordinator.logs import LogStore
    from herd.config import parse_config

    c = cluster
    job_id = "logs-5eed00"
    c.coord.store.put_job(Job(job_id, "logs", parse_config({"model": "m", "data": "d"}), [], 2,
                              10, state=JobState.SUCCEEDED, attempt=2,
                              worker_ids=["doomed", "honest-w"]))
    c.coord.store.start_attempt(job_id, 1, ["honest-w", "doomed"], 0)
    c.coord.store.start_attempt(job_id, 2, ["doomed", "honest-w"], 1)
    honest = coordinator_stub(c, c.ca.issue("worker", "honest-w"))

    def piece(attempt, rank, offset=0, data=b"ok\n"):
        return coordinator_pb2.ReportRankRequest(
            job_id=job_id, attempt=attempt, rank=rank, worker_id="honest-w",
            rank_log=coordinator_pb2.RankLog(offset=offset, data=data))

    honest.ReportRank(piece(1, 0), timeout=5)  # its rank 0 of attempt 1
    honest.ReportRank(piece(2, 1), timeout=5)  # and rank 1 of attempt 2
    denied = grpc.StatusCode.UNAUTHENTICATED  # (an AuthError, as a report in another's name)
    for attempt, rank in ((1, 1), (2, 0), (7777, 3), (2, 2)):
        assert code_of(lambda: honest.ReportRank(piece(attempt, rank), timeout=5)) == denied
    far = piece(1, 0, offset=1 << 40, data=b"x")
    assert code_of(lambda: honest.ReportRank(far, timeout=5)) == grpc.StatusCode.INVALID_ARGUMENT
    # A log only grows: a piece sent again (its reply lost) is taken, its new tail added; one
    # that rewrites stored bytes is refused (a worker rewrote a finished job's log from byte 0:
    # an outside run).
    honest.ReportRank(piece(1, 0, 0, b"ok\nmore\n"), timeout=5)
    rewrite = piece(1, 0, 0, b"XX")
    assert code_of(lambda: honest.ReportRank(rewrite, timeout=5)) == \
        grpc.StatusCode.INVALID_ARGUMENT
    logs = LogStore(c.root / "coord" / "logs")  # the coordinator's (coordinator/service.py)
    assert logs.read(job_id, 1, 0, 0) == b"ok\nmore\n"
    assert (logs.read(job_id, 1, 0, 0)[:3], logs.read(job_id, 2, 1, 0)) == (b"ok\n", b"ok\n")
    assert [logs.read(job_id, a, r, 0) for a, r in ((1, 1), (2, 0))] == [b"", b""]


def test_a_rank_reports_progress_only_as_itself(cluster):
    """ReportRank(progress): the report's rank and worker are checked against the attempt and
    the TLS peer; the progress inside claimed its own (any worker of a job could overwrite
    another rank's loss and iteration: a review). What is recorded is the checked pair."""
    from coordinator.domain import Job, JobState
    from herd.config import parse_config

    c = cluster
    job_id = "prog-5eed00"
    c.coord.store.put_job(Job(job_id, "prog", parse_config({"model": "m", "data": "d"}), [], 2,
                              10, state=JobState.RUNNING, attempt=1,
                              worker_ids=["doomed", "honest-w"]))
    c.coord.store.start_attempt(job_id, 1, ["doomed", "honest-w"], 0)
    honest = coordinator_stub(c, c.ca.issue("worker", "honest-w"))
    lie = common_pb2.RankProgress(rank=0, worker_id="doomed", iteration=9, train_loss=0.01)
    honest.ReportRank(coordinator_pb2.ReportRankRequest(
        job_id=job_id, attempt=1, rank=1, worker_id="honest-w", progress=lie), timeout=5)
    recorded = c.coord.store.latest_progress(job_id)
    assert [(p.rank, p.worker_id, p.iteration) for p in recorded] == [(1, "honest-w", 9)]
    c.coord.scheduler.cancel(job_id)


def test_rogue_and_impostor_worker_adverts_never_get_work(cluster):
    c = cluster
    assert wait(lambda: "honest-w" in [w.worker_id for w in c.coord.registry.workers()], 20)
    honest_target = f"{HOST}:{c.honest[2].port}"
    # Every rogue source was refused (TLS), and stays refused: sample the registry for a while.
    assert wait(lambda: len([s for s in c.coord.registry.refused if "honest-w" in s
                             or "rogue-w" in s]) >= 3, 20), c.coord.registry.refused
    for _ in range(30):
        listed = coordinator_stub(c, c.client).ListWorkers(coordinator_pb2.ListWorkersRequest(),
                                                           timeout=5).workers
        honest = [w for w in listed if w.worker_id == "honest-w"]
        assert len(honest) == 1 and f"{honest[0].host}:{honest[0].port}" == honest_target
        assert not any(w.worker_id in ("rogue-w", "mallory") for w in listed)
        time.sleep(0.1)
    assert all("TLS" in why.reason and why.kind == "auth"
               for why in c.coord.registry.refused.values())
    # `herd workers` can say why the rogue adverts are not listed.
    reply = coordinator_stub(c, c.client).ListWorkers(coordinator_pb2.ListWorkersRequest(),
                                                      timeout=5)
    assert {r.kind for r in reply.refused if "rogue" in r.source} == {"auth"}
    # Not one call reached a rogue: no Describe, no Health, no StartRank, no token.
    assert {k: v.calls for k, v in c.counts.items()} == {"rogue": [], "impostor": [],
                                                         "mallory": []}
    # `herd up` that is not ready says why, from the same list (a revoked id kept it waiting
    # with no word: an outside run)
    from herd.cli.up import _verified

    verified, refused = _verified(c.coord.address, c.client)
    assert verified >= 1 and any("rogue" in r for r in refused), refused


def test_a_second_agent_with_an_admitted_workers_certificate_is_refused_until_the_first_goes(
        cluster):
    """A copied ~/.herd (a cloned Mac): two agents answer as one worker id from two adverts. The
    first keeps the id, the second is listed as refused with the reason (the id flipped between
    them each second, and a job ran on either: an outside run); once the first is gone the second
    is taken, as a worker that moved."""
    c = cluster
    twin = c.ca.issue("worker", "twin-w")
    first = start_worker(c.root / "first", twin, c.zc, "twin-w")
    second = None
    try:
        assert wait(lambda: "twin-w" in [w.worker_id for w in c.coord.registry.workers()], 20)
        first_target = f"{HOST}:{first[2].port}"
        second = start_worker(c.root / "second", twin, c.zc, "twin-w", advert_name="twin-w-copy")
        second_target = f"{HOST}:{second[2].port}"
        assert wait(lambda: any(r.kind == "duplicate" for r in c.coord.registry.refused.values()),
                    20), c.coord.registry.refused
        why = next(r for r in c.coord.registry.refused.values() if r.kind == "duplicate")
        assert why.target == second_target and f"which {first_target} already serves" in \
            why.reason, why
        for _ in range(20):  # the id stays with the first
            (held,) = [w for w in c.coord.registry.workers() if w.worker_id == "twin-w"]
            assert f"{held.host}:{held.port}" == first_target
            time.sleep(0.1)
        first[1].close()
        first[0].stop(0)
        assert wait(lambda: [f"{w.host}:{w.port}" for w in c.coord.registry.workers()
                             if w.worker_id == "twin-w"] == [second_target], 60), \
            c.coord.registry.refused
    finally:
        for agent in (first, second):
            if agent:
                agent[1].close()
                agent[0].stop(0)
                agent[2].stop_all()


def _expired_token(c, role: str) -> JoinToken:
    """A token of this cluster, signed, whose expiry is 5 s past (make_token makes none)."""
    from herd.rpc.join import token_secret

    t = make_token(c.ca, c.coord.join_address, role)
    past = int(time.time()) - 5
    return JoinToken(**{**t.__dict__, "expires": past,
                        "secret": token_secret(c.ca.join_key(), role, past, t.nonce)})


def test_joining_takes_a_valid_token_and_a_free_name(cluster, tmp_path):
    c = cluster
    token = make_token(c.ca, c.coord.join_address, "client", ttl_s=60)
    me = join(JoinToken.decode(token.encode()), "laptop-1", tmp_path / "laptop")
    assert me.label == "client/laptop-1"
    assert pki.Identity.load(tmp_path / "laptop", "client").cert_pem == me.cert_pem
    assert (tmp_path / "laptop" / "client.key").stat().st_mode & 0o077 == 0
    assert coordinator_stub(c, me).ListWorkers(coordinator_pb2.ListWorkersRequest(), timeout=5)

    refused = [
        # a name already held: no second certificate for the honest worker's id
        (make_token(c.ca, c.coord.join_address, "worker"), "honest-w", "already holds"),
        # a token of another cluster (another CA's join key) at this join port
        (make_token(c.foreign, c.coord.join_address, "worker"), "newbie", "not one of this"),
    ]
    forged = make_token(c.ca, c.coord.join_address, "worker")
    refused.append((JoinToken(**{**forged.__dict__, "secret": bytes(16)}), "newbie",
                    "not one of this"))
    for bad, name, why in refused:
        with pytest.raises(AuthError, match=why):
            join(bad, name, tmp_path / "nope")
    expired = _expired_token(c, "worker")
    with pytest.raises(AuthError, match="expired"):
        join(expired, "newbie", tmp_path / "nope")
    assert not (tmp_path / "nope").exists()


def test_a_joining_machine_whose_clock_is_off_is_told_so(cluster, tmp_path):
    """Outside runs with a worker's clock 5 h off: ahead, `herd join` refused a token made
    seconds before as expired (its own clock decided); behind, it joined and then every
    connection failed as "unreachable", the certificates not yet valid there. The coordinator
    decides expiry by its clock, and the join says how far this machine's clock is off."""
    from herd.rpc.join import clock_skew_s, skew_warning

    c = cluster
    old = _expired_token(c, "client")
    with pytest.raises(AuthError) as e:  # the coordinator's verdict, not this machine's clock
        join(old, "skewed", tmp_path / "skewed")
    assert e.value.message.startswith("the join token has expired")  # (not "this join token")
    me = join(make_token(c.ca, c.coord.join_address, "client", ttl_s=60), "skewed",
              tmp_path / "skewed")
    skew = clock_skew_s(me)
    assert abs(skew) < 60 and skew_warning(skew) is None
    behind = skew_warning(clock_skew_s(me, now=time.time() - 5 * 3600))
    assert "5.0 h behind the coordinator's" in behind and "not valid here yet" in behind
    assert "ahead of" in skew_warning(clock_skew_s(me, now=time.time() + 3 * 3600))


def test_revoking_a_member_voids_the_token_it_joined_with(cluster, tmp_path):
    """A revoked laptop rejoined at once under a new name with the token it had joined with (an
    outside run; tokens live up to 7 days and are handed around). `herd revoke` voids that
    token: nobody joins with it again; a new token works, and a member who joined with another
    token keeps working."""
    c = cluster
    shared = make_token(c.ca, c.coord.join_address, "client", ttl_s=3600)
    mallory = join(shared, "mallory", tmp_path / "mallory")
    other = make_token(c.ca, c.coord.join_address, "client", ttl_s=3600)
    alice = join(other, "alice", tmp_path / "alice")
    proc = subprocess.run([sys.executable, "-m", "herd", "revoke", "client/mallory",
                           "--tls-dir", str(c.ca.folder)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "the join token it joined with is void" in proc.stdout, proc.stdout
    with pytest.raises(AuthError, match="voided when client/mallory was revoked"):
        join(shared, "mallory2", tmp_path / "mallory2")
    assert not (tmp_path / "mallory2").exists()
    with pytest.raises(grpc.RpcError):
        coordinator_stub(c, mallory).ListWorkers(coordinator_pb2.ListWorkersRequest(), timeout=5)
    carol = join(make_token(c.ca, c.coord.join_address, "client"), "carol", tmp_path / "carol")
    for member in (alice, carol):
        assert coordinator_stub(c, member).ListWorkers(coordinator_pb2.ListWorkersRequest(),
                                                       timeout=5)


def test_a_second_member_of_a_machine_is_kept_beside_the_first_and_another_cluster_is_refused(
        cluster, tmp_path):
    """`herd join --id` on a machine that already joined keeps both identities (a second worker
    runs as `herd worker --id NAME`); a token of another cluster is refused before the join port
    is asked (it used to overwrite this cluster's CA, key and certificate without a word); and a
    second `herd worker` that would serve the machine's one joined id is refused, naming the
    fix (an outside run saw the coordinator flip between two agents under one id)."""
    from herd.state_lock import StateLock
    from worker.agent.state import WHO

    c, home = cluster, tmp_path / "home"
    tls = home / "tls"
    first = join(make_token(c.ca, c.coord.join_address, "worker"), "mac-a", tls)
    second = join(make_token(c.ca, c.coord.join_address, "worker"), "mac-b", tls)
    assert pki.load_or_issue(tls, "worker").cert_pem == first.cert_pem
    assert pki.load_or_issue(tls, "worker", "mac-b").cert_pem == second.cert_pem
    before = {f.name: f.read_bytes() for f in tls.iterdir()}
    with pytest.raises(AuthError, match="a member of another cluster"):
        join(make_token(c.foreign, c.coord.join_address, "worker"), "mac-c", tls)
    assert {f.name: f.read_bytes() for f in tls.iterdir()} == before

    held = StateLock.acquire(home / "worker", WHO)  # the first agent of this machine
    try:
        proc = herd("worker", "--host", HOST, env={"HERD_HOME": str(home)}, check=False,
                    timeout=120)
    finally:
        held.release()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "joined the cluster as worker mac-a" in proc.stderr
    assert "herd worker --id NAME" in proc.stderr


def test_joining_never_trusts_a_join_port_that_lacks_the_tokens_secret(cluster, tmp_path):
    """A machine in the middle (or a rogue at the token's address) answers with its own CA and a
    certificate for the joiner's key; it cannot prove the token's secret, so nothing is saved."""
    from coordinator.join import JoinServicer
    from protos.v1 import join_pb2_grpc

    c = cluster
    server = grpc.server(futures.ThreadPoolExecutor(2))
    join_pb2_grpc.add_JoinServiceServicer_to_server(JoinServicer(c.foreign), server)
    port = server.add_insecure_port(f"{HOST}:0")
    server.start()
    try:
        # The real cluster's token, pointed at the impostor's port.
        token = make_token(c.ca, f"{HOST}:{port}", "worker")
        with pytest.raises(AuthError):
            join(token, "newbie", tmp_path / "mitm")
    finally:
        server.stop(0)
    assert not (tmp_path / "mitm").exists()


def test_a_revoked_worker_is_dropped_refused_and_never_issued_again(cluster, tmp_path):
    from worker.agent.coordinator_client import CoordinatorClient

    c = cluster
    assert wait(lambda: "doomed" in [w.worker_id for w in c.coord.registry.workers()], 20)
    doomed = c.doomed[2]._identity
    # As an operator does it: `herd revoke` on the CA's machine, in its own process (the
    # coordinator reads the revoked list from the CA folder, not from memory).
    for said in ("revoked", "was already revoked"):
        proc = subprocess.run([sys.executable, "-m", "herd", "revoke", "worker/doomed",
                               "--tls-dir", str(c.ca.folder)], capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith(f"worker/doomed {said}:"), proc.stdout
    # A typo is not a success: the name was never issued (the member it meant stays in).
    typo = subprocess.run([sys.executable, "-m", "herd", "revoke", "worker/dooomed",
                           "--tls-dir", str(c.ca.folder)], capture_output=True, text=True,
                          timeout=60)
    assert typo.returncode == NotFoundError.exit_code, typo.stderr
    assert "worker/dooomed was never issued" in typo.stderr and "worker/doomed" in typo.stderr
    assert c.ca.revoke("worker/not-yet", unissued=True)  # shut out before it joins
    assert wait(lambda: "doomed" not in [w.worker_id for w in c.coord.registry.workers()], 20)
    client = CoordinatorClient(c.coord.address, doomed)
    try:
        with pytest.raises(AuthError, match="revoked"):
            client.fetch_blob("a" * 64, tmp_path / "blob")
    finally:
        client.close()
    with pytest.raises(AuthError, match="revoked"):
        join(make_token(c.ca, c.coord.join_address, "worker"), "doomed", tmp_path / "again")
    time.sleep(1.0)  # several health ticks: it stays out
    assert "doomed" not in [w.worker_id for w in c.coord.registry.workers()]


def test_revoking_a_certificate_ends_its_open_streams_both_ways(tmp_path):
    """A stream opened before `herd revoke` does not outlive it (an outside review watched 52
    events arrive after the revoke): a real server with herd's gate, one server stream and one
    client stream, each cut with UNAUTHENTICATED once the name is revoked."""
    from herd.rpc.auth import Revocations, rules
    from herd.rpc.channel import bind, secure_channel, secure_server

    ca = pki.Authority.create(tmp_path / "ca")
    server_id, client = ca.issue("coordinator", "c"), ca.issue("client", "lap")
    revoked = Revocations(ca.folder)

    def ticks(request, context):
        while context.is_active():
            yield b"tick"
            time.sleep(0.05)

    def sink(requests, context):
        return b"%d" % sum(1 for _ in requests)

    handler = grpc.method_handlers_generic_handler("T", {
        "Ticks": grpc.unary_stream_rpc_method_handler(ticks),
        "Sink": grpc.stream_unary_rpc_method_handler(sink)})
    server = secure_server(server_id, rules("T", {"Ticks": "client", "Sink": "client"}), 4,
                           revoked)
    server.add_generic_rpc_handlers([handler])
    port = bind(server, server_id, f"{HOST}:0")
    server.start()
    try:
        channel = secure_channel(f"{HOST}:{port}", client, pki.dns_name("coordinator"))
        stream = channel.unary_stream("/T/Ticks")(b"", timeout=60)
        assert next(stream) == b"tick"

        def requests():
            while True:
                yield b"x"
                time.sleep(0.05)

        upload = channel.stream_unary("/T/Sink").future(requests(), timeout=60)
        time.sleep(0.5)
        ca.revoke("client/lap")
        with pytest.raises(grpc.RpcError) as cut:
            for _ in stream:
                pass
        assert cut.value.code() == grpc.StatusCode.UNAUTHENTICATED, cut.value
        assert "revoked" in cut.value.details()
        with pytest.raises(grpc.RpcError) as cut:
            upload.result(timeout=30)
        assert cut.value.code() == grpc.StatusCode.UNAUTHENTICATED, cut.value
    finally:
        server.stop(0)


# --- what a job may ask of a worker ----------------------------------------------------------

def submit(c, cfg: Path, data: Path) -> str:
    from herd.cli.connection import CoordinatorConnection
    from herd.cli.laptop import job_spec
    from herd.config import load_config

    spec, files = job_spec(load_config(cfg), cfg.stem)
    with CoordinatorConnection(c.coord.address, c.client) as conn:
        for path, sha in files:
            conn.put_blob(path, sha)
        return conn.call("SubmitJob", coordinator_pb2.SubmitJobRequest(spec=spec)).job_id


def final(c, job_id: str, timeout: float = 120):
    assert wait(lambda: c.coord.store.get_job(job_id).state.final, timeout)
    return c.coord.store.get_job(job_id)


def test_a_rank_holds_only_its_job_attempts_credential(cluster, tmp_path, tiny_model, tiny_data):
    c = cluster
    assert wait(lambda: "honest-w" in [w.worker_id for w in c.coord.registry.workers()], 20)
    cfg = write_job(tmp_path / "env.yaml", tiny_model, tiny_data, iters=8, save_every=8,
                    cluster={"workers": 1})
    job_id = submit(c, cfg, tiny_data)
    workers = {"honest-w": c.honest[2], "doomed": c.doomed[2]}
    assert wait(lambda: c.coord.store.get_job(job_id).worker_ids, 60)
    worker = workers[c.coord.store.get_job(job_id).worker_ids[0]]
    assert wait(lambda: worker.rank is not None and worker.rank.spec.job_id == job_id
                and worker.rank.proc is not None, 60), c.coord.store.get_job(job_id)
    pid = worker.rank.proc.pid
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    env = dict(e.decode(errors="replace").split("=", 1) for e in environ if b"=" in e)
    own = worker._identity
    blob = b"\0".join(environ)
    assert b"PRIVATE KEY" not in blob and own.key_pem not in blob and own.cert_pem not in blob
    assert "HERD_SECRET" not in env
    folder = Path(env["HERD_RANK_TLS"])
    assert folder.is_relative_to(worker.rank.dir)  # its own job folder, nothing of the worker's
    rank = pki.Identity.load(folder, "rank")
    assert rank.name == pki.rank_scope(job_id, 1) and rank.key_pem != own.key_pem
    assert final(c, job_id).state.value == "succeeded"


@pytest.mark.parametrize("case", ["trust_remote_code", "outside_roots", "job_relative"])
def test_a_job_its_workers_owners_did_not_allow_is_refused_at_submit(
        cluster, tmp_path, tiny_model, tiny_data, case):
    """Each worker reports its owner's policy (model roots, remote code): a job every verified
    worker would refuse is refused at submit, each worker and its reason named, and nothing
    starts (it failed at start, after placement, before)."""
    c = cluster
    assert wait(lambda: "honest-w" in [w.worker_id for w in c.coord.registry.workers()], 20)
    model, overrides = tiny_model, {}
    if case == "trust_remote_code":
        overrides = {"trust_remote_code": True}
    elif case == "outside_roots":  # the same model, in a folder the workers' owners did not list
        model = shutil.copytree(tiny_model, tmp_path / "elsewhere")
    cfg = write_job(tmp_path / "job.yaml", model, tiny_data, cluster={"workers": 1}, **overrides)
    if case == "job_relative":  # `model: data` names the job's own shipped files on a worker
        cfg.write_text(cfg.read_text().replace(f"model: {tiny_model}", "model: data"))
        # The coordinator resolves a job's model at submit now (the model store, issue 14): a
        # name that is neither a folder nor a hub id never reaches a worker. The worker's own
        # refusal: test_a_worker_refuses_remote_code_unless_its_owner_allows_it.
        with pytest.raises(HerdError, match="model = 'data'"):
            submit(c, cfg, tiny_data)
        return
    before = len(c.coord.store.list_jobs())
    ranks = [w.rank for w in (c.honest[2], c.doomed[2])]  # (an earlier test's, or None)
    with pytest.raises(HerdError) as e:
        submit(c, cfg, tiny_data)
    want = {"trust_remote_code": ("runs no code from jobs", "--allow-remote-code"),
            "outside_roots": (f"outside its model roots ({tiny_model.parent.resolve()})",
                              "herd models add")}[case]
    text = f"{e.value.message} {e.value.hint}"
    # (doomed is gone when an earlier test of this module stopped it)
    assert re.search(r"0 of the [12] verified workers", text), text
    assert all(w in text for w in want) and "honest-w would refuse it" in text, text
    assert len(c.coord.store.list_jobs()) == before  # nothing queued, nothing started
    assert [w.rank for w in (c.honest[2], c.doomed[2])] == ranks


def test_a_worker_still_refuses_what_the_coordinator_could_not_tell(cluster, tmp_path, tiny_model,
                                                                    tiny_data):
    """The coordinator holds a path to the roots as it reads (a folder of links there passes);
    the worker resolves it on its own disk and refuses, before a rank starts."""
    c = cluster
    elsewhere = shutil.copytree(tiny_model, tmp_path / "elsewhere")
    link = tiny_model.parent / f"link-{tmp_path.name}"
    link.symlink_to(elsewhere, target_is_directory=True)
    try:
        cfg = write_job(tmp_path / "job.yaml", link, tiny_data, cluster={"workers": 1})
        from herd.cli.connection import CoordinatorConnection
        from herd.cli.laptop import job_spec
        from herd.config import load_config

        spec, files = job_spec(load_config(cfg), cfg.stem)  # (it resolves the link: as the
        spec.config_yaml = spec.config_yaml.replace(str(elsewhere), str(link))  # job API, not)
        assert str(link) in spec.config_yaml
        with CoordinatorConnection(c.coord.address, c.client) as conn:
            for path, sha in files:
                conn.put_blob(path, sha)
            job_id = conn.call("SubmitJob", coordinator_pb2.SubmitJobRequest(spec=spec)).job_id
        job = final(c, job_id, 60)
    finally:
        link.unlink()
    assert job.state.value == "failed"
    assert "model roots" in job.message and "could not start" in job.message, job.message
    for worker in (c.honest[2], c.doomed[2]):  # refused before a rank was started
        assert worker.rank is None or worker.rank.spec.job_id != job_id


def test_a_dataset_carrying_code_or_config_is_refused_at_submit(cluster, tmp_path, tiny_model,
                                                                tiny_data):
    from herd.cli.connection import CoordinatorConnection
    from herd.digest import file_digest

    c = cluster
    evil = tmp_path / "evil.py"
    evil.write_text("import os\n")
    with CoordinatorConnection(c.coord.address, c.client) as conn:
        conn.put_blob(evil, file_digest(evil).sha256)
        train = tiny_data / "train.jsonl"
        conn.put_blob(train, file_digest(train).sha256)
        for name in ("evil.py", "config.json", "model.safetensors", "../train.jsonl"):
            spec = coordinator_pb2.SubmitJobRequest(spec=common_pb2.JobSpec(
                name="evil", config_yaml=f"model: {tiny_model}\n"))
            spec.spec.dataset.add(name="train.jsonl", sha256=file_digest(train).sha256,
                                  bytes=train.stat().st_size)
            spec.spec.dataset.add(name=name, sha256=file_digest(evil).sha256, bytes=9)
            with pytest.raises(HerdError, match="refusing"):
                conn.call("SubmitJob", spec)
        # the same name twice: a clear refusal (it was an unhandled error naming a server path)
        spec = coordinator_pb2.SubmitJobRequest(spec=common_pb2.JobSpec(
            name="twice", config_yaml=f"model: {tiny_model}\n"))
        for _ in range(2):
            spec.spec.dataset.add(name="train.jsonl", sha256=file_digest(train).sha256,
                                  bytes=train.stat().st_size)
        with pytest.raises(HerdError, match="listed twice: train.jsonl") as e:
            conn.call("SubmitJob", spec)
        assert e.value.exit_code == 3


# A submitter's Hugging Face dataset that would read the worker's own files (its TLS key read
# back one line per job through the dataset check's messages, by an outside review).
WORKER_FILE_DATASETS = {
    "csv loader on a worker file": {"hf_dataset": {
        "path": "csv", "config": {"data_files": {"train": "/etc/hostname"}}}},
    "json loader": {"hf_dataset": {"path": "json", "config": {"data_files": "x.jsonl"}}},
    "a path as the dataset": {"hf_dataset": {"path": "/etc"}},
    "a parent path": {"hf_dataset": {"path": "../secrets"}},
    "a file in a hub dataset's place": {"hf_dataset": {
        "path": "org/name", "config": {"data_files": "/etc/hostname"}}},
    "a url": {"hf_dataset": {"path": "org/name", "config": {
        "data_files": "http://10.0.0.1/secret.csv"}}},
    "out of the repo": {"hf_dataset": {"path": "org/name", "config": {"data_dir": "../../x"}}},
    "cache_dir": {"hf_dataset": {"path": "org/name", "config": {"cache_dir": "/tmp/x"}}},
    "data as a worker path": {"data": "/home/someone/data"},
    "data as a loader": {"data": "json"},
}


def test_a_dataset_on_the_workers_files_is_refused_at_submit(cluster, tiny_model):
    """SubmitJob straight to the coordinator (no CLI): a Hugging Face dataset that is a file
    loader, a path, a URL or an argument past the dataset is refused before any worker is
    touched, naming the key; a hub dataset by its id is accepted (and cancelled here)."""
    import yaml

    from herd.cli.connection import CoordinatorConnection

    with CoordinatorConnection(cluster.coord.address, cluster.client) as conn:
        for name, keys in WORKER_FILE_DATASETS.items():
            doc = {"model": str(tiny_model), "train": True, **keys}
            spec = coordinator_pb2.SubmitJobRequest(spec=common_pb2.JobSpec(
                name="exfil", config_yaml=yaml.safe_dump(doc)))
            with pytest.raises(HerdError) as e:
                conn.call("SubmitJob", spec)
            assert e.value.exit_code == 2 and ("hub dataset" in e.value.message or
                                               "not allowed" in e.value.message), (name, e.value)
        hub = {"model": str(tiny_model), "train": True, "batch_size": 8, "num_layers": -1,
               "cluster": {"workers": 8},
               "hf_dataset": {"path": "org/name", "config": {"name": "default",
                                                             "data_files": "data/*.parquet"}}}
        reply = conn.call("SubmitJob", coordinator_pb2.SubmitJobRequest(spec=common_pb2.JobSpec(
            name="hub", config_yaml=yaml.safe_dump(hub))))
        conn.call("CancelJob", coordinator_pb2.CancelJobRequest(job_id=reply.job_id))


def test_a_worker_loads_only_hub_datasets_for_jobs(tmp_path):
    """The worker's own check (the coordinator's may be bypassed by a rogue or older one): the
    same refusals, and a hub id that names a file of the rank's folder (datasets would load it)."""
    from herd.config import parse_config
    from herd.errors import ConfigError
    from worker.agent.policy import Policy

    for name, keys in WORKER_FILE_DATASETS.items():
        with pytest.raises(ConfigError, match=r"hub dataset|not allowed") as e:
            Policy().check_job(parse_config({"model": "org/m", **keys}), tmp_path, "w",
                               shipped_data=False)
        assert e.value.exit_code == 2, name
    (tmp_path / "notes").mkdir()
    for data in ("tls", "data", "notes"):
        with pytest.raises(ConfigError, match="job's own folder"):
            Policy().check_job(parse_config({"model": "org/m", "data": data}), tmp_path, "w",
                               shipped_data=False)
    Policy().check_job(parse_config({"model": "org/m", "data": "org/dataset"}), tmp_path, "w",
                       shipped_data=False)
    # a shipped folder: `data` is that folder's name on the laptop, replaced by the agent
    Policy().check_job(parse_config({"model": "org/m", "data": "data"}), tmp_path, "w")
    # an adapter to resume from is one the job sent, never a file of this worker's
    resume = parse_config({"model": "org/m", "resume_adapter_file": "/jobs/other/a.safetensors"})
    with pytest.raises(ConfigError, match="was not sent with the job"):
        Policy().check_job(resume, tmp_path, "w")
    Policy().check_job(resume, tmp_path, "w", shipped_resume=True)


def test_a_worker_refuses_remote_code_unless_its_owner_allows_it(tmp_path):
    """The policy itself, both ways (the service test above runs it through a real worker)."""
    from herd.config import parse_config
    from worker.agent.policy import Policy

    cfg = parse_config({"model": "org/model", "trust_remote_code": True})
    with pytest.raises(PlacementError, match="--allow-remote-code"):
        Policy().check_job(cfg, tmp_path, "w")
    Policy(allow_remote_code=True).check_job(cfg, tmp_path, "w")
    for bad in ("../x", "a/../../b", "./data", "data", "tls/x", "org/name/extra"):
        with pytest.raises(PlacementError):
            Policy().check_model(bad, tmp_path, "w")


def test_a_stored_or_pinned_hub_model_is_no_path_but_still_runs_no_code(tmp_path):
    """A model from the coordinator's store comes by digest (data files only), a hub model by a
    repo id: neither is held to the model roots, both still to trust_remote_code; a hub repo that
    is not an id is refused."""
    from herd.config import parse_config
    from herd.digest import FileDigest
    from herd.models.source import ModelSource
    from worker.agent.policy import Policy

    stored = ModelSource(digest="a" * 64, files=(FileDigest("config.json", "b" * 64, 2),))
    cfg = parse_config({"model": "tiny@" + "a" * 12})
    Policy().check_job(cfg, tmp_path, "w", stored)
    Policy().check_job(cfg, tmp_path, "w", ModelSource(hub_repo="org/name", hub_revision="c"))
    with pytest.raises(PlacementError, match="hub repo"):
        Policy().check_job(cfg, tmp_path, "w", ModelSource(hub_repo="../etc"))
    code = parse_config({"model": "org/model", "trust_remote_code": True})
    with pytest.raises(PlacementError, match="--allow-remote-code"):
        Policy().check_job(code, tmp_path, "w", stored)


def test_model_file_names_may_sit_in_folders_but_never_leave_them(tmp_path):
    """Model-store names (a hub repo's tokenizer/ or original/ files): '/'-separated plain parts
    with a model file's extension; a worker's model view puts each inside its folder."""
    from herd.digest import FileDigest
    from herd.errors import DatasetError
    from herd.rpc.names import check_path
    from worker.agent.model_cache import ModelCache

    assert check_path("tokenizer/tokenizer.json", "model") == "tokenizer/tokenizer.json"
    for bad in ("../config.json", "/etc/passwd.json", "a//b.json", "a/../b.json", ".git/x.json",
                "a/b/c/d/e.json", "model.py", "sub/evil.py", "", "a/"):
        with pytest.raises(DatasetError):
            check_path(bad, "model")
    cache = ModelCache(tmp_path / "cache", "w")
    cache.blobs.mkdir(parents=True, exist_ok=True)
    sha = "c" * 64
    (cache.blobs / sha).write_bytes(b"{}")
    view = cache.view(tmp_path / "view", [FileDigest("config.json", sha, 2),
                                          FileDigest("tokenizer/tokenizer.json", sha, 2)])
    assert (view / "tokenizer" / "tokenizer.json").read_bytes() == b"{}"
    with pytest.raises(DatasetError):
        cache.view(tmp_path / "view2", [FileDigest("../outside.json", sha, 2)])
    assert not (tmp_path / "outside.json").exists()


def test_every_rpc_of_every_service_says_who_may_call_it():
    """A new rpc without a rule is refused to everyone: this names it before a user finds out."""
    from coordinator.service import RULES as COORDINATOR
    from protos.v1 import coordinator_pb2 as c_pb
    from protos.v1 import exchange_pb2 as e_pb
    from protos.v1 import worker_pb2 as w_pb
    from worker.agent.service import RULES as WORKER
    from worker.exchange.grpc.peers import rules as exchange_rules

    exchange = exchange_rules(pki.Identity("rank", "a1", b"", b"", b""))
    for pb, service, rules in ((c_pb, "CoordinatorService", COORDINATOR),
                               (w_pb, "WorkerService", WORKER),
                               (e_pb, "ExchangeService", exchange)):
        desc = pb.DESCRIPTOR.services_by_name[service]
        methods = {f"/{desc.full_name}/{m}" for m in desc.methods_by_name}
        assert methods == set(rules), (service, methods ^ set(rules))


def test_a_worker_of_another_protocol_version_is_refused_with_the_reason(tmp_path, monkeypatch):
    """A static target (no zeroconf) that answers Describe with another protocol version is not
    admitted, and the refusal says so (what `herd workers` prints)."""
    from coordinator.registry import Registry
    from worker.agent import service

    monkeypatch.setattr(service, "PROTOCOL_VERSION", 99)
    ca = pki.Authority.create(tmp_path / "ca")
    zc = discovery.make_zeroconf([HOST])
    server, advert, worker = start_worker(tmp_path, ca.issue("worker", "future-worker"), zc,
                                          "future-worker")
    target = f"{HOST}:{worker.port}"
    registry = Registry(ca.issue("coordinator", "coordinator"), static_targets=[target])
    try:
        registry.start()
        assert registry.workers() == []
        refusal = registry.refusals()[target]
        assert refusal.kind == "version" and "speaks herd protocol 99" in refusal.reason
    finally:
        registry.close()
        advert.close()
        server.stop(0)
        zc.close()


def test_one_member_cannot_hold_every_thread_or_send_a_large_request(tmp_path):
    """The gate's two bounds behind the handshake, through a real mTLS server: a member already
    holding ``max_calls_per_peer`` calls gets RESOURCE_EXHAUSTED for the next one, naming it,
    while another member is still served; a unary request over its rule's size is refused before
    it is parsed or its handler runs, and one at the limit is served."""
    import threading

    from herd.rpc.auth import SMALL_REQUEST_BYTES, rules

    ca = pki.Authority.create(tmp_path / "ca")
    server_id = ca.issue("coordinator", "gate-test")
    release, seen = threading.Event(), []

    def hold(request: bytes, context) -> bytes:
        seen.append(len(request))
        release.wait(30)
        return b"done"

    service = grpc.method_handlers_generic_handler(
        "test.Gate", {"Hold": grpc.unary_unary_rpc_method_handler(hold)})
    server = secure_server(server_id, rules("test.Gate", {"Hold": "worker"}), max_workers=8,
                           max_calls_per_peer=3)
    server.add_generic_rpc_handlers((service,))
    port = bind(server, server_id, f"{HOST}:0")
    server.start()
    try:
        def caller(name: str):
            channel = secure_channel(f"{HOST}:{port}", ca.issue("worker", name),
                                     pki.dns_name("coordinator"))
            return channel.unary_unary("/test.Gate/Hold")

        greedy, other = caller("greedy"), caller("other")
        held = [greedy.future(b"x", timeout=30) for _ in range(3)]
        assert wait(lambda: len(seen) == 3, 10), f"{len(seen)} of 3 held calls reached the handler"
        with pytest.raises(grpc.RpcError) as refused:
            greedy(b"x", timeout=10)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "worker/greedy already has 3 calls in flight" in refused.value.details()
        served = other.future(b"x", timeout=30)  # another member still gets a thread
        assert wait(lambda: len(seen) == 4, 10), "another member was not served"

        before = len(seen)
        with pytest.raises(grpc.RpcError) as big:
            other(b"x" * (SMALL_REQUEST_BYTES + 1), timeout=10)
        assert big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"{SMALL_REQUEST_BYTES + 1}-byte request: Hold takes at most" in big.value.details()
        assert len(seen) == before, "the oversized request reached the handler"
        release.set()
        assert [f.result(timeout=10) for f in [*held, served]] == [b"done"] * 4
        assert other(b"x" * SMALL_REQUEST_BYTES, timeout=10) == b"done"  # at the limit: served
        assert greedy(b"x", timeout=10) == b"done"  # its slots came back with its calls
    finally:
        release.set()
        server.stop(0)


def test_processes_issuing_from_one_ca_at_once_lose_no_name(tmp_path):
    """Two `herd worker`s started together on the CA's machine each issue their certificate from
    the one CA folder (seen in a full run: the fourth worker of a test died at start). Six
    processes issuing 15 names each at once: all succeed and every name is recorded as held."""
    import json
    import subprocess
    import sys

    pki.Authority.create(tmp_path / "ca")
    code = ("import sys\nfrom pathlib import Path\nfrom herd.rpc import pki\n"
            "ca = pki.Authority.load(Path(sys.argv[1]))\n"
            "for i in range(15):\n    ca.issue('worker', f'w{sys.argv[2]}-{i}')\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "ca"), str(n)],
                              stderr=subprocess.PIPE, text=True) for n in range(6)]
    results = [(p.communicate(timeout=120)[1], p.returncode) for p in procs]
    failed = [f"exit {rc}: {err[-600:]}" for err, rc in results if rc]
    assert not failed, failed[0]
    held = json.loads((tmp_path / "ca" / "issued.json").read_text())
    assert len(held) == 90 and "worker/w5-14" in held
    assert not list((tmp_path / "ca").glob(".*.tmp")), "a temporary file was left behind"


def test_trust_commands_say_what_is_wrong_with_their_own_arguments(tmp_path):
    """An out-of-range --ttl is a bad argument (exit 2), not an authentication failure; a join
    whose address does not answer says what to check (herd join has no --coordinator); a laptop
    without a client certificate is told which token it needs (outside runs)."""
    ca = pki.Authority.create(tmp_path / "ca")
    for ttl in ("0", "100d", "abc"):
        proc = herd("token", "--tls-dir", ca.folder, "--ttl", ttl, "--join", f"{HOST}:9",
                    check=False)
        assert proc.returncode == 2, (ttl, proc.stderr)
    token = make_token(ca, f"{HOST}:9", "client")  # port 9: nothing listens
    with pytest.raises(PeerLostError) as e:
        join(token, "lap", tmp_path / "lap")
    assert "join port" in e.value.hint and "--coordinator" not in e.value.hint
    with pytest.raises(AuthError) as e:
        pki.Identity.load(tmp_path / "nothing", "client")
    assert "herd token --role client" in e.value.hint


def test_a_command_pointed_at_a_workers_port_is_told_it_reached_another_member(cluster):
    """--coordinator at a worker's port: a member of this cluster answers, not the coordinator;
    the message says so instead of asking the user to join (an outside run)."""
    from herd.cli.connection import CoordinatorConnection

    worker = cluster.honest[2]
    with CoordinatorConnection(f"{HOST}:{worker.port}", cluster.client) as conn:
        with pytest.raises(AuthError) as e:
            conn.call("ListJobs", coordinator_pb2.ListJobsRequest())
    assert "is a member of this cluster, but not the one dialled" in e.value.message
    assert "herd join" not in e.value.hint


def test_a_second_coordinator_on_a_state_folder_in_use_is_refused_naming_the_first(cluster):
    """Two coordinators on one folder both scheduled from its database, admitted the same
    workers and stopped each other's ranks (an outside run: one started by hand beside the
    service's). The second is refused before it opens anything, naming the holder."""
    import os

    from coordinator.main import Coordinator
    from herd.state_lock import FolderInUseError

    with pytest.raises(FolderInUseError) as e:
        Coordinator(cluster.root / "coord", cluster.ca, HOST, 0, advertise=False, join_port=None)
    assert f"is in use by herd coordinator (pid {os.getpid()})" in e.value.message
    assert e.value.exit_code == 1
    assert cluster.coord.store.list_jobs() is not None  # the first one carries on
    # (where `herd token` on this machine finds the join port it serves)
    joined = (cluster.root / "coord" / "join.address").read_text().strip()
    assert joined == cluster.coord.join_address and not joined.endswith(":0")
