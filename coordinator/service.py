"""CoordinatorService: thin handlers. Each converts the request once (coordinator/convert.py),
calls a domain object, converts the reply; herd errors become status codes in herd/rpc/status.py.
"""

from __future__ import annotations

import functools
import re
import uuid
from typing import Iterator

import grpc

from coordinator import convert
from coordinator.artifacts import AdapterStore, BlobStore
from coordinator.domain import Job
from coordinator.placement import workers_needed
from coordinator.registry import Registry
from coordinator.scheduler import Scheduler
from herd import log
from herd.config import config_from_yaml
from herd.errors import DatasetError, HerdError, NotFoundError, ProtocolError
from herd.rpc.files import check_name
from herd.rpc.status import abort
from protos.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc

logger = log.get(__name__)
REQUIRED_DATA = "train.jsonl"


def _unary(fn):
    @functools.wraps(fn)
    def wrapper(self, request, context):
        try:
            return fn(self, request, context)
        except HerdError as e:
            logger.info("rpc_refused", rpc=fn.__name__, error=e.message)
            abort(context, e)

    return wrapper


def _stream(fn):
    @functools.wraps(fn)
    def wrapper(self, request, context):
        try:
            yield from fn(self, request, context)
        except HerdError as e:
            logger.info("rpc_refused", rpc=fn.__name__, error=e.message)
            abort(context, e)

    return wrapper


def job_name(raw: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", raw).strip("-")[:40] or "job"


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServiceServicer):
    def __init__(self, scheduler: Scheduler, registry: Registry, blobs: BlobStore,
                 adapters: AdapterStore):
        self.scheduler, self.registry = scheduler, registry
        self.store = scheduler.store
        self.blobs, self.adapters = blobs, adapters

    # --- jobs ------------------------------------------------------------------------------

    def _job_from_spec(self, spec) -> Job:
        cfg = config_from_yaml(spec.config_yaml, spec.name or "<submitted config>")
        dataset = [convert.digest_from_pb(f) for f in spec.dataset]
        names = [check_name(d.name) for d in dataset]
        if REQUIRED_DATA not in names:
            raise DatasetError(f"the dataset has no {REQUIRED_DATA}",
                               hint="a dataset folder holds train.jsonl (and valid.jsonl)")
        missing = [d.name for d in dataset if not self.blobs.has(d.sha256)]
        if missing:
            raise DatasetError(f"dataset files not uploaded: {', '.join(missing)}",
                               hint="`herd submit` uploads them before submitting")
        name = job_name(spec.name)
        return Job(job_id=f"{name}-{uuid.uuid4().hex[:6]}", name=name,
                   config=cfg, dataset=dataset,
                   workers_needed=workers_needed(cfg), iters=cfg.iters)

    @_unary
    def SubmitJob(self, request, context):
        job = self.scheduler.submit(self._job_from_spec(request.spec))
        return coordinator_pb2.SubmitJobReply(job_id=job.job_id)

    def _status(self, job: Job):
        return convert.job_to_pb(job, self.store.latest_progress(job.job_id),
                                 self.store.checkpoints(job.job_id))

    @_unary
    def GetJob(self, request, context):
        return coordinator_pb2.GetJobReply(job=self._status(self.store.get_job(request.job_id)))

    @_unary
    def ListJobs(self, request, context):
        return coordinator_pb2.ListJobsReply(jobs=[self._status(j) for j in self.store.list_jobs()])

    @_stream
    def WatchJob(self, request, context) -> Iterator:
        after = request.after_seq
        self.store.get_job(request.job_id)  # NOT_FOUND before the stream starts
        while context.is_active():
            events = self.store.events(request.job_id, after)
            for e in events:
                yield convert.event_to_pb(e)
                after = e.seq
            if not events:
                if self.store.get_job(request.job_id).state.final:
                    if not self.store.events(request.job_id, after):
                        return
                    continue
                self.scheduler.wait_for_events(1.0)

    @_unary
    def CancelJob(self, request, context):
        state = self.scheduler.cancel(request.job_id)
        return coordinator_pb2.CancelJobReply(state=convert.state_to_pb(state))

    @_unary
    def ListWorkers(self, request, context):
        return coordinator_pb2.ListWorkersReply(
            workers=[convert.worker_to_pb(w) for w in self.registry.workers()],
            refused=[coordinator_pb2.RefusedWorker(source=s, target=r.target, kind=r.kind,
                                                   reason=r.reason)
                     for s, r in sorted(self.registry.refusals().items())])

    # --- blobs -----------------------------------------------------------------------------

    @_unary
    def PutBlob(self, request_iterator, context):
        first = next(request_iterator, None)
        if first is None or not first.sha256:
            raise ProtocolError("PutBlob: the first message must name the sha256")

        def chunks():
            yield first.data
            for m in request_iterator:
                yield m.data

        size = self.blobs.put(first.sha256, chunks())
        return coordinator_pb2.PutBlobReply(sha256=first.sha256, bytes=size)

    @_stream
    def GetBlob(self, request, context):
        for block in self.blobs.read(request.sha256):
            yield common_pb2.FileChunk(data=block)

    # --- ranks -----------------------------------------------------------------------------

    @_unary
    def ReportRank(self, request, context):
        kind = request.WhichOneof("report")
        s = self.scheduler
        if kind == "progress":
            stop = s.on_progress(request.job_id, request.attempt,
                                 convert.progress_from_pb(request.progress))
        elif kind == "log":
            stop = s.on_log(request.job_id, request.attempt, request.log)
        elif kind == "exit":
            s.on_exit(request.job_id, request.attempt, request.rank, request.worker_id,
                      request.exit.exit_code, request.exit.error)
            stop = True
        else:
            raise ProtocolError("ReportRank without a report")
        return coordinator_pb2.ReportRankReply(stop=stop)

    @_unary
    def PutCheckpoint(self, request_iterator, context):
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("part") != "header":
            raise ProtocolError("PutCheckpoint: the first message must be the header")
        h = first.header
        self.store.get_job(h.job_id)
        files = [convert.digest_from_pb(f) for f in h.files]
        chunks = ((m.chunk.name, m.chunk.data) for m in request_iterator
                  if m.WhichOneof("part") == "chunk")
        now = self.scheduler.now_ms()
        if h.HasField("stage"):
            piece = convert.stage_from_pb(h.stage)
            checkpoint = self.adapters.receive_piece(h.job_id, h.step, piece, files, chunks, now)
            logger.info("stage_piece_stored", job_id=h.job_id, step=h.step, stage=piece.index,
                        stages=piece.count, merged=checkpoint is not None)
            if checkpoint is None:  # the step's adapter waits for the other stages' pieces
                return coordinator_pb2.PutCheckpointReply()
        else:
            checkpoint = self.adapters.receive(h.job_id, h.step, files, chunks, now)
        self.scheduler.on_checkpoint(checkpoint)
        logger.info("checkpoint_stored", job_id=h.job_id, step=h.step,
                    bytes=sum(f.bytes for f in checkpoint.files))
        return coordinator_pb2.PutCheckpointReply(checkpoint=convert.checkpoint_to_pb(checkpoint))

    @_stream
    def GetAdapter(self, request, context):
        self.store.get_job(request.job_id)  # NOT_FOUND for an unknown job
        checkpoints = self.store.checkpoints(request.job_id)
        if request.step:
            checkpoints = [c for c in checkpoints if c.step == request.step]
        if not checkpoints:
            have = [c.step for c in self.store.checkpoints(request.job_id)]
            raise NotFoundError(
                f"job {request.job_id} has no checkpoint"
                + (f" at step {request.step}" if request.step else ""),
                hint=f"stored steps: {have}" if have else "it has not saved one yet")
        c = checkpoints[-1]
        if request.HasField("stage"):
            # A pipeline stage resuming: its own piece (stage-local names, optimizer state).
            piece, c = self.adapters.piece(request.job_id, c.step, request.stage.index)
            header = convert.checkpoint_to_pb(c)
            header.stage.CopyFrom(convert.stage_to_pb(piece))
            yield coordinator_pb2.GetAdapterReply(header=header)
            for name, block in self.adapters.piece_files(request.job_id, c.step, piece.index):
                yield coordinator_pb2.GetAdapterReply(
                    chunk=common_pb2.FileChunk(name=name, data=block))
            return
        yield coordinator_pb2.GetAdapterReply(header=convert.checkpoint_to_pb(c))
        for name, block in self.adapters.files(c):
            yield coordinator_pb2.GetAdapterReply(chunk=common_pb2.FileChunk(name=name, data=block))


def add_to_server(servicer: CoordinatorServicer, server: grpc.Server) -> None:
    coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server(servicer, server)
