"""Discovery is a hint, liveness is authenticated: an mDNS goodbye (which anyone on the LAN can
send for any name) does not drop a worker that still answers its authenticated Health call; the
worker really stopping still does. A real agent process, the coordinator's real Registry, real
zeroconf on loopback, and a goodbye forged by a separate Zeroconf instance. An advert updated,
moved or imitated never breaks a call in flight to the worker (real gRPC servers, mutual TLS)."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
import time

import pytest
from zeroconf import DNSOutgoing, DNSPointer, const

from coordinator.registry import Registry
from herd import PROTOCOL_VERSION
from herd.errors import HerdError
from herd.rpc import discovery
from herd.rpc.channel import bind, secure_server
from protos.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from tests.conftest import REPO

pytestmark = pytest.mark.slow
HOST = "127.0.0.1"


def wait(pred, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return False


def goodbye(zc, name: str) -> None:
    """What an mDNS goodbye is: the service's PTR record with TTL 0, sent by whoever likes."""
    out = DNSOutgoing(const._FLAGS_QR_RESPONSE | const._FLAGS_AA)
    out.add_answer_at_time(DNSPointer(discovery.WORKER_TYPE, const._TYPE_PTR, const._CLASS_IN,
                                      0, name), 0)
    zc.send(out)


def test_a_goodbye_from_anyone_does_not_drop_a_worker_that_answers(tmp_path, monkeypatch):
    from herd.rpc import pki

    ca = pki.Authority.create(tmp_path / "home" / "tls")  # the agent's certificate comes from it
    worker_id = f"gb-{secrets.token_hex(4)}"  # unique: other clusters share this host's mDNS
    monkeypatch.setenv(discovery.INTERFACES_ENV, HOST)
    env = {**os.environ, discovery.INTERFACES_ENV: HOST,
           "HERD_HOME": str(tmp_path / "home")}
    agent = subprocess.Popen(
        [sys.executable, "-m", "herd", "worker", "--host", HOST, "--id", worker_id,
         "--state-dir", str(tmp_path / "worker")], cwd=REPO, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lost: list[str] = []
    registry = Registry(ca.issue("coordinator", "c"), on_lost=lambda wid, *_: lost.append(wid),
                        health_interval_s=0.5)
    zc, forger = discovery.make_zeroconf(), discovery.make_zeroconf()
    name = f"{worker_id}.{discovery.WORKER_TYPE}"
    try:
        registry.browse(zc)
        registry.start()
        assert wait(lambda: worker_id in [w.worker_id for w in registry.workers()]), \
            "the worker was never admitted"
        for _ in range(3):
            goodbye(forger, name)
            time.sleep(0.2)
        # The goodbye arrived (the browser dropped the record), and it changed nothing else.
        assert wait(lambda: name not in registry._browser.adverts, timeout=30)
        time.sleep(3.0)  # several authenticated health rounds
        assert worker_id in [w.worker_id for w in registry.workers()]
        assert lost == []
        # The worker really stops: it leaves the registry (its own goodbye, then Health fails).
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=30)
        assert wait(lambda: worker_id not in [w.worker_id for w in registry.workers()])
        assert lost == [worker_id]
        # and its advert, withdrawn while it still answered, is not kept, retried and listed as
        # "refused: unreachable" for good (an outside run: a worker stopped with systemctl)
        time.sleep(3.0)
        assert name not in registry.refusals() and name not in registry._candidates
    finally:
        if agent.poll() is None:
            agent.kill()
        registry.close()
        zc.close()
        forger.close()


class DownloadingWorker(worker_pb2_grpc.WorkerServiceServicer):
    """A worker agent's Describe and Health, and a PrepareRank that reports one progress message
    then waits for ``release`` (a model download in flight) before it reports done."""

    def __init__(self, worker_id: str):
        self.info = common_pb2.WorkerInfo(worker_id=worker_id, protocol_version=PROTOCOL_VERSION)
        self.release = threading.Event()

    def Describe(self, request, context):
        return worker_pb2.DescribeReply(worker=self.info)

    def Health(self, request, context):
        return worker_pb2.HealthReply(worker=self.info)

    def PrepareRank(self, request, context):
        yield common_pb2.FetchProgress(worker_id=self.info.worker_id, bytes_received=1)
        self.release.wait(60)
        yield common_pb2.FetchProgress(worker_id=self.info.worker_id, bytes_received=2, done=True)


def serve(identity, servicer, port: int = 0):
    from worker.agent.service import RULES

    server = secure_server(identity, RULES, max_workers=4)
    port = bind(server, identity, f"{HOST}:{port}")
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(servicer, server)
    server.start()
    return server, f"{HOST}:{port}"


def test_a_download_in_flight_survives_its_advert_updated_imitated_and_moved(tmp_path):
    """zeroconf reports a worker's record updated whenever any new record appears under its
    name (another cluster's same-named worker on the LAN does that): the registry verifies it
    again, and neither that, nor the other cluster's worker (refused: not our CA), nor the worker
    moving to a new port ends the PrepareRank in flight on the old channel."""
    from herd.rpc import pki

    ca, other = pki.Authority.create(tmp_path / "ca"), pki.Authority.create(tmp_path / "other")
    ours, moved, stranger = (DownloadingWorker("w1") for _ in range(3))
    (s1, first), (s2, second), (s3, foreign) = (
        serve(ca.issue("worker", "w1"), ours), serve(ca.issue("worker", "w1"), moved),
        serve(other.issue("worker", "w1"), stranger))
    name = f"w1.{discovery.WORKER_TYPE}"

    def advert(target: str) -> discovery.Advert:  # what the Browser hands on, added or updated
        host, port = target.rsplit(":", 1)
        return discovery.Advert(name, host, int(port), {"id": "w1"})

    registry = Registry(ca.issue("coordinator", "c"), health_interval_s=0.2)
    got, failed = [], []

    def download():
        try:
            registry.client("w1").prepare_rank(worker_pb2.StartRankRequest(job_id="j"),
                                               lambda f: got.append(f) or True)
        except HerdError as e:
            failed.append(e)

    try:
        registry._advert_added(advert(first))
        registry.start()
        assert [w.worker_id for w in registry.workers()] == ["w1"]
        call = threading.Thread(target=download)
        call.start()
        assert wait(lambda: len(got) == 1), "the download never started"
        registry._advert_added(advert(first))    # updated: same worker, same address
        registry._advert_added(advert(foreign))  # another cluster's w1
        assert registry.client("w1").target == first
        assert name in registry.refused
        registry._advert_added(advert(second))   # restarted on another port: new calls go there
        assert registry.client("w1").target == second
        ours.release.set()
        call.join(timeout=60)
        assert failed == [], failed[0].message
        assert [f.done for f in got] == [False, True]
    finally:
        ours.release.set()
        registry.close()
        for server in (s1, s2, s3):
            server.stop(grace=0).wait()


def test_a_lost_worker_is_tried_again_often_and_a_stranger_less_and_less(tmp_path):
    """A worker that was admitted and stops answering (its cable pulled, the Mac asleep) is tried
    again every RETURN_RETRY_S for as long as it is gone, and admitted again once it answers at
    its address; a candidate that never got in (another cluster's worker) is tried less and less
    often (the back-off doubles towards MAX_RETRY_S)."""
    from coordinator import registry as registry_module
    from herd.rpc import pki

    ca, other = pki.Authority.create(tmp_path / "ca"), pki.Authority.create(tmp_path / "other")
    server, target = serve(ca.issue("worker", "w1"), DownloadingWorker("w1"))
    s2, foreign = serve(other.issue("worker", "w2"), DownloadingWorker("w2"))

    def advert(worker_id: str, address: str) -> discovery.Advert:
        host, port = address.rsplit(":", 1)
        return discovery.Advert(f"{worker_id}.{discovery.WORKER_TYPE}", host, int(port),
                                {"id": worker_id})

    lost: list[str] = []
    flags: list[bool] = []  # on_lost's unreachable: False when its host refuses the connection
    registry = Registry(ca.issue("coordinator", "c"), on_lost=lambda wid, _, unreachable: (
        lost.append(wid), flags.append(unreachable)), health_interval_s=0.2)
    mine, theirs = advert("w1", target), advert("w2", foreign)

    def backoff(name: str) -> float:
        return registry._retry.get(name, (0.0, 0.0))[1]

    try:
        registry._advert_added(mine)
        registry._advert_added(theirs)
        registry.start()
        assert [w.worker_id for w in registry.workers()] == ["w1"]
        server.stop(grace=0).wait()  # gone: removed after max_failures Health calls
        assert wait(lambda: lost == ["w1"]), "the stopped worker was never removed"
        # Its port refuses connections: its agent is down, and its ranks with it (they die with
        # their agent), so nothing is waited for (an outside run: a killed agent was read as
        # "its ranks may train on" and its job waited 30 s before restarting).
        assert flags == [False]
        assert wait(lambda: mine.name in registry.refused), "the lost worker was never retried"
        # The stranger has been refused several times by now: its back-off has grown...
        assert wait(lambda: backoff(theirs.name) >= 4 * registry_module.RETURN_RETRY_S)
        # ...while the lost worker is still tried every RETURN_RETRY_S.
        for _ in range(5):
            assert backoff(mine.name) == registry_module.RETURN_RETRY_S, registry._retry
            time.sleep(0.3)
        # It comes back at its address: admitted again.
        server, again = serve(ca.issue("worker", "w1"), DownloadingWorker("w1"),
                              port=int(target.rsplit(":", 1)[1]))
        assert again == target
        assert wait(lambda: [w.worker_id for w in registry.workers()] == ["w1"]), \
            "the worker that came back was not admitted again"
        assert theirs.name in registry.refused
    finally:
        registry.close()
        for s in (server, s2):
            s.stop(grace=0).wait()


def test_a_retry_that_ends_after_close_admits_nothing(tmp_path):
    """A candidate's retry runs on a thread of its own and may finish after the registry was
    closed (the coordinator stopping): it must not admit the worker into the closed registry,
    holding a channel no one will close."""
    from herd.rpc import pki

    ca = pki.Authority.create(tmp_path / "ca")
    server, target = serve(ca.issue("worker", "w1"), DownloadingWorker("w1"))
    host, port = target.rsplit(":", 1)
    advert = discovery.Advert(f"w1.{discovery.WORKER_TYPE}", host, int(port), {"id": "w1"})
    registry = Registry(ca.issue("coordinator", "c"), health_interval_s=0.2)
    try:
        registry.close()
        registry._advert_added(advert)  # what a retry thread does, after close() returned
        assert registry.workers() == [] and registry._clients == {}
    finally:
        registry.close()
        server.stop(grace=0).wait()


def test_a_handler_that_fails_does_not_end_discovery(monkeypatch):
    """zeroconf's browser thread runs our handlers with no guard of its own: a handler that
    raised there (the registry's goodbye handler could, racing its health loop: a review) ended
    discovery for good, every later advert unseen. Errors are logged; the next advert is seen."""
    monkeypatch.setenv(discovery.INTERFACES_ENV, HOST)
    tag = secrets.token_hex(4)
    seen: list[str] = []

    def failing(name: str) -> None:
        raise RuntimeError("a handler's bug")

    zc, other = discovery.make_zeroconf(), discovery.make_zeroconf()
    browser = discovery.Browser(zc, discovery.WORKER_TYPE, lambda a: seen.append(a.name), failing)
    try:
        first = discovery.Advertiser(other, discovery.WORKER_TYPE, f"fail-{tag}-a", HOST, 1, {})
        assert wait(lambda: any(f"fail-{tag}-a" in n for n in seen), timeout=30)
        first.close()  # its goodbye: the failing handler runs on zeroconf's thread
        assert wait(lambda: not any(f"fail-{tag}-a" in n for n in browser.adverts), timeout=30)
        second = discovery.Advertiser(other, discovery.WORKER_TYPE, f"fail-{tag}-b", HOST, 2, {})
        assert wait(lambda: any(f"fail-{tag}-b" in n for n in seen), timeout=30), seen
        second.close()
    finally:
        browser.close()
        zc.close()
        other.close()
