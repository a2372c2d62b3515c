"""The scheduler's Launcher over gRPC: PrepareRank, StartRank and StopJob on the registry's worker
clients.

Each rank gets its own key and a certificate for its job attempt only (herd/rpc/pki.py
``rank_scope``), made here with the cluster CA: enough to meet its peers in the gradient exchange,
good for nothing else (no other server takes the rank role, nor another attempt's peers).
"""

from __future__ import annotations

from typing import Callable

from coordinator import convert
from coordinator.domain import FetchProgress, RankLaunch, WorkerRecord
from coordinator.registry import Registry
from herd.rpc import pki


class GrpcLauncher:
    def __init__(self, registry: Registry, coordinator_address: Callable[[], str],
                 authority: pki.Authority):
        self._registry = registry
        self._address = coordinator_address
        self._authority = authority

    def prepare_rank(self, launch: RankLaunch,
                     on_progress: Callable[[FetchProgress], bool]) -> None:
        self._registry.client(launch.worker.worker_id).prepare_rank(self._request(launch),
                                                                    on_progress)

    def start_rank(self, launch: RankLaunch) -> None:
        self._registry.client(launch.worker.worker_id).start_rank(self._request(launch))

    def _request(self, launch: RankLaunch):
        """The rank's StartRankRequest with its own credential (PrepareRank carries one too: a
        worker fetches nothing for a request the cluster CA did not issue an attempt for)."""
        scope = pki.rank_scope(launch.job.job_id, launch.job.attempt)
        credential = self._authority.issue("rank", scope, days=pki.RANK_DAYS)
        return convert.launch_to_pb(launch, self._address(), credential)

    def stop_job(self, worker: WorkerRecord, job_id: str, attempt: int = 0) -> None:
        self._registry.client(worker.worker_id).stop_job(job_id, attempt)
