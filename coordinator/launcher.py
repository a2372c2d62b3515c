"""The scheduler's Launcher over gRPC: StartRank and StopJob on the registry's worker clients."""

from __future__ import annotations

from typing import Callable

from coordinator import convert
from coordinator.domain import RankLaunch, WorkerRecord
from coordinator.registry import Registry


class GrpcLauncher:
    def __init__(self, registry: Registry, coordinator_address: Callable[[], str]):
        self._registry = registry
        self._address = coordinator_address

    def start_rank(self, launch: RankLaunch) -> None:
        request = convert.launch_to_pb(launch, self._address())
        self._registry.client(launch.worker.worker_id).start_rank(request)

    def stop_job(self, worker: WorkerRecord, job_id: str) -> None:
        self._registry.client(worker.worker_id).stop_job(job_id)
