"""The coordinator's authenticated client of one worker agent (its WorkerService), dialled as
the worker id it claims, so TLS itself pins who answers (herd/rpc/pki.py)."""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator

from coordinator.convert import fetch_from_pb, worker_from_pb
from coordinator.domain import FetchProgress, WorkerRecord
from herd.errors import PeerLostError
from herd.rpc import pki
from herd.rpc.channel import UNARY_DEADLINE_S, secure_channel
from herd.rpc.status import rpc_errors
from protos.v1 import worker_pb2, worker_pb2_grpc

# Getting a model onto a worker: 140 GB over 1 GbE is ~20 min. A lost worker fails the call long
# before (the channel's keepalive); a broken transfer resumes inside the worker.
PREPARE_DEADLINE_S = 6 * 3600.0


class WorkerClient:
    """Calls to one worker agent, each with a deadline; TLS to the worker named ``worker_id``
    (None: any worker of this cluster)."""

    def __init__(self, target: str, identity: pki.Identity, worker_id: str | None = None):
        self.target = target
        self.channel = secure_channel(target, identity, pki.dns_name("worker", worker_id))
        self.stub = worker_pb2_grpc.WorkerServiceStub(self.channel)
        self._lock = threading.Lock()
        self._calls = 0          # calls in flight on the channel
        self._retired = False    # replaced or removed: close once the last call ends
        self._closed = False

    @contextlib.contextmanager
    def _call(self) -> Iterator[None]:
        """One call on the channel, counted so that ``retire`` never closes it under the call;
        herd's errors for gRPC's."""
        with self._lock:
            if self._closed:
                raise PeerLostError(f"{self.target}: the connection to this worker was replaced "
                                    "or dropped by the registry", hint="try the call again")
            self._calls += 1
        try:
            with rpc_errors(self.target):
                yield
        finally:
            with self._lock:
                self._calls -= 1
                close = self._retired and self._calls == 0 and not self._closed
                self._closed = self._closed or close
            if close:
                self.channel.close()

    def describe(self, timeout: float = 3.0) -> WorkerRecord:
        with self._call():
            reply = self.stub.Describe(worker_pb2.DescribeRequest(), timeout=timeout)
        return worker_from_pb(reply.worker)

    def health(self, timeout: float = 3.0) -> worker_pb2.HealthReply:
        with self._call():
            return self.stub.Health(worker_pb2.HealthRequest(), timeout=timeout)

    def prepare_rank(self, req: worker_pb2.StartRankRequest,
                     on_progress: Callable[[FetchProgress], bool]) -> None:
        """Streams the worker's fetch progress into ``on_progress`` until it is done; a False
        from ``on_progress`` cancels the call (the worker stops fetching)."""
        with self._call():
            stream = self.stub.PrepareRank(req, timeout=PREPARE_DEADLINE_S)
            for message in stream:
                if not on_progress(fetch_from_pb(message)):
                    stream.cancel()
                    return

    def start_rank(self, req: worker_pb2.StartRankRequest) -> None:
        # StartRank fetches the dataset before it returns: a longer deadline than a plain call.
        with self._call():
            self.stub.StartRank(req, timeout=120.0)

    def stop_job(self, job_id: str, attempt: int = 0) -> None:
        with self._call():
            self.stub.StopJob(worker_pb2.StopJobRequest(job_id=job_id, attempt=attempt),
                              timeout=UNARY_DEADLINE_S)

    def retire(self) -> None:
        """Closes the channel once no call uses it (now, when none does); a call that starts
        after it is closed fails with PeerLostError."""
        with self._lock:
            self._retired = True
            close = self._calls == 0 and not self._closed
            self._closed = self._closed or close
        if close:
            self.channel.close()

    def close(self) -> None:
        """Closes the channel now: calls in flight are cancelled (the coordinator shuts down)."""
        with self._lock:
            self._closed = True
        self.channel.close()
