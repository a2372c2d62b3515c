"""The coordinator's own types. Protobuf stays at the edge (coordinator/convert.py)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from herd.config import JobConfig
from herd.digest import FileDigest
from herd.models.source import FetchProgress, ModelSource  # noqa: F401 (the domain's too)
from herd.netif import Interface


class JobState(enum.Enum):
    QUEUED = "queued"
    PLACING = "placing"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    RESTARTING = "restarting"

    @property
    def final(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)

    @property
    def active(self) -> bool:
        return self in (JobState.PLACING, JobState.RUNNING)

    @property
    def waiting(self) -> bool:
        return self in (JobState.QUEUED, JobState.RESTARTING)


# Which transitions the state machine allows; anything else is a bug, not a user error.
TRANSITIONS: dict[JobState, set[JobState]] = {
    JobState.QUEUED: {JobState.PLACING, JobState.FAILED, JobState.CANCELLED},
    JobState.PLACING: {JobState.RUNNING, JobState.RESTARTING, JobState.FAILED, JobState.CANCELLED},
    JobState.RUNNING: {JobState.SUCCEEDED, JobState.RESTARTING, JobState.FAILED,
                       JobState.CANCELLED},
    JobState.RESTARTING: {JobState.PLACING, JobState.FAILED, JobState.CANCELLED},
    JobState.SUCCEEDED: set(),
    JobState.FAILED: set(),
    JobState.CANCELLED: set(),
}


def check_transition(job: "Job", to: JobState) -> None:
    if to not in TRANSITIONS[job.state]:
        raise ValueError(f"job {job.job_id}: {job.state.value} -> {to.value} is not allowed")


class EventKind(enum.Enum):
    STATE = "state"
    PROGRESS = "progress"
    CHECKPOINT = "checkpoint"
    LOG = "log"
    FETCH = "fetch"


@dataclass
class RankProgress:
    rank: int
    worker_id: str = ""
    iteration: int = 0
    train_loss: float = 0.0
    val_loss: float = 0.0
    learning_rate: float = 0.0
    tokens_per_second: float = 0.0
    trained_tokens: int = 0
    peak_memory_gb: float = 0.0
    exchange: str = ""
    world_size: int = 0
    # The iterations since the rank's previous train report (0 in a validation's report): their
    # seconds, the exchange's part of them and the gradient bytes all-reduced.
    window_iterations: int = 0
    window_seconds: float = 0.0
    window_exchange_seconds: float = 0.0
    window_exchange_bytes: int = 0
    validation: bool = False  # a validation report: iteration and val_loss are its own
    share: int = 0  # data parallel: this rank's items of each global batch, and its speed
    items_per_second: float = 0.0


@dataclass(frozen=True)
class Checkpoint:
    job_id: str
    step: int
    files: list[FileDigest]
    created_ms: int = 0


@dataclass
class Job:
    job_id: str
    name: str
    config: JobConfig  # parsed once, when the service accepts the job or the store loads it
    dataset: list[FileDigest]
    workers_needed: int
    iters: int
    state: JobState = JobState.QUEUED
    message: str = ""
    created_ms: int = 0
    updated_ms: int = 0
    attempt: int = 0
    worker_ids: list[str] = field(default_factory=list)
    # The model store's model the job trains on, pinned at submit ("": the hub, or a folder).
    model_digest: str = ""
    # The config's resume_adapter_file as uploaded at submit (None: read at its path on workers).
    resume_adapter: FileDigest | None = None
    # The model's config.json as the laptop read it at submit: what the coordinator plans with
    # when it cannot read the model itself (coordinator/models.py ``config``).
    model_config: dict | None = None

    def blobs(self) -> set[str]:
        """The sha256 of every uploaded file the job's ranks fetch (its dataset, its resume
        adapter); the stored model's files are the model store's."""
        return {d.sha256 for d in self.dataset} | (
            {self.resume_adapter.sha256} if self.resume_adapter else set())


@dataclass(frozen=True)
class JobEvent:
    job_id: str
    seq: int
    time_ms: int
    kind: EventKind
    state: JobState | None = None
    message: str = ""
    progress: RankProgress | None = None
    step: int = 0
    fetch: FetchProgress | None = None


@dataclass
class WorkerRecord:
    """A worker that answered an authenticated Describe."""

    worker_id: str
    host: str
    port: int
    ring_port: int
    exchange_port: int
    memory_bytes: int
    free_memory_bytes: int = 0
    chip: str = ""
    gpu_cores: int = 0
    os: str = ""
    mlx_version: str = ""
    protocol_version: int = 0
    running_job_id: str = ""
    wired_limit_mb: int = 0
    running_attempt: int = 0  # the attempt of the rank it runs (from Health; 0 = unknown)
    interfaces: list[Interface] = field(default_factory=list)  # the data plane's candidates
    last_seen_ms: int = 0  # its last authenticated answer (Describe or Health), unix ms
    resources: dict[str, float] = field(default_factory=dict)  # a Ray node's (backend: ray)
    # Its owner's policy (worker/agent/policy.py): resolved model roots (empty: not reported)
    # and whether it runs code a model ships.
    model_roots: tuple[str, ...] = ()
    allow_remote_code: bool = False
    cached_models: tuple[str, ...] = ()  # stored models its cache holds whole (by digest)

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class RankLaunch:
    """One rank to start: where, with which ring and exchange peers, from which checkpoint."""

    job: Job
    rank: int
    worker: WorkerRecord
    ring_hosts: list[str]
    exchange_peers: list[str]
    resume_step: int = 0  # > 0: resume from this stored checkpoint
    stage_layers: tuple[tuple[int, int], ...] = ()  # pipelines: blocks per stage
    data_parallel: int = 1
    data_path: str = "ring"  # "ring" | "jaccl" | "grpc" (coordinator/planner/network.py)
    ibv_devices_json: str = ""  # JACCL: MLX_IBV_DEVICES content
    jaccl_coordinator: str = ""  # JACCL: MLX_JACCL_COORDINATOR
    model: ModelSource = ModelSource()
    neighbors_only: bool = False  # a cable ring: each rank reaches only the ranks next to it
