"""WorkerService: the agent's state (who it is, the rank it runs) and its thin servicer."""

from __future__ import annotations

import functools
import threading
from pathlib import Path

from herd import PROTOCOL_VERSION, log
from herd.errors import HerdError, PlacementError
from herd.netif import Interface
from herd.rpc.status import abort
from protos.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from worker.agent import convert
from worker.agent.domain import RankSpec
from worker.agent.machine import Machine, free_memory_bytes
from worker.agent.rank_process import RankProcess

logger = log.get(__name__)


class Worker:
    """The agent's state: who it is, and the rank it runs (at most one at a time)."""

    def __init__(self, worker_id: str, host: str, port: int, ring_port: int, exchange_port: int,
                 machine: Machine, state_dir: Path, secret: str,
                 interfaces: list[Interface] = ()):
        self.worker_id, self.host, self.port = worker_id, host, port
        self.interfaces = list(interfaces)
        self.ring_port, self.exchange_port = ring_port, exchange_port
        self.machine, self.state_dir, self._secret = machine, state_dir, secret
        self._lock = threading.Lock()
        self.rank: RankProcess | None = None

    def info(self) -> common_pb2.WorkerInfo:
        rank = self.rank
        return convert.worker_info(
            self.worker_id, self.host, self.port, self.ring_port, self.exchange_port,
            self.machine, min(self.machine.memory_bytes, free_memory_bytes() or 2**62),
            PROTOCOL_VERSION, rank.spec.job_id if rank and rank.running() else "",
            self.interfaces)

    def start_rank(self, spec: RankSpec) -> int:
        """Starts the rank; the same (job, attempt, rank) again returns the running one's pid."""
        with self._lock:
            cur = self.rank
            if cur and cur.running():
                if cur.spec.key == spec.key:
                    return cur.proc.pid
                if cur.spec.job_id == spec.job_id and cur.spec.attempt < spec.attempt:
                    cur.stop()  # a rank of the failed attempt, not stopped yet: the new one wins
                else:
                    raise PlacementError(
                        f"worker {self.worker_id} is busy with job {cur.spec.job_id}")
            self.rank = RankProcess(spec, self.worker_id, self.state_dir, self._secret)
            return self.rank.start()

    def stop_job(self, job_id: str) -> bool:
        """Stops the job's rank; False when none of it was running (idempotent)."""
        rank = self.rank
        if rank is None or rank.spec.job_id != job_id:
            return False
        return rank.stop()

    def stop_all(self) -> None:
        if self.rank:
            self.rank.stop()


def _unary(fn):
    @functools.wraps(fn)
    def wrapper(self, request, context):
        try:
            return fn(self, request, context)
        except HerdError as e:
            logger.warning("rpc_refused", rpc=fn.__name__, error=str(e))
            abort(context, e)

    return wrapper


class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    """Thin: converts, calls Worker, maps errors."""

    def __init__(self, worker: Worker):
        self.worker = worker

    @_unary
    def Describe(self, request, context):
        return worker_pb2.DescribeReply(worker=self.worker.info())

    @_unary
    def StartRank(self, request, context):
        return worker_pb2.StartRankReply(pid=self.worker.start_rank(convert.spec_from_pb(request)))

    @_unary
    def StopJob(self, request, context):
        return worker_pb2.StopJobReply(was_running=self.worker.stop_job(request.job_id))

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
