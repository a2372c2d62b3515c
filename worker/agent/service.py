"""WorkerService: the agent's state (who it is, the rank it runs, the model it prepares for it)
and its thin servicer."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

from herd import PROTOCOL_VERSION, log
from herd.errors import PlacementError
from herd.netif import Interface
from herd.rpc import auth, pki
from herd.rpc.status import handlers
from protos.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from worker.agent import convert
from worker.agent.coordinator_client import CoordinatorClient
from worker.agent.domain import RankSpec
from worker.agent.machine import Machine, free_memory_bytes
from worker.agent.model_cache import ModelCache
from worker.agent.model_fetch import Preparation
from worker.agent.policy import Policy, check_spec
from worker.agent.rank_process import RankProcess
from worker.agent.state import prune_attempts

# How often PrepareRank reports the fetch's progress.
PROGRESS_INTERVAL_S = 1.0

logger = log.get(__name__)
SERVICE = worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name
# Only the coordinator calls a worker. StartRank and PrepareRank carry a config, a model's
# manifest and a rank credential.
RULES = auth.rules(SERVICE, {m: "coordinator" for m in ("Describe", "PrepareRank", "StartRank",
                                                          "StopJob", "Health")},
                   sizes={"StartRank": 1024 * 1024, "PrepareRank": 1024 * 1024})


class Worker:
    """The agent's state: who it is, and the rank it runs (at most one at a time)."""

    def __init__(self, worker_id: str, host: str, port: int, ring_port: int, exchange_port: int,
                 machine: Machine, state_dir: Path, identity: pki.Identity,
                 interfaces: list[Interface] = (), policy: Policy | None = None,
                 model_cache: ModelCache | None = None,
                 rank_preexec: Callable[[], None] | None = None):
        self.worker_id, self.host, self.port = worker_id, host, port
        self.interfaces = list(interfaces)
        self.ring_port, self.exchange_port = ring_port, exchange_port
        self.machine, self.state_dir, self._identity = machine, state_dir, identity
        self.policy = policy or Policy()
        self.models = model_cache or ModelCache(state_dir / "models", worker_id)
        self._rank_preexec = rank_preexec  # run in each rank's child before exec (Ray actors)
        self._lock = threading.Lock()
        self.rank: RankProcess | None = None
        self.keep_attempts = 0  # retention of old attempt folders; 0 keeps them all
        self._preparing: dict[tuple, Preparation] = {}
        # Cancelled preparations whose threads may still be writing partial files: a new one
        # waits for them first (the same model's files, the same partial paths).
        self._retired: list[Preparation] = []

    def info(self) -> common_pb2.WorkerInfo:
        rank = self.rank
        return convert.worker_info(
            self.worker_id, self.host, self.port, self.ring_port, self.exchange_port,
            self.machine, self.machine.free_bytes(free_memory_bytes()),
            PROTOCOL_VERSION, rank.spec.job_id if rank and rank.running() else "",
            self.interfaces, self.policy.reported_roots(), self.policy.allow_remote_code,
            self.models.whole_models())

    def _busy_with_other(self, spec: RankSpec) -> None:
        cur = self.rank
        if cur and cur.running() and cur.spec.job_id != spec.job_id:
            raise PlacementError(f"worker {self.worker_id} is busy with job {cur.spec.job_id}")

    def prepare(self, spec: RankSpec) -> Preparation:
        """The rank's model being made ready here (started now, or already under way or done for
        the same (job, attempt, rank)); a preparation that failed is started again. The request
        is checked as data first, and against this worker's policy, before anything is fetched
        or written."""
        check_spec(spec, self._identity.ca_pem)
        with self._lock:
            self._busy_with_other(spec)
            prep = self._preparing.get(spec.key)
            if prep is None or prep.failed or prep.cancelled:
                self.policy.check_job(spec.config, spec.folder(self.state_dir), self.worker_id,
                                      spec.model, shipped_data=bool(spec.dataset),
                                      shipped_resume=spec.resume_adapter is not None)
                for key in list(self._preparing):
                    if key != spec.key:  # one job at a time: an older attempt's is over
                        self._retire(key)
                self._retired = [p for p in self._retired if not p.wait(0)]
                client = CoordinatorClient(spec.coordinator, self._identity)
                prep = Preparation(spec, self.models, client, spec.folder(self.state_dir) / "model",
                                   self.worker_id, after=list(self._retired))
                self._preparing[spec.key] = prep
            return prep

    def _retire(self, key: tuple) -> None:
        """Cancels a preparation (the caller holds the lock)."""
        prep = self._preparing.pop(key)
        prep.cancel()
        self._retired.append(prep)

    def start_rank(self, spec: RankSpec) -> int:
        """Starts the rank, once its model is ready (prepared by PrepareRank, or now); the same
        (job, attempt, rank) again returns the running one's pid. The request is checked as data
        first, and against this worker's policy (in ``prepare``)."""
        model_dir = self.prepare(spec).result()
        with self._lock:
            cur = self.rank
            if cur and cur.running():
                if cur.spec.key == spec.key:
                    return cur.proc.pid
                if cur.spec.job_id == spec.job_id and cur.spec.attempt < spec.attempt:
                    cur.abandon()  # a rank of the failed attempt, not stopped yet: the new one wins
                    cur.stop()
                else:
                    raise PlacementError(
                        f"worker {self.worker_id} is busy with job {cur.spec.job_id}")
            self.rank = RankProcess(spec, self.worker_id, self.state_dir, self._identity,
                                    on_exit=lambda r: self.models.unpin(r.spec.key),
                                    model_dir=model_dir, preexec=self._rank_preexec)
            pid = self.rank.start()
            # After the start, so the new attempt is the newest folder and its data links hold
            # its blobs.
            for gone in prune_attempts(self.state_dir, self.keep_attempts):
                logger.info("attempt_folder_pruned", folder=str(gone))
            return pid

    def stop_job(self, job_id: str, attempt: int = 0) -> bool:
        """Stops the job's rank (of ``attempt`` or an older one; 0: any), its model's preparation,
        and its relay's re-deliveries; False when none of it was running (idempotent)."""
        with self._lock:  # (a newer attempt's preparation, started meanwhile, goes on)
            for key in [k for k in self._preparing
                        if k[0] == job_id and (not attempt or k[1] <= attempt)]:
                self._retire(key)
        self.models.unpin_job(job_id, attempt)
        rank = self.rank
        if rank is None or rank.spec.job_id != job_id or (attempt and rank.spec.attempt > attempt):
            return False
        rank.abandon()
        return rank.stop()

    def stop_all(self) -> None:
        if self.rank:
            self.rank.abandon()
            self.rank.stop()


_unary, _streaming = handlers("the worker", lambda servicer: servicer.worker.state_dir)


class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    """Thin: converts, calls Worker, maps errors."""

    def __init__(self, worker: Worker):
        self.worker = worker

    @_unary
    def Describe(self, request, context):
        return worker_pb2.DescribeReply(worker=self.worker.info())

    @_streaming
    def PrepareRank(self, request, context):
        prep = self.worker.prepare(convert.spec_from_pb(request))
        while not prep.wait(PROGRESS_INTERVAL_S):
            if not context.is_active():  # the coordinator gave up on this attempt
                prep.cancel()
                return
            yield convert.fetch_to_pb(prep.status())
        prep.result()  # its error, if it failed
        yield convert.fetch_to_pb(prep.status())

    @_unary
    def StartRank(self, request, context):
        return worker_pb2.StartRankReply(pid=self.worker.start_rank(convert.spec_from_pb(request)))

    @_unary
    def StopJob(self, request, context):
        return worker_pb2.StopJobReply(
            was_running=self.worker.stop_job(request.job_id, request.attempt))

    @_unary
    def Health(self, request, context):
        rank = self.worker.rank
        running = [convert.running_rank_to_pb(rank.spec, rank.proc.pid)] if (
            rank and rank.running()) else []
        return worker_pb2.HealthReply(worker=self.worker.info(), ranks=running)


def advert_txt(info: common_pb2.WorkerInfo) -> dict[str, str]:
    """The zeroconf TXT record: who and what, never a secret."""
    return {"id": info.worker_id, "port": str(info.port), "protocol": str(info.protocol_version),
            "memory": str(info.memory_bytes), "chip": info.chip, "mlx": info.mlx_version}


def add_to_server(servicer: WorkerServicer, server) -> None:
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(servicer, server)
