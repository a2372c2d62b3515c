"""The agent's own types. Protobuf stays at the edge (worker/agent/convert.py)."""

from __future__ import annotations

from dataclasses import dataclass

from herd.config import JobConfig
from herd.digest import FileDigest


@dataclass(frozen=True)
class RankSpec:
    """One rank to run here: a StartRank request in domain terms."""

    job_id: str
    attempt: int
    rank: int
    world_size: int
    config: JobConfig
    dataset: list[FileDigest]
    coordinator: str  # host:port to report and upload to
    ring_hosts: list[str]
    exchange_peers: list[str]
    resume_step: int = 0  # > 0: resume from this checkpoint, fetched from the coordinator
    stage_layers: tuple[tuple[int, int], ...] = ()  # pipelines: blocks per stage; () = whole model
    data_parallel: int = 1  # pipelines in the ring when stage_layers is set
    data_path: str = "ring"  # "ring" (ring_hosts) | "jaccl" | "grpc" (exchange_peers only)
    ibv_devices_json: str = ""  # JACCL: the MLX_IBV_DEVICES file's content
    jaccl_coordinator: str = ""  # JACCL: MLX_JACCL_COORDINATOR

    @property
    def key(self) -> tuple[str, int, int]:
        """StartRank is idempotent per (job, attempt, rank)."""
        return self.job_id, self.attempt, self.rank

    @property
    def pipelined(self) -> bool:
        return len(self.stage_layers) > 1


@dataclass
class Progress:
    """A rank's latest progress, as the coordinator shows it: each report updates its part."""

    iteration: int = 0
    train_loss: float = 0.0
    val_loss: float = 0.0
    learning_rate: float = 0.0
    tokens_per_second: float = 0.0
    trained_tokens: int = 0
    peak_memory_gb: float = 0.0
    exchange: str = ""
    world_size: int = 0
