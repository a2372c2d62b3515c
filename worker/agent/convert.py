"""proto <-> the agent's own types, once, for every message the agent sends or receives."""

from __future__ import annotations

from herd.config import config_from_yaml
from herd.digest import FileDigest
from herd.models.source import FetchProgress, ModelSource
from herd.netif import Interface
from herd.stage_cut import StagePiece
from protos.v1 import common_pb2, coordinator_pb2, worker_pb2
from worker.agent.domain import Progress, RankSpec
from worker.agent.machine import Machine


def spec_from_pb(m: worker_pb2.StartRankRequest) -> RankSpec:
    """A StartRank request as the agent's RankSpec; its config is parsed (and validated) here."""
    return RankSpec(
        job_id=m.job_id, attempt=m.attempt, rank=m.rank, world_size=m.world_size,
        config=config_from_yaml(m.config_yaml, f"job {m.job_id}"),
        dataset=[FileDigest(f.name, f.sha256, f.bytes) for f in m.dataset],
        coordinator=m.coordinator, ring_hosts=list(m.ring_hosts),
        exchange_peers=list(m.exchange_peers), resume_step=m.resume_step,
        stage_layers=tuple((r.start, r.end) for r in m.stage_layers),
        data_parallel=m.data_parallel or 1, data_path=m.data_path or "ring",
        ibv_devices_json=m.ibv_devices_json, jaccl_coordinator=m.jaccl_coordinator,
        rank_cert_pem=m.rank_cert_pem, rank_key_pem=m.rank_key_pem,
        model=ModelSource(digest=m.model.digest,
                          files=tuple(FileDigest(f.name, f.sha256, f.bytes) for f in m.model.files),
                          hub_repo=m.model.hub_repo, hub_revision=m.model.hub_revision),
        resume_adapter=FileDigest(m.resume_adapter.name, m.resume_adapter.sha256,
                                  m.resume_adapter.bytes)
        if m.HasField("resume_adapter") else None,
        neighbors_only=m.neighbors_only,
    )


def spec_from_bytes(data: bytes) -> RankSpec:
    """A serialized StartRankRequest (how the Ray backend hands a rank to its actor)."""
    return spec_from_pb(worker_pb2.StartRankRequest.FromString(data))


def fetch_to_pb(f: FetchProgress) -> common_pb2.FetchProgress:
    return common_pb2.FetchProgress(
        rank=f.rank, worker_id=f.worker_id, source=f.source, files=f.files,
        bytes_needed=f.bytes_needed, bytes_cached=f.bytes_cached,
        bytes_received=f.bytes_received, bytes_per_second=f.bytes_per_second, done=f.done)


def worker_info(worker_id: str, host: str, port: int, ring_port: int, exchange_port: int,
                machine: Machine, free_memory_bytes: int, protocol_version: int,
                running_job_id: str, interfaces: list[Interface] = (),
                model_roots: tuple[str, ...] = (), allow_remote_code: bool = False,
                cached_models: list[str] = ()) -> common_pb2.WorkerInfo:
    return common_pb2.WorkerInfo(
        worker_id=worker_id, host=host, port=port, ring_port=ring_port,
        exchange_port=exchange_port, protocol_version=protocol_version,
        memory_bytes=machine.memory_bytes, free_memory_bytes=free_memory_bytes,
        chip=machine.chip, gpu_cores=machine.gpu_cores, os=machine.os,
        mlx_version=machine.mlx_version, wired_limit_mb=machine.wired_limit_mb,
        running_job_id=running_job_id, model_roots=model_roots,
        allow_remote_code=allow_remote_code, cached_models=cached_models,
        interfaces=[common_pb2.NetInterface(name=i.name, kind=i.kind, addresses=i.addresses,
                                            speed_mbps=i.speed_mbps, rdma_device=i.rdma_device,
                                            data=i.data) for i in interfaces],
    )


def running_rank_to_pb(spec: RankSpec, pid: int) -> worker_pb2.RunningRank:
    return worker_pb2.RunningRank(job_id=spec.job_id, attempt=spec.attempt, rank=spec.rank,
                                  pid=pid)


def stage_to_pb(p: StagePiece) -> common_pb2.StagePiece:
    return common_pb2.StagePiece(index=p.index, count=p.count,
                                 layers=common_pb2.LayerRange(start=p.start, end=p.end))


def stage_from_pb(m: common_pb2.StagePiece) -> StagePiece:
    return StagePiece(index=m.index, count=m.count, start=m.layers.start, end=m.layers.end)


def checkpoint_header(job_id: str, attempt: int, step: int, files: list[FileDigest],
                      stage: StagePiece | None) -> coordinator_pb2.CheckpointHeader:
    header = coordinator_pb2.CheckpointHeader(
        job_id=job_id, attempt=attempt, step=step,
        files=[common_pb2.FileDigest(name=f.name, sha256=f.sha256, bytes=f.bytes) for f in files])
    if stage is not None:
        header.stage.CopyFrom(stage_to_pb(stage))
    return header


def _report(spec: RankSpec, worker_id: str, **kw) -> coordinator_pb2.ReportRankRequest:
    return coordinator_pb2.ReportRankRequest(job_id=spec.job_id, attempt=spec.attempt,
                                             rank=spec.rank, worker_id=worker_id, **kw)


def progress_report(spec: RankSpec, worker_id: str, p: Progress,
                    validation: bool = False) -> coordinator_pb2.ReportRankRequest:
    return _report(spec, worker_id, progress=common_pb2.RankProgress(
        rank=spec.rank, worker_id=worker_id, iteration=p.iteration, train_loss=p.train_loss,
        val_loss=p.val_loss, learning_rate=p.learning_rate,
        tokens_per_second=p.tokens_per_second, trained_tokens=p.trained_tokens,
        peak_memory_gb=p.peak_memory_gb, exchange=p.exchange, world_size=p.world_size,
        window_iterations=p.window_iterations, window_seconds=p.window_seconds,
        window_exchange_seconds=p.window_exchange_seconds,
        window_exchange_bytes=p.window_exchange_bytes, validation=validation, share=p.share,
        items_per_second=p.items_per_second))


def rank_log_report(spec: RankSpec, worker_id: str, offset: int,
                    data: bytes) -> coordinator_pb2.ReportRankRequest:
    return _report(spec, worker_id, rank_log=coordinator_pb2.RankLog(offset=offset, data=data))


def log_report(spec: RankSpec, worker_id: str, line: str) -> coordinator_pb2.ReportRankRequest:
    return _report(spec, worker_id, log=line)


def exit_report(spec: RankSpec, worker_id: str, code: int,
                error: str) -> coordinator_pb2.ReportRankRequest:
    return _report(spec, worker_id, exit=coordinator_pb2.RankExit(exit_code=code, error=error))
