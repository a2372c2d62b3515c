"""The contract's promises, checked through real gRPC servers on loopback: an error keeps its
class (and so its exit code) across the wire, and every rpc whose proto comment says it is safe to
call twice is (Ray's rule: idempotent, or say that it is not)."""

from __future__ import annotations

import grpc
import pytest

from herd import errors
from herd.rpc.auth import new_secret
from herd.rpc.channel import signed_channel, signed_server
from herd.rpc.status import abort, rpc_errors

HOST = "127.0.0.1"

RAISED = [errors.ConfigError, errors.DatasetError, errors.PlacementError, errors.DoesNotFitError,
          errors.PeerLostError, errors.AuthError, errors.NotFoundError, errors.ChecksumError,
          errors.ProtocolError, errors.HerdError]


@pytest.fixture
def raising_server():
    """A server whose one method aborts with the error class named in the request."""
    secret = new_secret()

    def handler(request: bytes, context):
        cls = next(c for c in RAISED if c.__name__ == request.decode())
        abort(context, cls(f"the server says {cls.__name__}", hint="fix it there"))

    server = signed_server(secret, max_workers=2)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "test.Raise", {"Raise": grpc.unary_unary_rpc_method_handler(handler)})])
    port = server.add_insecure_port(f"{HOST}:0")
    server.start()
    channel = signed_channel(f"{HOST}:{port}", secret)
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

    def start_rank(self, launch):
        self.started.append(launch)

    def stop_job(self, w, job_id):
        self.stopped.append((w.worker_id, job_id))


@pytest.fixture
def coordinator(tmp_path):
    """A real CoordinatorService on loopback (scheduler, stores; no zeroconf), whose workers the
    test lists and whose launcher only records."""
    from coordinator.artifacts import AdapterStore, BlobStore
    from coordinator.registry import Registry
    from coordinator.scheduler import Scheduler
    from coordinator.service import CoordinatorServicer, add_to_server
    from coordinator.store import JobStore

    secret = new_secret()
    workers: list = []
    server = signed_server(secret, max_workers=4)
    port = server.add_insecure_port(f"{HOST}:0")
    s = Scheduler(JobStore(tmp_path / "db"), lambda: list(workers), FakeLauncher())
    add_to_server(CoordinatorServicer(s, Registry(secret), BlobStore(tmp_path / "blobs"),
                                      AdapterStore(tmp_path / "adapters")), server)
    server.start()
    yield f"{HOST}:{port}", secret, s, workers
    server.stop(grace=0).wait()


def test_herd_submit_of_a_dataset_the_coordinator_refuses_exits_3(coordinator, tmp_path, capsys,
                                                                  monkeypatch):
    from herd.cli import laptop

    target, secret, _, _ = coordinator
    monkeypatch.setenv("HERD_SECRET", secret)
    data = tmp_path / "data"
    data.mkdir()
    (data / "valid.jsonl").write_text('{"text": "ok"}\n')  # no train.jsonl: refused by the server
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"model: /nonexistent/model\ndata: {data}\n")
    assert laptop.main(["submit", str(cfg), "--no-check", "--coordinator", target]) == 3
    err = capsys.readouterr().err
    assert "herd submit: the dataset has no train.jsonl" in err
    assert "hint: a dataset folder holds train.jsonl" in err
