from protos.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DescribeReply(_message.Message):
    __slots__ = ("worker",)
    WORKER_FIELD_NUMBER: _ClassVar[int]
    worker: _common_pb2.WorkerInfo
    def __init__(self, worker: _Optional[_Union[_common_pb2.WorkerInfo, _Mapping]] = ...) -> None: ...

class StartRankRequest(_message.Message):
    __slots__ = ("job_id", "attempt", "rank", "world_size", "config_yaml", "dataset", "coordinator", "ring_hosts", "exchange_peers", "resume_step", "stage_layers", "data_parallel", "data_path", "ibv_devices_json", "jaccl_coordinator", "model", "rank_cert_pem", "rank_key_pem", "resume_adapter", "neighbors_only")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    CONFIG_YAML_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_FIELD_NUMBER: _ClassVar[int]
    RING_HOSTS_FIELD_NUMBER: _ClassVar[int]
    EXCHANGE_PEERS_FIELD_NUMBER: _ClassVar[int]
    RESUME_STEP_FIELD_NUMBER: _ClassVar[int]
    STAGE_LAYERS_FIELD_NUMBER: _ClassVar[int]
    DATA_PARALLEL_FIELD_NUMBER: _ClassVar[int]
    DATA_PATH_FIELD_NUMBER: _ClassVar[int]
    IBV_DEVICES_JSON_FIELD_NUMBER: _ClassVar[int]
    JACCL_COORDINATOR_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RANK_CERT_PEM_FIELD_NUMBER: _ClassVar[int]
    RANK_KEY_PEM_FIELD_NUMBER: _ClassVar[int]
    RESUME_ADAPTER_FIELD_NUMBER: _ClassVar[int]
    NEIGHBORS_ONLY_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    attempt: int
    rank: int
    world_size: int
    config_yaml: str
    dataset: _containers.RepeatedCompositeFieldContainer[_common_pb2.FileDigest]
    coordinator: str
    ring_hosts: _containers.RepeatedScalarFieldContainer[str]
    exchange_peers: _containers.RepeatedScalarFieldContainer[str]
    resume_step: int
    stage_layers: _containers.RepeatedCompositeFieldContainer[_common_pb2.LayerRange]
    data_parallel: int
    data_path: str
    ibv_devices_json: str
    jaccl_coordinator: str
    model: _common_pb2.ModelSource
    rank_cert_pem: bytes
    rank_key_pem: bytes
    resume_adapter: _common_pb2.FileDigest
    neighbors_only: bool
    def __init__(self, job_id: _Optional[str] = ..., attempt: _Optional[int] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., config_yaml: _Optional[str] = ..., dataset: _Optional[_Iterable[_Union[_common_pb2.FileDigest, _Mapping]]] = ..., coordinator: _Optional[str] = ..., ring_hosts: _Optional[_Iterable[str]] = ..., exchange_peers: _Optional[_Iterable[str]] = ..., resume_step: _Optional[int] = ..., stage_layers: _Optional[_Iterable[_Union[_common_pb2.LayerRange, _Mapping]]] = ..., data_parallel: _Optional[int] = ..., data_path: _Optional[str] = ..., ibv_devices_json: _Optional[str] = ..., jaccl_coordinator: _Optional[str] = ..., model: _Optional[_Union[_common_pb2.ModelSource, _Mapping]] = ..., rank_cert_pem: _Optional[bytes] = ..., rank_key_pem: _Optional[bytes] = ..., resume_adapter: _Optional[_Union[_common_pb2.FileDigest, _Mapping]] = ..., neighbors_only: _Optional[bool] = ...) -> None: ...

class StartRankReply(_message.Message):
    __slots__ = ("pid",)
    PID_FIELD_NUMBER: _ClassVar[int]
    pid: int
    def __init__(self, pid: _Optional[int] = ...) -> None: ...

class StopJobRequest(_message.Message):
    __slots__ = ("job_id", "attempt")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    attempt: int
    def __init__(self, job_id: _Optional[str] = ..., attempt: _Optional[int] = ...) -> None: ...

class StopJobReply(_message.Message):
    __slots__ = ("was_running",)
    WAS_RUNNING_FIELD_NUMBER: _ClassVar[int]
    was_running: bool
    def __init__(self, was_running: _Optional[bool] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RunningRank(_message.Message):
    __slots__ = ("job_id", "attempt", "rank", "pid")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    attempt: int
    rank: int
    pid: int
    def __init__(self, job_id: _Optional[str] = ..., attempt: _Optional[int] = ..., rank: _Optional[int] = ..., pid: _Optional[int] = ...) -> None: ...

class HealthReply(_message.Message):
    __slots__ = ("worker", "ranks")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    worker: _common_pb2.WorkerInfo
    ranks: _containers.RepeatedCompositeFieldContainer[RunningRank]
    def __init__(self, worker: _Optional[_Union[_common_pb2.WorkerInfo, _Mapping]] = ..., ranks: _Optional[_Iterable[_Union[RunningRank, _Mapping]]] = ...) -> None: ...
