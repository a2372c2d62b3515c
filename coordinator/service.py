"""CoordinatorService: thin handlers. Each converts the request once (coordinator/convert.py),
calls a domain object, converts the reply; herd errors become status codes in herd/rpc/status.py.

``RULES`` says which role may call which rpc (herd/rpc/auth.py enforces it before a handler runs);
a worker's calls are further held to the jobs it runs here (``_workers_job``).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Iterator

import grpc

from coordinator import convert, housekeeping
from coordinator.artifacts import AdapterStore, BlobStore
from coordinator.blob_access import check_upload_size, check_uploader, check_worker_may_read
from coordinator.domain import Job
from coordinator.jobs import new_job, no_checkpoint, start_from
from coordinator.logs import LogStore
from coordinator.models import ModelCatalog, ModelStore, fetch_hub_model
from coordinator.registry import Registry
from coordinator.reports import adapter_with_report
from coordinator.scheduler import Scheduler
from herd import log
from herd.errors import (
    AuthError,
    ConfigError,
    NotFoundError,
    ProtocolError,
    StorageError,
)
from herd.models import ref as refs
from herd.rpc import auth
from herd.rpc.names import check_job_id, check_name, check_sha, check_step
from herd.rpc.status import handlers
from protos.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc

logger = log.get(__name__)

SERVICE = coordinator_pb2.DESCRIPTOR.services_by_name["CoordinatorService"].full_name
CLIENT, WORKER = "client", "worker"
RULES = auth.rules(SERVICE, {
    # the laptop's CLI (and whoever holds a client certificate)
    "SubmitJob": CLIENT, "GetJob": CLIENT, "ListJobs": CLIENT, "WatchJob": CLIENT,
    "CancelJob": CLIENT, "ListWorkers": CLIENT, "PutBlob": CLIENT, "MissingBlobs": CLIENT,
    "GetJobLog": CLIENT, "DeleteJob": CLIENT,
    # the model store: what `herd models` lists, adds (files already PutBlob'd, or a hub id the
    # coordinator fetches) and removes
    "AddModel": CLIENT, "ListModels": CLIENT, "RemoveModel": CLIENT,
    # worker agents, each only for the jobs it runs (_workers_job, blob_access.py)
    "GetBlob": WORKER, "ReportRank": WORKER, "PutCheckpoint": WORKER,
    "GetAdapter": (CLIENT, WORKER),
}, sizes={"SubmitJob": 1024 * 1024, "MissingBlobs": 1024 * 1024, "AddModel": 1024 * 1024})


_unary, _stream = handlers("the coordinator", lambda servicer: servicer.adapters.root.parent)


FINAL_EVENT_GRACE_S = 5  # WatchJob: how long a final job's stream waits for its final event


def _caller(context) -> str:
    """Who called, for the job's events (a laptop's client/NAME): with several users on one
    cluster nothing said whose job was whose, or who cancelled it (an outside run)."""
    peer = auth.peer_of(context)
    return peer.label if peer else "the user"


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServiceServicer):
    def __init__(self, scheduler: Scheduler, registry: Registry, blobs: BlobStore,
                 adapters: AdapterStore, models: ModelCatalog | None = None,
                 logs: LogStore | None = None, keep_checkpoints: int = 0,
                 on_deleted: Callable[[str], None] = lambda job_id: None):
        self.scheduler, self.registry = scheduler, registry
        self.on_deleted = on_deleted  # a removed job leaves the dashboard and /metrics too
        self.keep_checkpoints = keep_checkpoints  # per job, newest kept; 0 = all
        self.store = scheduler.store
        self.blobs, self.adapters = blobs, adapters
        self.models = models or ModelCatalog(ModelStore(blobs.root.parent / "models", blobs))
        # Ranks' relayed output; by default beside the adapters, in the state dir.
        self.logs = logs or LogStore(adapters.root.parent / "logs")

    # --- jobs ------------------------------------------------------------------------------

    def _job_from_spec(self, spec) -> Job:
        job = new_job(spec.name, spec.config_yaml,
                      [convert.digest_from_pb(f) for f in spec.dataset], self.blobs,
                      self.models, spec.model_digest,
                      convert.digest_from_pb(spec.resume_adapter)
                      if spec.HasField("resume_adapter") else None, spec.model_config_json)
        housekeeping.require_checkpoint_room(self.adapters.root, job, self.keep_checkpoints,
                                             self.store, self.models.config)
        return job

    def _workers_job(self, context, job_id: str, attempt: int | None = None) -> Job | None:
        """For a worker's call, the job it names, which must be active with the caller among its
        current attempt's workers (and ``attempt`` that attempt, when given); None for a client's
        call."""
        peer = auth.peer_of(context)
        if peer is None or peer.role != WORKER:
            return None
        job = self.store.get_job(check_job_id(job_id))
        if not job.state.active or peer.name not in job.worker_ids:
            raise AuthError(f"worker {peer.name} runs no rank of job {job_id}")
        if attempt is not None and attempt != job.attempt:
            raise AuthError(f"attempt {attempt} of job {job_id} is not running",
                            hint=f"attempt {job.attempt} is")
        return job

    @_unary
    def SubmitJob(self, request, context):
        job, ref = self._job_from_spec(request.spec), request.spec.resume_from
        # --resume-from: the other job's checkpoint becomes this one's, stored before it queues
        start = ref and start_from(job, ref, self.store, self.adapters, self.scheduler.now_ms())
        try:
            if start:
                self.store.add_checkpoint(start)
            job = self.scheduler.submit(job, by=_caller(context))
        except BaseException:
            if start:  # refused (no backend, cannot fit): leave nothing of it behind
                self.store.delete_checkpoint(job.job_id, start.step)
                self.adapters.remove_job(job.job_id)
            raise
        warning = housekeeping.wait_warning(job, len(self.scheduler.backend(job).workers()),
                                            self.scheduler.placement_timeout_s,
                                            {name: len(b.workers()) for name, b
                                             in self.scheduler.backends.items()})
        return coordinator_pb2.SubmitJobReply(job_id=job.job_id, warning=warning)

    def _status(self, job: Job):
        return convert.job_to_pb(job, self.store.shown_progress(job.job_id, job.attempt),
                                 self.store.checkpoints(job.job_id))

    @_unary
    def GetJob(self, request, context):
        return coordinator_pb2.GetJobReply(job=self._status(self.store.get_job(request.job_id)))

    @_unary
    def ListJobs(self, request, context):
        return coordinator_pb2.ListJobsReply(jobs=[self._status(j) for j in self.store.list_jobs()],
                                             coordinator_health=self.scheduler.health)

    @_stream
    def WatchJob(self, request, context) -> Iterator:
        after, final_sent, give_up, said = request.after_seq, False, None, ""
        self.store.get_job(request.job_id)  # NOT_FOUND before the stream starts
        while context.is_active():
            if (health := self.scheduler.health) != said:  # (it cannot be a stored event)
                said = health
                yield convert.health_event_pb(request.job_id, after, health)
            events = self.store.events(request.job_id, after)
            for e in events:
                yield convert.event_to_pb(e)
                after = e.seq
                final_sent = final_sent or (e.state is not None and e.state.final)
            if not events:
                # A final state is stored just before its event: end once it went out, or later.
                if self.store.get_job(request.job_id).state.final:
                    give_up = give_up or time.monotonic() + FINAL_EVENT_GRACE_S
                    if final_sent or time.monotonic() > give_up:
                        return
                self.scheduler.wait_for_events(1.0)

    @_unary
    def CancelJob(self, request, context):
        state = self.scheduler.cancel(request.job_id, by=_caller(context))
        return coordinator_pb2.CancelJobReply(state=convert.state_to_pb(state))

    @_unary
    def DeleteJob(self, request, context):
        job = housekeeping.delete_ended_job(self.store, check_job_id(request.job_id))
        self.adapters.remove_job(job.job_id)
        self.logs.remove(job.job_id)
        housekeeping.remove_unused(job.blobs(), self.store, self.models.store, self.blobs)
        self.on_deleted(job.job_id)
        return coordinator_pb2.DeleteJobReply()

    @_unary
    def GetJobLog(self, request, context):
        job = self.store.get_job(check_job_id(request.job_id))
        attempt = request.attempt or job.attempt
        if request.attempt > job.attempt:
            raise NotFoundError(f"job {job.job_id} has no attempt {request.attempt}",
                                hint=f"it has made {job.attempt}" if job.attempt else None)
        ranks = next((len(ids) for a, ids, _ in self.store.attempts(job.job_id) if a == attempt),
                     0)
        if not 0 <= request.rank < max(ranks, 1):
            raise NotFoundError(
                f"job {job.job_id} has no rank {request.rank} in attempt {attempt}"
                + (f" (ranks 0-{ranks - 1})" if ranks else " (it has not been placed yet)"))
        data = (self.logs.read(job.job_id, attempt, request.rank, request.offset,
                               request.max_bytes) if ranks else b"")
        return coordinator_pb2.GetJobLogReply(data=data, next_offset=request.offset + len(data),
                                              attempt=attempt, ranks=ranks)

    @_unary
    def ListWorkers(self, request, context):
        return coordinator_pb2.ListWorkersReply(
            workers=[convert.worker_to_pb(w) for w in self.scheduler.workers()],
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

        size = self.blobs.put(first.sha256, chunks(), first.offset, first.size)
        return coordinator_pb2.PutBlobReply(sha256=first.sha256, bytes=size)

    @_stream
    def GetBlob(self, request, context):
        peer = auth.peer_of(context)
        if peer is not None and peer.role == WORKER:
            check_worker_may_read(self.store.list_jobs(), self.models.store, peer.name,
                                  check_sha(request.sha256))
        for block in self.blobs.read(request.sha256, request.offset):
            yield common_pb2.FileChunk(data=block)

    @_unary
    def MissingBlobs(self, request, context):
        # (one it holds is touched: about to be used again, it is not an orphan to sweep)
        missing = [sha for sha in request.sha256 if not self.blobs.touch(check_sha(sha))]
        return coordinator_pb2.MissingBlobsReply(
            sha256=missing, held=[self.blobs.held(sha) for sha in missing])

    # --- models ----------------------------------------------------------------------------

    def _model_info(self, model, jobs: list[Job] = ()) -> common_pb2.ModelInfo:
        return convert.model_to_pb(model, [j.job_id for j in jobs
                                           if j.model_digest == model.digest])

    @_stream
    def AddModel(self, request, context):
        store, now = self.models.store, self.scheduler.now_ms()
        if not request.hub_ref:
            files = [convert.digest_from_pb(f) for f in request.files]
            model = store.add(files, request.name or "model", now)
            yield coordinator_pb2.AddModelProgress(phase="import", model=self._model_info(model))
            return
        ref = refs.parse(request.hub_ref)
        if ref.is_local:
            raise ConfigError(f"{request.hub_ref!r} is a path: the coordinator fetches hub ids",
                              hint="the CLI uploads a folder's files itself")
        for phase, done, total, model in fetch_hub_model(store, refs.resolve(ref), now,
                                                         context.is_active):
            yield coordinator_pb2.AddModelProgress(
                phase=phase, bytes_done=done, bytes_total=total,
                model=self._model_info(model) if model else None)

    @_unary
    def ListModels(self, request, context):
        jobs = self.store.list_jobs()
        return coordinator_pb2.ListModelsReply(
            models=[self._model_info(m, jobs) for m in self.models.store.list()])

    @_unary
    def RemoveModel(self, request, context):
        model, freed, still = self.models.remove(request.model, self.store.list_jobs())
        logger.info("model_removed", digest=model.digest, names=model.names, freed_bytes=freed)
        return coordinator_pb2.RemoveModelReply(model=self._model_info(model), freed_bytes=freed,
                                                still_named=still)

    # --- ranks -----------------------------------------------------------------------------

    @_unary
    def ReportRank(self, request, context):
        peer = auth.peer_of(context)
        if peer is None or request.worker_id != peer.name:
            raise AuthError(f"{peer.label if peer else 'the caller'} may only report its own "
                            f"ranks, not worker {request.worker_id[:80]!r}'s")
        job = self.store.get_job(check_job_id(request.job_id))
        kind = request.WhichOneof("report")
        # Only the worker that ran that rank of that attempt (ranks are in worker_ids order).
        ran = (job.worker_ids if request.attempt == job.attempt else
               next((ids for a, ids, _ in self.store.attempts(job.job_id)
                     if a == request.attempt), []))
        if not 0 <= request.rank < len(ran) or ran[request.rank] != peer.name:
            if kind == "rank_log":
                raise AuthError(f"worker {peer.name} ran no rank {request.rank} of attempt "
                                f"{request.attempt} of job {job.job_id}")
            return coordinator_pb2.ReportRankReply(stop=True)  # not a rank of this job (now)
        s = self.scheduler
        if kind == "progress":
            stop = s.on_progress(request.job_id, request.attempt, convert.progress_from_pb(
                request.progress, rank=request.rank, worker_id=peer.name))  # (as checked above)
        elif kind == "log":
            stop = s.on_log(request.job_id, request.attempt, request.log)
        elif kind == "rank_log":  # kept whatever the job's state: a stopped rank's last words
            self.logs.write(request.job_id, request.attempt, request.rank,
                            request.rank_log.offset, request.rank_log.data)
            stop = False
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
        # Only a running attempt of the job, from one of its workers, at a step the job can reach.
        job = self._workers_job(context, h.job_id, h.attempt)
        if job is None:
            raise AuthError("only a worker running the job uploads its checkpoints")
        check_step(h.step, job.iters)
        check_uploader(job, auth.peer_of(context).name, self.store.attempt_history(h.job_id),
                       convert.stage_from_pb(h.stage) if h.HasField("stage") else None)
        files = [convert.digest_from_pb(f) for f in h.files]
        for f in files:
            check_name(f.name, "checkpoint")
        check_upload_size(job, sum(f.bytes for f in files), self.models.config(job))
        chunks = ((m.chunk.name, m.chunk.data) for m in request_iterator
                  if m.WhichOneof("part") == "chunk")
        now = self.scheduler.now_ms()
        try:
            if h.HasField("stage"):
                piece = convert.stage_from_pb(h.stage)
                checkpoint = self.adapters.receive_piece(h.job_id, h.step, piece, files, chunks,
                                                         now)
                logger.info("stage_piece_stored", job_id=h.job_id, step=h.step,
                            stage=piece.index, stages=piece.count, merged=checkpoint is not None)
                if checkpoint is None:  # the step's adapter waits for the other stages' pieces
                    return coordinator_pb2.PutCheckpointReply()
            else:
                checkpoint = self.adapters.receive(h.job_id, h.step, files, chunks, now)
        except StorageError as e:
            # The job fails with the reason now; it never ends SUCCEEDED without its adapter.
            logger.error("checkpoint_not_stored", job_id=h.job_id, step=h.step, error=e.message)
            self.scheduler.on_storage_failed(h.job_id, h.step, e.message)
            raise
        try:
            self.scheduler.on_checkpoint(checkpoint)
        except NotFoundError:  # `herd rm` while it was sent: its files, never listed, go too
            self.adapters.remove_job(h.job_id)
            raise
        for step in housekeeping.expired_checkpoints(self.store, h.job_id, self.keep_checkpoints):
            self.adapters.remove_step(h.job_id, step)
        logger.info("checkpoint_stored", job_id=h.job_id, step=h.step,
                    bytes=sum(f.bytes for f in checkpoint.files))
        return coordinator_pb2.PutCheckpointReply(checkpoint=convert.checkpoint_to_pb(checkpoint))

    @_stream
    def GetAdapter(self, request, context):
        self._workers_job(context, request.job_id)  # a worker: only a job it runs
        job = self.store.get_job(request.job_id)  # NOT_FOUND for an unknown job
        checkpoints = self.store.checkpoints(request.job_id)
        if request.step:
            checkpoints = [c for c in checkpoints if c.step == request.step]
        if not checkpoints:
            have = [c.step for c in self.store.checkpoints(request.job_id)]
            raise no_checkpoint(job, request.step, have)
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
        # The adapter, then its metrics.jsonl and loss curve (coordinator/reports.py).
        files, chunks = adapter_with_report(self.store, self.adapters, c)
        yield coordinator_pb2.GetAdapterReply(
            header=convert.checkpoint_to_pb(dataclasses.replace(c, files=files)))
        for name, block in chunks:
            yield coordinator_pb2.GetAdapterReply(chunk=common_pb2.FileChunk(name=name, data=block))


def add_to_server(servicer: CoordinatorServicer, server: grpc.Server) -> None:
    coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server(servicer, server)
