"""Registry: the workers the coordinator may use.

zeroconf adverts of ``_herd-worker._tcp.local.`` (and static ``--worker`` targets) are only
candidates: a worker enters the registry after it answers an authenticated Describe, so a
process that advertises itself without the cluster secret never gets work. Liveness is
authenticated too: ``max_failures`` failed Health calls in a row remove a worker, and a vanished
record (an mDNS goodbye, which anyone on the LAN can send for any name) only prompts a Health call
at once; the worker leaves if that fails.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

from coordinator.convert import worker_from_pb
from coordinator.domain import WorkerRecord
from herd import PROTOCOL_VERSION, log
from herd.errors import AuthError, HerdError, NotFoundError, PeerLostError
from herd.rpc import discovery
from herd.rpc.channel import UNARY_DEADLINE_S, signed_channel
from herd.rpc.status import rpc_errors
from protos.v1 import worker_pb2, worker_pb2_grpc

logger = log.get(__name__)


class WorkerClient:
    """Calls to one worker agent, each with a deadline."""

    def __init__(self, target: str, secret: str):
        self.target = target
        self.channel = signed_channel(target, secret)
        self.stub = worker_pb2_grpc.WorkerServiceStub(self.channel)

    def describe(self, timeout: float = 3.0) -> WorkerRecord:
        with rpc_errors(self.target):
            reply = self.stub.Describe(worker_pb2.DescribeRequest(), timeout=timeout)
        return worker_from_pb(reply.worker)

    def health(self, timeout: float = 3.0) -> worker_pb2.HealthReply:
        with rpc_errors(self.target):
            return self.stub.Health(worker_pb2.HealthRequest(), timeout=timeout)

    def start_rank(self, req: worker_pb2.StartRankRequest) -> None:
        # StartRank fetches the dataset before it returns: a longer deadline than a plain call.
        with rpc_errors(self.target):
            self.stub.StartRank(req, timeout=120.0)

    def stop_job(self, job_id: str) -> None:
        with rpc_errors(self.target):
            self.stub.StopJob(worker_pb2.StopJobRequest(job_id=job_id), timeout=UNARY_DEADLINE_S)

    def close(self) -> None:
        self.channel.close()


@dataclass(frozen=True)
class Refusal:
    """Why an advert (or static target) is not in the registry, for ``herd workers``."""

    target: str
    kind: str     # "auth" | "unreachable" | "version" | "other"
    reason: str


def _refusal(target: str, err: HerdError) -> Refusal:
    kind = ("auth" if isinstance(err, AuthError) else
            "unreachable" if isinstance(err, PeerLostError) else "other")
    return Refusal(target, kind, err.message)


class Registry:
    def __init__(self, secret: str, on_lost: Callable[[str], None] = lambda _id: None,
                 static_targets: list[str] = (), health_interval_s: float = 1.0,
                 max_failures: int = 2):
        self._secret = secret
        self._on_lost = on_lost
        self._lock = threading.Lock()
        self._workers: dict[str, WorkerRecord] = {}
        self._clients: dict[str, WorkerClient] = {}
        self._source: dict[str, str] = {}      # worker_id -> advert name or static target
        self._failures: dict[str, int] = {}
        self.refused: dict[str, Refusal] = {}  # candidate -> why it was not admitted
        # candidate (advert name or static target) -> its addresses, each tried in turn
        self._candidates: dict[str, list[str]] = {t: [t] for t in static_targets}
        self.health_interval_s, self.max_failures = health_interval_s, max_failures
        self._stop = threading.Event()
        self._browser: discovery.Browser | None = None

    # --- candidates ------------------------------------------------------------------------

    def browse(self, zc) -> None:
        self._browser = discovery.Browser(zc, discovery.WORKER_TYPE, self._advert_added,
                                          self._advert_removed)

    def _advert_added(self, advert: discovery.Advert) -> None:
        with self._lock:
            self._candidates[advert.name] = advert.targets
        self._verify(advert.name, advert.targets)

    def _advert_removed(self, name: str) -> None:
        with self._lock:
            named = [wid for wid, src in self._source.items() if src == name]
            if not named:
                self._candidates.pop(name, None)
                self.refused.pop(name, None)  # gone: no longer worth listing as refused
        for wid in named:
            try:
                self.client(wid).health()
            except HerdError as e:
                with self._lock:
                    self._candidates.pop(name, None)
                self._remove(wid, "its zeroconf record vanished and it does not answer: "
                             f"{e.message}")
            else:
                logger.info("worker_goodbye_ignored", worker_id=wid, advert=name,
                            reason="it still answers an authenticated health check")

    def _describe(self, targets: list[str]) -> tuple[WorkerClient | None, WorkerRecord | Refusal]:
        """The first address that answers Describe with this protocol version."""
        refusal = Refusal(",".join(targets), "unreachable", "no address")
        for target in targets:
            client = WorkerClient(target, self._secret)
            try:
                record = client.describe()
            except HerdError as e:
                client.close()
                refusal = _refusal(target, e)
                continue
            if record.protocol_version != PROTOCOL_VERSION:
                client.close()
                return None, Refusal(target, "version", (
                    f"speaks herd protocol {record.protocol_version}, this coordinator "
                    f"{PROTOCOL_VERSION}: install the same herd version on both"))
            return client, record
        return None, refusal

    def _verify(self, source: str, targets: list[str]) -> WorkerRecord | None:
        client, record = self._describe(targets)
        if client is None:
            with self._lock:
                first = self.refused.get(source) != record
                self.refused[source] = record
            if first:
                logger.warning("worker_not_admitted", source=source, target=record.target,
                               kind=record.kind, error=record.reason)
            return None
        target = client.target
        with self._lock:
            self.refused.pop(source, None)
            old = self._clients.pop(record.worker_id, None)
            self._workers[record.worker_id] = record
            self._clients[record.worker_id] = client
            self._source[record.worker_id] = source
            self._failures[record.worker_id] = 0
        if old:
            old.close()
        else:
            logger.info("worker_admitted", worker_id=record.worker_id, target=target,
                        memory_bytes=record.memory_bytes, chip=record.chip)
        return record

    def _remove(self, worker_id: str, reason: str) -> None:
        with self._lock:
            record = self._workers.pop(worker_id, None)
            client = self._clients.pop(worker_id, None)
            self._source.pop(worker_id, None)
        if client:
            client.close()
        if record:
            logger.info("worker_removed", worker_id=worker_id, reason=reason)
            self._on_lost(worker_id)

    # --- queries ---------------------------------------------------------------------------

    def workers(self) -> list[WorkerRecord]:
        with self._lock:
            return sorted(self._workers.values(), key=lambda w: w.worker_id)

    def refusals(self) -> dict[str, Refusal]:
        """Candidates not admitted (and not admitted under another name since), and why."""
        with self._lock:
            admitted = set(self._source.values())
            return {s: r for s, r in self.refused.items() if s not in admitted}

    def client(self, worker_id: str) -> WorkerClient:
        with self._lock:
            client = self._clients.get(worker_id)
        if client is None:
            raise NotFoundError(f"worker {worker_id} is not in the registry")
        return client

    # --- health loop -----------------------------------------------------------------------

    def _check(self) -> None:
        with self._lock:
            clients = dict(self._clients)
            known = set(self._source.values())
            pending = {n: t for n, t in self._candidates.items() if n not in known}
        for wid, client in clients.items():
            try:
                reply = client.health()
            except HerdError as e:
                with self._lock:
                    self._failures[wid] = self._failures.get(wid, 0) + 1
                    n = self._failures[wid]
                if n >= self.max_failures:
                    self._remove(wid, f"health failed {n} times: {e.message}")
                continue
            with self._lock:
                self._failures[wid] = 0
                if wid in self._workers:
                    self._workers[wid].running_job_id = reply.worker.running_job_id
                    self._workers[wid].free_memory_bytes = reply.worker.free_memory_bytes
        # Candidates that were refused or unreachable get another chance (a secret may be fixed).
        for name, targets in pending.items():
            self._verify(name, targets)

    def run(self) -> None:
        while not self._stop.wait(self.health_interval_s):
            try:
                self._check()
            except Exception:  # keep checking the others; the error is logged in full
                logger.exception("registry_check_failed")

    def start(self) -> threading.Thread:
        for name, targets in list(self._candidates.items()):
            self._verify(name, targets)
        t = threading.Thread(target=self.run, daemon=True, name="registry")
        t.start()
        return t

    def close(self) -> None:
        self._stop.set()
        if self._browser:
            self._browser.close()
        with self._lock:
            clients = list(self._clients.values())
        for c in clients:
            c.close()
