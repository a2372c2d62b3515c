"""Getting one rank's model onto this worker, before any rank of the job starts.

From the coordinator's model store: only the files the rank needs (a pipeline stage: the shards
holding its blocks, read from the index's weight map, plus config and tokenizer; a data-parallel
rank: all), skipping those already cached and intact, several at once, each resumable
(herd/rpc/files.py ``receive_resumable``). Or straight from the hub, through huggingface_hub (its
cache, its offline mode). Or a folder the job names, which must exist here. The disk is checked
before any file moves.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import replace
from pathlib import Path
from typing import Callable

from herd import log
from herd.digest import FileDigest
from herd.errors import ChecksumError, HerdError, PlacementError
from herd.models import ref as refs
from herd.models.manifest import needed_files, stage_shards, tied_embeddings
from herd.models.source import FetchProgress
from herd.rpc.files import receive_resumable
from herd.stage_cut import StagePiece
from worker.agent.coordinator_client import CoordinatorClient
from worker.agent.domain import RankSpec
from worker.agent.model_cache import ModelCache
from worker.pipeline.topology import Topology

logger = log.get(__name__)
# Files fetched at once: enough to keep a LAN link busy while one stream waits on the disk.
FETCH_STREAMS = 4
# Small files read whole into memory (config.json, the index) to decide what to fetch.
SMALL_FILE_BYTES = 64 * 1024 * 1024


class Meter:
    """Bytes received by several fetch threads, and the rate since the first one began."""

    def __init__(self):
        self._lock = threading.Lock()
        self.bytes = 0
        self._t0: float | None = None

    def add(self, n: int) -> None:
        with self._lock:
            if self._t0 is None:
                self._t0 = time.monotonic()
            self.bytes += n

    def rate(self) -> float:
        with self._lock:
            elapsed = time.monotonic() - self._t0 if self._t0 is not None else 0.0
            return self.bytes / elapsed if elapsed > 0 else 0.0


def stage_of(spec: RankSpec) -> StagePiece | None:
    """The pipeline stage this rank runs (None: it holds the whole model)."""
    if not spec.pipelined:
        return None
    topo = Topology.of(spec.rank, spec.world_size, spec.data_parallel)
    start, end = spec.stage_layers[topo.stage]
    return StagePiece(topo.stage, topo.stages, start, end)


def fetch_file(client: CoordinatorClient, f: FileDigest, cache: ModelCache,
               on_bytes: Callable[[int], None] | None = None,
               stop: Callable[[], bool] | None = None) -> int:
    """One stored file into the cache, resuming its partial bytes; returns the bytes received."""
    return receive_resumable(lambda offset: client.blob_chunks(f.sha256, offset), f.sha256,
                             f.bytes, cache.part(f.sha256), cache.blob(f.sha256), f.name,
                             on_bytes=on_bytes, stop=stop)


def _read_small(client: CoordinatorClient, cache: ModelCache, f: FileDigest) -> bytes:
    """A small file's bytes: from the cache when held and intact, else from the coordinator,
    in memory only (deciding what to fetch transfers nothing into the cache)."""
    held, _ = cache.check([f])
    if held:
        return cache.blob(f.sha256).read_bytes()
    if f.bytes > SMALL_FILE_BYTES:
        raise ChecksumError(f"{f.name} is {f.bytes:,} bytes: not a config file")
    return client.read_blob(f.sha256, f.bytes)


class Preparation:
    """One rank's model being made ready here, in its own thread; ``status()`` any time."""

    def __init__(self, spec: RankSpec, cache: ModelCache, client: CoordinatorClient,
                 folder: Path, worker_id: str, after: list[Preparation] = ()):
        self.spec, self.cache, self.client, self.folder = spec, cache, client, folder
        self._status = FetchProgress(rank=spec.rank, worker_id=worker_id)
        self.meter = Meter()
        self._stop = threading.Event()
        self._done = threading.Event()
        self.model_dir: Path | None = None
        self.error: HerdError | None = None
        self.log = logger.bind(job_id=spec.job_id, rank=spec.rank, attempt=spec.attempt)
        self._after = list(after)  # cancelled ones still writing: waited for first
        threading.Thread(target=self._run, daemon=True, name=f"prepare-{spec.job_id}").start()

    def status(self) -> FetchProgress:
        return replace(self._status, bytes_received=self.meter.bytes,
                       bytes_per_second=self.meter.rate(), done=self._done.is_set()
                       and self.error is None)

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def cancel(self) -> None:
        self._stop.set()

    @property
    def cancelled(self) -> bool:
        return self._stop.is_set()

    @property
    def failed(self) -> bool:
        return self._done.is_set() and self.error is not None

    def result(self) -> Path:
        self._done.wait()
        if self.error is not None:
            raise self.error
        return self.model_dir

    def _run(self) -> None:
        for earlier in self._after:
            earlier.wait()
        t0 = time.monotonic()
        try:
            model = self.spec.model
            if model.digest:
                self.model_dir = self._from_store()
            elif model.hub_repo:
                self.model_dir = self._from_hub()
            else:
                self.model_dir = self._local()
            self.log.info("model_ready", source=self._status.source, folder=str(self.model_dir),
                          received=self.meter.bytes, cached=self._status.bytes_cached,
                          seconds=round(time.monotonic() - t0, 2))
        except HerdError as e:
            self.error = e
            self.log.warning("model_prepare_failed", error=e.message)
        except Exception as e:  # a bug must still end the call with a reason, not hang it
            self.error = HerdError(f"preparing the model failed: {type(e).__name__}: {e}")
            self.log.exception("model_prepare_crashed")
        finally:
            self.client.close()
            self._done.set()

    def _local(self) -> Path:
        self._status.source = "local"
        model = self.spec.config.model
        path = Path(model).expanduser()
        if model.startswith(("/", "./", "~")) and not path.exists():
            raise PlacementError(
                f"model path {model} does not exist on worker {self._status.worker_id}",
                hint="copy the model folder to the same path on every worker, or `herd models "
                "add` it so workers fetch it")
        return path if path.exists() else Path(model)

    def _from_store(self) -> Path:
        self._status.source = "store"
        by_name = {f.name: f for f in self.spec.model.files}
        config = json.loads(_read_small(self.client, self.cache, by_name[refs.CONFIG]))
        index = (json.loads(_read_small(self.client, self.cache, by_name[refs.INDEX]))
                 if refs.INDEX in by_name else None)
        files = [by_name[n] for n in needed_files(by_name, config, index, stage_of(self.spec))]
        shas = {f.sha256 for f in files}
        self._status.files, self._status.bytes_needed = len(files), sum(f.bytes for f in files)
        self.cache.pin(self.spec.key, shas)
        held, missing = self.cache.check(files)
        todo = list({f.sha256: f for f in missing}.values())  # one transfer per content
        # Here already: whole files, the partial bytes a transfer resumes from, and a second
        # name of the same content (so that needed = cached + received once it is done: the
        # resumed bytes were counted nowhere, an outside run).
        self._status.bytes_cached = (
            sum(f.bytes for f in held) + sum(self.cache.part_bytes(f.sha256) for f in todo)
            + sum(f.bytes for f in missing) - sum(f.bytes for f in todo))
        self.cache.reserve(sum(f.bytes - self.cache.part_bytes(f.sha256) for f in todo), shas)
        todo.sort(key=lambda f: -f.bytes)
        with ThreadPoolExecutor(FETCH_STREAMS, thread_name_prefix="fetch") as pool:
            futures = [pool.submit(fetch_file, self.client, f, self.cache, self.meter.add,
                                   self._stop.is_set) for f in todo]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            if any(f.exception() for f in done):
                self._stop.set()  # the others stop too, keeping their partial files
            for f in futures:
                f.result()
        self.cache.touch(shas)
        if stage_of(self.spec) is None and self.spec.model.digest:  # the whole model is here
            self.cache.note_whole(self.spec.model.digest, shas)
        return self.cache.view(self.folder, files)

    def _from_hub(self) -> Path:
        """Straight from the hub into the hub cache: for a pipeline stage only its shards."""
        from huggingface_hub import constants

        self._status.source = "hub"
        repo, commit = self.spec.model.hub_repo, self.spec.model.hub_revision or None
        hub = refs.resolve(refs.ModelRef(f"{repo}@{commit}", repo_id=repo, revision=commit))
        piece = stage_of(self.spec)
        patterns = refs.MODEL_PATTERNS
        if piece is not None and hub.index is not None:
            shards = stage_shards(hub.index, piece, tied_embeddings(hub.config))
            patterns = [p for p in patterns if not p.endswith(".safetensors")] + shards
        need = refs.download_bytes(repo, hub.commit, patterns)
        cache_dir = Path(constants.HF_HUB_CACHE)
        cache_dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(cache_dir).free
        if need > free:
            raise PlacementError(
                f"worker {self._status.worker_id} cannot hold the model: downloading it needs "
                f"{need:,} bytes on {cache_dir}; the disk has {free:,} bytes free",
                hint="free disk space on that worker (or point HF_HOME at a larger disk)")
        self._status.bytes_needed = need
        folder = refs.snapshot(repo, hub.commit, patterns,
                               tqdm_class=refs.hub_progress(self.meter.add))
        self._status.files = sum(1 for p in folder.iterdir() if p.is_file())
        self._status.bytes_needed = sum(p.stat().st_size for p in folder.iterdir()
                                        if p.is_file())
        self._status.bytes_cached = max(0, self._status.bytes_needed - self.meter.bytes)
        return folder
