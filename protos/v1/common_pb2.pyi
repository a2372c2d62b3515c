from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_PLACING: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]
    JOB_STATE_RESTARTING: _ClassVar[JobState]
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_PLACING: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState
JOB_STATE_RESTARTING: JobState

class WorkerInfo(_message.Message):
    __slots__ = ("worker_id", "host", "port", "ring_port", "exchange_port", "protocol_version", "memory_bytes", "free_memory_bytes", "chip", "gpu_cores", "os", "mlx_version", "running_job_id", "wired_limit_mb", "interfaces", "resources", "model_roots", "allow_remote_code", "cached_models")
    class ResourcesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    RING_PORT_FIELD_NUMBER: _ClassVar[int]
    EXCHANGE_PORT_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    FREE_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHIP_FIELD_NUMBER: _ClassVar[int]
    GPU_CORES_FIELD_NUMBER: _ClassVar[int]
    OS_FIELD_NUMBER: _ClassVar[int]
    MLX_VERSION_FIELD_NUMBER: _ClassVar[int]
    RUNNING_JOB_ID_FIELD_NUMBER: _ClassVar[int]
    WIRED_LIMIT_MB_FIELD_NUMBER: _ClassVar[int]
    INTERFACES_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    MODEL_ROOTS_FIELD_NUMBER: _ClassVar[int]
    ALLOW_REMOTE_CODE_FIELD_NUMBER: _ClassVar[int]
    CACHED_MODELS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    host: str
    port: int
    ring_port: int
    exchange_port: int
    protocol_version: int
    memory_bytes: int
    free_memory_bytes: int
    chip: str
    gpu_cores: int
    os: str
    mlx_version: str
    running_job_id: str
    wired_limit_mb: int
    interfaces: _containers.RepeatedCompositeFieldContainer[NetInterface]
    resources: _containers.ScalarMap[str, float]
    model_roots: _containers.RepeatedScalarFieldContainer[str]
    allow_remote_code: bool
    cached_models: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, worker_id: _Optional[str] = ..., host: _Optional[str] = ..., port: _Optional[int] = ..., ring_port: _Optional[int] = ..., exchange_port: _Optional[int] = ..., protocol_version: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., free_memory_bytes: _Optional[int] = ..., chip: _Optional[str] = ..., gpu_cores: _Optional[int] = ..., os: _Optional[str] = ..., mlx_version: _Optional[str] = ..., running_job_id: _Optional[str] = ..., wired_limit_mb: _Optional[int] = ..., interfaces: _Optional[_Iterable[_Union[NetInterface, _Mapping]]] = ..., resources: _Optional[_Mapping[str, float]] = ..., model_roots: _Optional[_Iterable[str]] = ..., allow_remote_code: _Optional[bool] = ..., cached_models: _Optional[_Iterable[str]] = ...) -> None: ...

class NetInterface(_message.Message):
    __slots__ = ("name", "kind", "addresses", "speed_mbps", "rdma_device", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    SPEED_MBPS_FIELD_NUMBER: _ClassVar[int]
    RDMA_DEVICE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    addresses: _containers.RepeatedScalarFieldContainer[str]
    speed_mbps: int
    rdma_device: str
    data: bool
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., addresses: _Optional[_Iterable[str]] = ..., speed_mbps: _Optional[int] = ..., rdma_device: _Optional[str] = ..., data: _Optional[bool] = ...) -> None: ...

class FileDigest(_message.Message):
    __slots__ = ("name", "sha256", "bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    sha256: str
    bytes: int
    def __init__(self, name: _Optional[str] = ..., sha256: _Optional[str] = ..., bytes: _Optional[int] = ...) -> None: ...

class JobSpec(_message.Message):
    __slots__ = ("name", "config_yaml", "dataset", "model_digest", "resume_from", "resume_adapter", "model_config_json")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CONFIG_YAML_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    MODEL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    RESUME_FROM_FIELD_NUMBER: _ClassVar[int]
    RESUME_ADAPTER_FIELD_NUMBER: _ClassVar[int]
    MODEL_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    config_yaml: str
    dataset: _containers.RepeatedCompositeFieldContainer[FileDigest]
    model_digest: str
    resume_from: str
    resume_adapter: FileDigest
    model_config_json: str
    def __init__(self, name: _Optional[str] = ..., config_yaml: _Optional[str] = ..., dataset: _Optional[_Iterable[_Union[FileDigest, _Mapping]]] = ..., model_digest: _Optional[str] = ..., resume_from: _Optional[str] = ..., resume_adapter: _Optional[_Union[FileDigest, _Mapping]] = ..., model_config_json: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("digest", "names", "files", "bytes", "added_unix_ms", "job_ids", "hub_ids")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    ADDED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    JOB_IDS_FIELD_NUMBER: _ClassVar[int]
    HUB_IDS_FIELD_NUMBER: _ClassVar[int]
    digest: str
    names: _containers.RepeatedScalarFieldContainer[str]
    files: _containers.RepeatedCompositeFieldContainer[FileDigest]
    bytes: int
    added_unix_ms: int
    job_ids: _containers.RepeatedScalarFieldContainer[str]
    hub_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, digest: _Optional[str] = ..., names: _Optional[_Iterable[str]] = ..., files: _Optional[_Iterable[_Union[FileDigest, _Mapping]]] = ..., bytes: _Optional[int] = ..., added_unix_ms: _Optional[int] = ..., job_ids: _Optional[_Iterable[str]] = ..., hub_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ModelSource(_message.Message):
    __slots__ = ("digest", "files", "hub_repo", "hub_revision")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    HUB_REPO_FIELD_NUMBER: _ClassVar[int]
    HUB_REVISION_FIELD_NUMBER: _ClassVar[int]
    digest: str
    files: _containers.RepeatedCompositeFieldContainer[FileDigest]
    hub_repo: str
    hub_revision: str
    def __init__(self, digest: _Optional[str] = ..., files: _Optional[_Iterable[_Union[FileDigest, _Mapping]]] = ..., hub_repo: _Optional[str] = ..., hub_revision: _Optional[str] = ...) -> None: ...

class FetchProgress(_message.Message):
    __slots__ = ("rank", "worker_id", "source", "files", "bytes_needed", "bytes_cached", "bytes_received", "bytes_per_second", "done")
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    BYTES_NEEDED_FIELD_NUMBER: _ClassVar[int]
    BYTES_CACHED_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    rank: int
    worker_id: str
    source: str
    files: int
    bytes_needed: int
    bytes_cached: int
    bytes_received: int
    bytes_per_second: float
    done: bool
    def __init__(self, rank: _Optional[int] = ..., worker_id: _Optional[str] = ..., source: _Optional[str] = ..., files: _Optional[int] = ..., bytes_needed: _Optional[int] = ..., bytes_cached: _Optional[int] = ..., bytes_received: _Optional[int] = ..., bytes_per_second: _Optional[float] = ..., done: _Optional[bool] = ...) -> None: ...

class RankProgress(_message.Message):
    __slots__ = ("rank", "worker_id", "iteration", "train_loss", "val_loss", "learning_rate", "tokens_per_second", "trained_tokens", "peak_memory_gb", "exchange", "world_size", "window_iterations", "window_seconds", "window_exchange_seconds", "window_exchange_bytes", "validation", "share", "items_per_second")
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    VAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    TRAINED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PEAK_MEMORY_GB_FIELD_NUMBER: _ClassVar[int]
    EXCHANGE_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    WINDOW_ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_EXCHANGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_EXCHANGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    ITEMS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    rank: int
    worker_id: str
    iteration: int
    train_loss: float
    val_loss: float
    learning_rate: float
    tokens_per_second: float
    trained_tokens: int
    peak_memory_gb: float
    exchange: str
    world_size: int
    window_iterations: int
    window_seconds: float
    window_exchange_seconds: float
    window_exchange_bytes: int
    validation: bool
    share: int
    items_per_second: float
    def __init__(self, rank: _Optional[int] = ..., worker_id: _Optional[str] = ..., iteration: _Optional[int] = ..., train_loss: _Optional[float] = ..., val_loss: _Optional[float] = ..., learning_rate: _Optional[float] = ..., tokens_per_second: _Optional[float] = ..., trained_tokens: _Optional[int] = ..., peak_memory_gb: _Optional[float] = ..., exchange: _Optional[str] = ..., world_size: _Optional[int] = ..., window_iterations: _Optional[int] = ..., window_seconds: _Optional[float] = ..., window_exchange_seconds: _Optional[float] = ..., window_exchange_bytes: _Optional[int] = ..., validation: _Optional[bool] = ..., share: _Optional[int] = ..., items_per_second: _Optional[float] = ...) -> None: ...

class LayerRange(_message.Message):
    __slots__ = ("start", "end")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class StagePiece(_message.Message):
    __slots__ = ("index", "count", "layers")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    index: int
    count: int
    layers: LayerRange
    def __init__(self, index: _Optional[int] = ..., count: _Optional[int] = ..., layers: _Optional[_Union[LayerRange, _Mapping]] = ...) -> None: ...

class CheckpointInfo(_message.Message):
    __slots__ = ("job_id", "step", "files", "created_unix_ms", "stage")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    step: int
    files: _containers.RepeatedCompositeFieldContainer[FileDigest]
    created_unix_ms: int
    stage: StagePiece
    def __init__(self, job_id: _Optional[str] = ..., step: _Optional[int] = ..., files: _Optional[_Iterable[_Union[FileDigest, _Mapping]]] = ..., created_unix_ms: _Optional[int] = ..., stage: _Optional[_Union[StagePiece, _Mapping]] = ...) -> None: ...

class JobStatus(_message.Message):
    __slots__ = ("job_id", "name", "state", "message", "created_unix_ms", "updated_unix_ms", "workers", "iters", "attempt", "ranks", "checkpoints", "worker_ids", "model", "model_digest")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    UPDATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    ITERS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    WORKER_IDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    name: str
    state: JobState
    message: str
    created_unix_ms: int
    updated_unix_ms: int
    workers: int
    iters: int
    attempt: int
    ranks: _containers.RepeatedCompositeFieldContainer[RankProgress]
    checkpoints: _containers.RepeatedCompositeFieldContainer[CheckpointInfo]
    worker_ids: _containers.RepeatedScalarFieldContainer[str]
    model: str
    model_digest: str
    def __init__(self, job_id: _Optional[str] = ..., name: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., message: _Optional[str] = ..., created_unix_ms: _Optional[int] = ..., updated_unix_ms: _Optional[int] = ..., workers: _Optional[int] = ..., iters: _Optional[int] = ..., attempt: _Optional[int] = ..., ranks: _Optional[_Iterable[_Union[RankProgress, _Mapping]]] = ..., checkpoints: _Optional[_Iterable[_Union[CheckpointInfo, _Mapping]]] = ..., worker_ids: _Optional[_Iterable[str]] = ..., model: _Optional[str] = ..., model_digest: _Optional[str] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("job_id", "seq", "time_unix_ms", "kind", "state", "message", "progress", "step", "fetch")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[JobEvent.Kind]
        KIND_STATE: _ClassVar[JobEvent.Kind]
        KIND_PROGRESS: _ClassVar[JobEvent.Kind]
        KIND_CHECKPOINT: _ClassVar[JobEvent.Kind]
        KIND_LOG: _ClassVar[JobEvent.Kind]
        KIND_FETCH: _ClassVar[JobEvent.Kind]
    KIND_UNSPECIFIED: JobEvent.Kind
    KIND_STATE: JobEvent.Kind
    KIND_PROGRESS: JobEvent.Kind
    KIND_CHECKPOINT: JobEvent.Kind
    KIND_LOG: JobEvent.Kind
    KIND_FETCH: JobEvent.Kind
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIME_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    FETCH_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    seq: int
    time_unix_ms: int
    kind: JobEvent.Kind
    state: JobState
    message: str
    progress: RankProgress
    step: int
    fetch: FetchProgress
    def __init__(self, job_id: _Optional[str] = ..., seq: _Optional[int] = ..., time_unix_ms: _Optional[int] = ..., kind: _Optional[_Union[JobEvent.Kind, str]] = ..., state: _Optional[_Union[JobState, str]] = ..., message: _Optional[str] = ..., progress: _Optional[_Union[RankProgress, _Mapping]] = ..., step: _Optional[int] = ..., fetch: _Optional[_Union[FetchProgress, _Mapping]] = ...) -> None: ...

class FileChunk(_message.Message):
    __slots__ = ("name", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    data: bytes
    def __init__(self, name: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...
