"""Both services refuse calls without the cluster secret or with a wrong one, and a process that
advertises itself as a worker without knowing the secret never enters the registry.

Real gRPC servers and real zeroconf on loopback, in this process."""

from __future__ import annotations

import time
from concurrent import futures

import grpc
import pytest

from herd.rpc import discovery
from herd.rpc.auth import ServerAuth, new_secret
from herd.rpc.channel import SERVER_OPTIONS, signed_channel
from protos.v1 import coordinator_pb2, coordinator_pb2_grpc, worker_pb2, worker_pb2_grpc

HOST = "127.0.0.1"


def start_worker(tmp_path, secret: str, worker_id: str, zc):
    from worker.agent.machine import probe
    from worker.agent.main import free_port
    from worker.agent.service import Worker, WorkerServicer, add_to_server, advert_txt

    server = grpc.server(futures.ThreadPoolExecutor(4), options=SERVER_OPTIONS,
                         interceptors=[ServerAuth(secret)])
    port = server.add_insecure_port(f"{HOST}:0")
    w = Worker(worker_id, HOST, port, free_port(HOST), free_port(HOST), probe(),
               tmp_path / worker_id, secret)
    add_to_server(WorkerServicer(w), server)
    server.start()
    advert = discovery.Advertiser(zc, discovery.WORKER_TYPE, worker_id, HOST, port,
                                  advert_txt(w.info()))
    return server, advert, f"{HOST}:{port}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv(discovery.INTERFACES_ENV, HOST)
    tmp_path = tmp_path_factory.mktemp("auth")
    from coordinator.main import Coordinator

    secret = new_secret()
    coord = Coordinator(tmp_path / "coord", secret, HOST, 0, advertise=False)
    coord.start()
    zc = discovery.make_zeroconf()
    good = start_worker(tmp_path, secret, "honest-worker", zc)
    rogue = start_worker(tmp_path, new_secret(), "rogue-worker", zc)
    yield coord, secret, good[2], rogue[2]
    for server, advert, _ in (good, rogue):
        advert.close()
        server.stop(0)
    zc.close()
    coord.stop()
    mp.undo()


def code_of(call) -> grpc.StatusCode | None:
    try:
        call()
    except grpc.RpcError as e:
        return e.code()
    return None


def test_calls_without_or_with_a_wrong_secret_are_refused(cluster):
    coord, secret, good, _ = cluster
    for channel in (grpc.insecure_channel(coord.address),
                    signed_channel(coord.address, new_secret())):
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        assert code_of(lambda: stub.ListJobs(coordinator_pb2.ListJobsRequest(), timeout=5)) \
            == grpc.StatusCode.UNAUTHENTICATED
        stream = stub.WatchJob(coordinator_pb2.WatchJobRequest(job_id="x"), timeout=5)
        assert code_of(lambda: list(stream)) == grpc.StatusCode.UNAUTHENTICATED
    for channel in (grpc.insecure_channel(good), signed_channel(good, new_secret())):
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        assert code_of(lambda: stub.Describe(worker_pb2.DescribeRequest(), timeout=5)) \
            == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(lambda: stub.StopJob(worker_pb2.StopJobRequest(job_id="x"), timeout=5)) \
            == grpc.StatusCode.UNAUTHENTICATED
    # ...while the right secret is accepted by both.
    ok = coordinator_pb2_grpc.CoordinatorServiceStub(signed_channel(coord.address, secret))
    assert ok.ListJobs(coordinator_pb2.ListJobsRequest(), timeout=5).jobs == []
    w = worker_pb2_grpc.WorkerServiceStub(signed_channel(good, secret))
    assert w.Describe(worker_pb2.DescribeRequest(), timeout=5).worker.worker_id == "honest-worker"


def test_an_advert_without_the_secret_never_gets_work(cluster):
    coord, secret, _, rogue = cluster
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        ids = [w.worker_id for w in coord.registry.workers()]
        if ids and any("rogue" in k for k in coord.registry.refused):
            break
        time.sleep(0.1)
    assert ids == ["honest-worker"]
    refused = {k: v for k, v in coord.registry.refused.items() if "rogue" in k}
    assert refused and "wrong cluster secret" in next(iter(refused.values())).reason
    assert next(iter(refused.values())).kind == "auth"
    reply = coordinator_pb2_grpc.CoordinatorServiceStub(signed_channel(coord.address, secret)) \
        .ListWorkers(coordinator_pb2.ListWorkersRequest(), timeout=5)
    assert [w.worker_id for w in reply.workers] == ["honest-worker"]
    # `herd workers` can say why the rogue advert is not listed (other clusters' adverts on this
    # machine's loopback may be listed too: they do not know this secret either).
    assert [r.kind for r in reply.refused if "rogue" in r.source] == ["auth"]


def test_a_worker_of_another_protocol_version_is_refused_with_the_reason(tmp_path, monkeypatch):
    """A static target (no zeroconf) that answers Describe with another protocol version is not
    admitted, and the refusal says so (what `herd workers` prints)."""
    from coordinator.registry import Registry
    from worker.agent import service

    secret = new_secret()
    monkeypatch.setattr(service, "PROTOCOL_VERSION", 99)
    zc = discovery.make_zeroconf([HOST])
    server, advert, target = start_worker(tmp_path, secret, "future-worker", zc)
    registry = Registry(secret, static_targets=[target])
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
