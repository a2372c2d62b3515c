"""proto <-> domain, once, for every message the coordinator sends or receives."""

from __future__ import annotations

import time

from coordinator.domain import (
    Checkpoint,
    EventKind,
    FetchProgress,
    FileDigest,
    Job,
    JobEvent,
    JobState,
    ModelSource,
    RankLaunch,
    RankProgress,
    WorkerRecord,
)
from coordinator.models import StoredModel
from herd.config import config_to_yaml
from herd.netif import Interface
from herd.rpc.pki import Identity
from herd.stage_cut import StagePiece
from protos.v1 import common_pb2, worker_pb2

_STATE_TO_PB = {
    JobState.QUEUED: common_pb2.JOB_STATE_QUEUED,
    JobState.PLACING: common_pb2.JOB_STATE_PLACING,
    JobState.RUNNING: common_pb2.JOB_STATE_RUNNING,
    JobState.SUCCEEDED: common_pb2.JOB_STATE_SUCCEEDED,
    JobState.FAILED: common_pb2.JOB_STATE_FAILED,
    JobState.CANCELLED: common_pb2.JOB_STATE_CANCELLED,
    JobState.RESTARTING: common_pb2.JOB_STATE_RESTARTING,
}
_STATE_FROM_PB = {v: k for k, v in _STATE_TO_PB.items()}
_KIND_TO_PB = {
    EventKind.STATE: common_pb2.JobEvent.KIND_STATE,
    EventKind.PROGRESS: common_pb2.JobEvent.KIND_PROGRESS,
    EventKind.CHECKPOINT: common_pb2.JobEvent.KIND_CHECKPOINT,
    EventKind.LOG: common_pb2.JobEvent.KIND_LOG,
    EventKind.FETCH: common_pb2.JobEvent.KIND_FETCH,
}
_KIND_FROM_PB = {v: k for k, v in _KIND_TO_PB.items()}


def state_to_pb(s: JobState) -> int:
    return _STATE_TO_PB[s]


def state_from_pb(s: int) -> JobState:
    return _STATE_FROM_PB[s]


def digest_to_pb(d: FileDigest) -> common_pb2.FileDigest:
    return common_pb2.FileDigest(name=d.name, sha256=d.sha256, bytes=d.bytes)


def digest_from_pb(m: common_pb2.FileDigest) -> FileDigest:
    return FileDigest(name=m.name, sha256=m.sha256, bytes=m.bytes)


_PROGRESS_FIELDS = ("rank", "worker_id", "iteration", "train_loss", "val_loss", "learning_rate",
                    "tokens_per_second", "trained_tokens", "peak_memory_gb", "exchange",
                    "world_size", "window_iterations", "window_seconds",
                    "window_exchange_seconds", "window_exchange_bytes", "validation", "share",
                    "items_per_second")


def progress_to_pb(p: RankProgress) -> common_pb2.RankProgress:
    return common_pb2.RankProgress(**{f: getattr(p, f) for f in _PROGRESS_FIELDS})


def progress_from_pb(m: common_pb2.RankProgress, **checked) -> RankProgress:
    """``checked``: fields the caller vouches for (a report's rank and worker, as its TLS peer
    and the attempt say), over what the message claims (any rank of a job could write another's
    progress: a review)."""
    return RankProgress(**{f: getattr(m, f) for f in _PROGRESS_FIELDS} | checked)


_FETCH_FIELDS = ("rank", "worker_id", "source", "files", "bytes_needed", "bytes_cached",
                 "bytes_received", "bytes_per_second", "done")


def fetch_to_pb(f: FetchProgress) -> common_pb2.FetchProgress:
    return common_pb2.FetchProgress(**{k: getattr(f, k) for k in _FETCH_FIELDS})


def fetch_from_pb(m: common_pb2.FetchProgress) -> FetchProgress:
    return FetchProgress(**{k: getattr(m, k) for k in _FETCH_FIELDS})


def model_source_to_pb(m: ModelSource) -> common_pb2.ModelSource:
    return common_pb2.ModelSource(digest=m.digest, files=[digest_to_pb(f) for f in m.files],
                                  hub_repo=m.hub_repo, hub_revision=m.hub_revision)


def model_to_pb(m: StoredModel, job_ids: list[str] = ()) -> common_pb2.ModelInfo:
    return common_pb2.ModelInfo(digest=m.digest, names=m.names, bytes=m.bytes,
                                files=[digest_to_pb(f) for f in m.files],
                                added_unix_ms=m.added_ms, job_ids=job_ids,
                                hub_ids=m.hub_ids)


def checkpoint_to_pb(c: Checkpoint) -> common_pb2.CheckpointInfo:
    return common_pb2.CheckpointInfo(job_id=c.job_id, step=c.step, created_unix_ms=c.created_ms,
                                     files=[digest_to_pb(f) for f in c.files])


def checkpoint_from_pb(m: common_pb2.CheckpointInfo) -> Checkpoint:
    return Checkpoint(job_id=m.job_id, step=m.step, created_ms=m.created_unix_ms,
                      files=[digest_from_pb(f) for f in m.files])


def stage_to_pb(p: StagePiece) -> common_pb2.StagePiece:
    return common_pb2.StagePiece(index=p.index, count=p.count,
                                 layers=common_pb2.LayerRange(start=p.start, end=p.end))


def stage_from_pb(m: common_pb2.StagePiece) -> StagePiece:
    return StagePiece(index=m.index, count=m.count, start=m.layers.start, end=m.layers.end)


def job_to_pb(job: Job, ranks: list[RankProgress] = (),
              checkpoints: list[Checkpoint] = ()) -> common_pb2.JobStatus:
    return common_pb2.JobStatus(
        job_id=job.job_id, name=job.name, state=state_to_pb(job.state), message=job.message,
        created_unix_ms=job.created_ms, updated_unix_ms=job.updated_ms,
        workers=job.workers_needed, iters=job.iters, attempt=job.attempt,
        ranks=[progress_to_pb(r) for r in ranks],
        checkpoints=[checkpoint_to_pb(c) for c in checkpoints], worker_ids=job.worker_ids,
        model=job.config.model, model_digest=job.model_digest,
    )


def event_to_pb(e: JobEvent) -> common_pb2.JobEvent:
    m = common_pb2.JobEvent(job_id=e.job_id, seq=e.seq, time_unix_ms=e.time_ms,
                            kind=_KIND_TO_PB[e.kind], message=e.message, step=e.step)
    if e.state is not None:
        m.state = state_to_pb(e.state)
    if e.progress is not None:
        m.progress.CopyFrom(progress_to_pb(e.progress))
    if e.fetch is not None:
        m.fetch.CopyFrom(fetch_to_pb(e.fetch))
    return m


def health_event_pb(job_id: str, after_seq: int, health: str) -> common_pb2.JobEvent:
    """A line for a watcher when the coordinator cannot write its database (or can again): not
    stored (the database is what fails), so it repeats the last seq sent and a watcher that
    reconnects asks for the same events."""
    message = (f"the coordinator cannot record this job's progress: {health}; the ranks train "
               "on and their reports wait until it can" if health else
               "the coordinator can write its database again; the reports held meanwhile follow")
    return common_pb2.JobEvent(job_id=job_id, seq=after_seq, time_unix_ms=int(time.time() * 1000),
                               kind=common_pb2.JobEvent.KIND_LOG, message=message)


def event_from_pb(m: common_pb2.JobEvent) -> JobEvent:
    return JobEvent(
        job_id=m.job_id, seq=m.seq, time_ms=m.time_unix_ms, kind=_KIND_FROM_PB[m.kind],
        state=state_from_pb(m.state) if m.state else None, message=m.message,
        progress=progress_from_pb(m.progress) if m.HasField("progress") else None, step=m.step,
        fetch=fetch_from_pb(m.fetch) if m.HasField("fetch") else None,
    )


_WORKER_FIELDS = ("worker_id", "host", "port", "ring_port", "exchange_port", "memory_bytes",
                  "free_memory_bytes", "chip", "gpu_cores", "os", "mlx_version",
                  "protocol_version", "running_job_id", "wired_limit_mb", "allow_remote_code")


def interface_to_pb(i: Interface) -> common_pb2.NetInterface:
    return common_pb2.NetInterface(name=i.name, kind=i.kind, addresses=i.addresses,
                                   speed_mbps=i.speed_mbps, rdma_device=i.rdma_device, data=i.data)


def interface_from_pb(m: common_pb2.NetInterface) -> Interface:
    return Interface(m.name, m.kind, tuple(m.addresses), m.speed_mbps, m.rdma_device, m.data)


def worker_to_pb(w: WorkerRecord) -> common_pb2.WorkerInfo:
    return common_pb2.WorkerInfo(**{f: getattr(w, f) for f in _WORKER_FIELDS},
                                 resources=w.resources, model_roots=w.model_roots,
                                 cached_models=w.cached_models,
                                 interfaces=[interface_to_pb(i) for i in w.interfaces])


def worker_from_pb(m: common_pb2.WorkerInfo) -> WorkerRecord:
    return WorkerRecord(**{f: getattr(m, f) for f in _WORKER_FIELDS}, resources=dict(m.resources),
                        model_roots=tuple(m.model_roots), cached_models=tuple(m.cached_models),
                        interfaces=[interface_from_pb(i) for i in m.interfaces])


def worker_from_bytes(data: bytes) -> WorkerRecord:
    """A serialized WorkerInfo (what a Ray rank actor describes itself with)."""
    return worker_from_pb(common_pb2.WorkerInfo.FromString(data))


def launch_to_bytes(launch: RankLaunch, coordinator: str, credential: Identity) -> bytes:
    """A serialized StartRankRequest (what the Ray backend hands a rank actor)."""
    return launch_to_pb(launch, coordinator, credential).SerializeToString()


def fetch_from_bytes(data: bytes) -> FetchProgress:
    """A serialized FetchProgress (what a Ray rank actor reports while it gets the model)."""
    return fetch_from_pb(common_pb2.FetchProgress.FromString(data))


def launch_to_pb(launch: RankLaunch, coordinator: str,
                 credential: Identity) -> worker_pb2.StartRankRequest:
    """What a worker needs to prepare and start one rank; ``coordinator``: where it reports and
    uploads; ``credential``: the rank's own certificate and key for its job attempt."""
    job = launch.job
    return worker_pb2.StartRankRequest(
        rank_cert_pem=credential.cert_pem, rank_key_pem=credential.key_pem,
        job_id=job.job_id, attempt=job.attempt, rank=launch.rank,
        world_size=len(launch.exchange_peers), config_yaml=config_to_yaml(job.config),
        coordinator=coordinator, ring_hosts=launch.ring_hosts,
        exchange_peers=launch.exchange_peers, resume_step=launch.resume_step,
        data_parallel=launch.data_parallel,
        stage_layers=[common_pb2.LayerRange(start=a, end=b) for a, b in launch.stage_layers],
        dataset=[digest_to_pb(d) for d in job.dataset], data_path=launch.data_path,
        ibv_devices_json=launch.ibv_devices_json, jaccl_coordinator=launch.jaccl_coordinator,
        model=model_source_to_pb(launch.model), neighbors_only=launch.neighbors_only,
        resume_adapter=digest_to_pb(job.resume_adapter) if job.resume_adapter else None,
    )
