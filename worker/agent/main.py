"""``herd worker``: the agent daemon, one per machine.

It probes the machine, serves WorkerService over authenticated gRPC, advertises
``_herd-worker._tcp.local.`` (TXT: id, port, protocol version, memory, chip, mlx version; no
secrets) and runs at most one job's rank at a time (worker/rank_runner.py).
"""

from __future__ import annotations

import argparse
import signal
import socket
import threading
import uuid
from pathlib import Path


from herd import PROTOCOL_VERSION, log
from herd.rpc import discovery
from herd.rpc.auth import default_home, load_secret
from herd.rpc.channel import signed_server
from herd.rpc.status import abort
from herd.errors import HerdError, PlacementError
from herd.rpc.ports import free_ports
from protos.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from worker.agent.machine import Machine, free_memory_bytes, probe
from worker.agent.rank_process import RankProcess, RankSpec

logger = log.get(__name__)


def free_port(host: str) -> int:
    """A port free right now. Rank ports are chosen once at agent start and reused: a worker runs
    one rank at a time, and the coordinator must know every rank's port before any starts."""
    return free_ports(1, host)[0]


def parse_bytes(text: str) -> int:
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    return int(float(num) * units[unit])


class Worker:
    """The agent's state: who it is, and the rank it runs."""

    def __init__(self, worker_id: str, host: str, port: int, ring_port: int, exchange_port: int,
                 machine: Machine, state_dir: Path, secret: str):
        self.worker_id, self.host, self.port = worker_id, host, port
        self.ring_port, self.exchange_port = ring_port, exchange_port
        self.machine, self.state_dir, self._secret = machine, state_dir, secret
        self._lock = threading.Lock()
        self.rank: RankProcess | None = None

    def info(self) -> common_pb2.WorkerInfo:
        rank = self.rank
        return common_pb2.WorkerInfo(
            worker_id=self.worker_id, host=self.host, port=self.port, ring_port=self.ring_port,
            exchange_port=self.exchange_port, protocol_version=PROTOCOL_VERSION,
            memory_bytes=self.machine.memory_bytes,
            free_memory_bytes=min(self.machine.memory_bytes, free_memory_bytes() or 2**62),
            chip=self.machine.chip, gpu_cores=self.machine.gpu_cores, os=self.machine.os,
            mlx_version=self.machine.mlx_version, wired_limit_mb=self.machine.wired_limit_mb,
            running_job_id=rank.spec.job_id if rank and rank.running() else "",
        )

    def start_rank(self, spec: RankSpec) -> int:
        with self._lock:
            cur = self.rank
            if cur and cur.running():
                same = (cur.spec.job_id, cur.spec.attempt, cur.spec.rank)
                if same == (spec.job_id, spec.attempt, spec.rank):
                    return cur.proc.pid
                if cur.spec.job_id == spec.job_id and cur.spec.attempt < spec.attempt:
                    cur.stop()  # a rank of the failed attempt, not stopped yet: the new one wins
                else:
                    raise PlacementError(
                        f"worker {self.worker_id} is busy with job {cur.spec.job_id}")
            self.rank = RankProcess(spec, self.worker_id, self.state_dir, self._secret)
            return self.rank.start()

    def stop_job(self, job_id: str) -> bool:
        rank = self.rank
        if rank is None or rank.spec.job_id != job_id:
            return False
        return rank.stop()

    def stop_all(self) -> None:
        if self.rank:
            self.rank.stop()


class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    """Thin: converts, calls Worker, maps errors."""

    def __init__(self, worker: Worker):
        self.worker = worker

    def Describe(self, request, context):
        return worker_pb2.DescribeReply(worker=self.worker.info())

    def StartRank(self, request, context):
        spec = RankSpec(
            job_id=request.job_id, attempt=request.attempt, rank=request.rank,
            world_size=request.world_size, config_yaml=request.config_yaml,
            dataset=[(f.name, f.sha256, f.bytes) for f in request.dataset],
            coordinator=request.coordinator, ring_hosts=list(request.ring_hosts),
            exchange_peers=list(request.exchange_peers), resume_step=request.resume_step,
            stage_layers=tuple((r.start, r.end) for r in request.stage_layers),
            data_parallel=request.data_parallel or 1,
        )
        try:
            return worker_pb2.StartRankReply(pid=self.worker.start_rank(spec))
        except HerdError as e:
            logger.warning("start_rank_refused", job_id=spec.job_id, rank=spec.rank, error=str(e))
            abort(context, e)

    def StopJob(self, request, context):
        return worker_pb2.StopJobReply(was_running=self.worker.stop_job(request.job_id))

    def Health(self, request, context):
        ranks = []
        rank = self.worker.rank
        if rank and rank.running():
            ranks.append(worker_pb2.RunningRank(job_id=rank.spec.job_id, attempt=rank.spec.attempt,
                                                rank=rank.spec.rank, pid=rank.proc.pid))
        return worker_pb2.HealthReply(worker=self.worker.info(), ranks=ranks)


def advert_txt(info: common_pb2.WorkerInfo) -> dict[str, str]:
    return {"id": info.worker_id, "port": str(info.port), "protocol": str(info.protocol_version),
            "memory": str(info.memory_bytes), "chip": info.chip, "mlx": info.mlx_version}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="herd worker", description="run a worker agent")
    p.add_argument("--state-dir", type=Path, default=None, help="default $HERD_HOME/worker")
    p.add_argument("--host", default=None, help="address to serve and advertise (default: LAN IP)")
    p.add_argument("--port", type=int, default=0, help="WorkerService port (0 = any free)")
    p.add_argument("--ring-port", type=int, default=0, help="MLX ring port for ranks (0 = any)")
    p.add_argument("--exchange-port", type=int, default=0, help="gRPC exchange port (0 = any)")
    p.add_argument("--id", default=None, help="worker id (default: hostname + random suffix)")
    p.add_argument("--memory", default=None, help="pose with this much memory, e.g. 64GB (tests)")
    p.add_argument("--chip", default=None, help="pose as this chip (tests)")
    p.add_argument("--secret-file", type=Path, default=None)
    args = p.parse_args(argv[1:])
    try:
        secret = load_secret(args.secret_file)
    except HerdError as e:
        print(f"herd worker: {e}", flush=True)
        return e.exit_code
    host = args.host or discovery.local_ip()
    state_dir = args.state_dir or default_home() / "worker"
    state_dir.mkdir(parents=True, exist_ok=True)
    worker_id = args.id or f"{socket.gethostname().split('.')[0]}-{uuid.uuid4().hex[:6]}"
    machine = probe(parse_bytes(args.memory) if args.memory else None, args.chip)

    server = signed_server(secret, max_workers=16)
    port = server.add_insecure_port(f"{host}:{args.port}")
    worker = Worker(worker_id, host, port, args.ring_port or free_port(host),
                    args.exchange_port or free_port(host), machine, state_dir, secret)
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(WorkerServicer(worker), server)
    server.start()
    zc = discovery.make_zeroconf()
    advert = discovery.Advertiser(zc, discovery.WORKER_TYPE, worker_id, host, port,
                                  advert_txt(worker.info()))
    logger.info("worker_started", worker_id=worker_id, address=f"{host}:{port}",
                memory_bytes=machine.memory_bytes, chip=machine.chip, state_dir=str(state_dir))

    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    logger.info("worker_stopping", worker_id=worker_id)
    advert.close()
    worker.stop_all()
    server.stop(grace=2).wait()
    zc.close()
    return 0
