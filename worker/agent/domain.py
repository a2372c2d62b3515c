"""The agent's own types. Protobuf stays at the edge (worker/agent/convert.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from herd.config import JobConfig
from herd.digest import FileDigest
from herd.models.source import ModelSource
from herd.rpc.names import check_job_id, inside


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
    model: ModelSource = ModelSource()  # where the model comes from (default: a local folder)
    # The rank's own certificate and key, for this job attempt's exchange only (never logged).
    rank_cert_pem: bytes = field(default=b"", repr=False)
    rank_key_pem: bytes = field(default=b"", repr=False)
    # The job's resume_adapter_file as shipped from the laptop (None: read at the config's path).
    resume_adapter: FileDigest | None = None
    neighbors_only: bool = False  # a cable ring: the exchange dials only the ranks next to this

    def folder(self, state_dir: Path) -> Path:
        """This rank's job folder on the worker (one rank per worker and attempt):
        jobs/<job_id>/attempt-<n>, the job id checked and the folder kept inside jobs/."""
        return inside(state_dir / "jobs", check_job_id(self.job_id), f"attempt-{self.attempt:d}")

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
    # The iterations since the previous train report, their seconds, exchange seconds and
    # all-reduced gradient bytes; zero in a report that follows a validation.
    window_iterations: int = 0
    window_seconds: float = 0.0
    window_exchange_seconds: float = 0.0
    window_exchange_bytes: int = 0
    share: int = 0  # data parallel: this rank's items of each global batch, and its speed
    items_per_second: float = 0.0
