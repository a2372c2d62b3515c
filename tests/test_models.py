"""Models onto the workers, piece by piece: model references through a prepared hub cache
(offline), which shards a pipeline stage needs, the worker's bounded cache, and a transfer that
resumes after its serving coordinator was killed mid-shard. The whole path through a cluster is
tests/test_models_e2e.py."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from herd.errors import ConfigError, HerdError, PlacementError
from tests.conftest import free_ports
from tests.hub_cache import write_hub_cache

HOST = "127.0.0.1"


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """A 4-block llama in 3 safetensors shards with an index (`herd tiny-model --shards 3`)."""
    from herd.cli.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "sharded", layers=4, shards=3)


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """huggingface_hub pointed at an empty cache under tmp_path, offline (as HF_HOME and
    HF_HUB_OFFLINE=1 do for a fresh process)."""
    from huggingface_hub import constants

    home = tmp_path / "hf"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return home


def test_a_model_reference_is_a_folder_or_a_hub_id(tmp_path):
    from herd.models.ref import parse

    assert parse(str(tmp_path)).path == tmp_path
    assert parse("./not-here").is_local  # written as a path: a folder, even when missing
    ref = parse("mlx-community/Llama-3.3-70B-Instruct-4bit@v1.2")
    assert (ref.repo_id, ref.revision, ref.is_local, ref.pinned) == (
        "mlx-community/Llama-3.3-70B-Instruct-4bit", "v1.2", False, False)
    assert parse(f"org/m@{'ab' * 20}").pinned
    for bad in ("org/m@", "org//m", "a b/c"):
        with pytest.raises(ConfigError, match="model = "):
            parse(bad)


def test_a_hub_id_resolves_from_the_hub_cache_reading_config_json_only(sharded, offline_hub,
                                                                      tmp_path):
    """`herd plan` and `herd submit` on a laptop: config.json and the index pin the revision to
    its commit; a cache without any weights is enough, and a wrong id or revision is named."""
    from huggingface_hub import constants

    from herd.models.ref import local_folder, parse, read_config, resolve

    commit = write_hub_cache(offline_hub, "org/tiny", sharded,
                             names=["config.json", "model.safetensors.index.json"])
    config = json.loads((sharded / "config.json").read_text())
    for text in ("org/tiny", "org/tiny@main", f"org/tiny@{commit}"):
        hub = resolve(parse(text))
        assert (hub.pinned, hub.config) == (f"org/tiny@{commit}", config)
        assert set(hub.index["weight_map"].values()) == {
            p.name for p in sharded.glob("*.safetensors")}
    assert read_config("org/tiny") == config
    with pytest.raises(ConfigError, match=r"org/nope.* is not in the local hub cache"):
        resolve(parse("org/nope"))
    with pytest.raises(ConfigError, match=r"'org/tiny@v9': org/tiny has no revision 'v9'.*"
                       r"cached: [0-9a-f]{12}, main"):
        resolve(parse("org/tiny@v9"))
    # No weights here: loading the model (not planning it) needs them.
    assert not list(Path(constants.HF_HUB_CACHE).rglob("*.safetensors"))
    with pytest.raises(ConfigError, match=r"lacks weights \['model-00001-of-00003"):
        local_folder("org/tiny")


def _shards_by_block(index: dict) -> dict[str, set]:
    """What each shard holds, read straight from the index: block numbers, 'embed', 'head'."""
    held: dict[str, set] = {}
    for key, shard in index["weight_map"].items():
        parts = key.split(".")
        what = int(parts[2]) if key.startswith("model.layers.") else (
            "embed" if key.startswith("model.embed_tokens.") else "head")
        held.setdefault(shard, set()).add(what)
    return held


def test_a_pipeline_stage_needs_only_the_shards_of_its_blocks_and_loads_from_them(sharded,
                                                                                tmp_path):
    import mlx.core as mx

    from herd.models.manifest import needed_files
    from herd.stage_cut import StagePiece
    from worker.pipeline.stage import StageSpec, load_stage_weights

    config = json.loads((sharded / "config.json").read_text())
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    names = [p.name for p in sharded.iterdir()]
    held = _shards_by_block(index)
    shards = sorted(held)
    assert len(shards) == 3 and not config["tie_word_embeddings"]
    assert needed_files(names, config, index, None) == sorted(names)  # data parallel: all
    union = set()
    for piece, wants in ((StagePiece(0, 2, 0, 2), {"embed", 0, 1}),
                         (StagePiece(1, 2, 2, 4), {"head", 2, 3})):
        got = needed_files(names, config, index, piece)
        want = sorted(s for s in shards if held[s] & wants)
        assert [n for n in got if n.endswith(".safetensors")] == want
        assert len(want) < len(shards)  # a stage never needs the whole model here
        assert {n for n in got if not n.endswith(".safetensors")} == {
            n for n in names if not n.endswith(".safetensors")}
        union |= set(got)
        # The stage loads its blocks from a folder holding only those files (the worker's).
        folder = tmp_path / f"stage{piece.index}"
        folder.mkdir()
        for n in got:
            (folder / n).symlink_to(sharded / n)
        spec = StageSpec(piece.index, piece.count, piece.start, piece.end, 4)
        weights = load_stage_weights(folder, spec, tied=False)
        full = load_stage_weights(sharded, spec, tied=False)
        assert sorted(weights) == sorted(full) and weights
        assert all(mx.array_equal(weights[k], full[k]).item() for k in weights)
    assert union == set(names)


def test_a_worker_gets_a_hub_model_straight_from_its_hub_cache(sharded, offline_hub, tmp_path):
    """model_source: hub: a stage's worker resolves the pinned commit in its own hub cache."""
    from herd.config import JobConfig
    from herd.models.source import ModelSource
    from worker.agent.domain import RankSpec
    from worker.agent.model_cache import ModelCache
    from worker.agent.model_fetch import Preparation

    commit = write_hub_cache(offline_hub, "org/tiny", sharded)
    spec = RankSpec("job-1", 1, 1, 2, JobConfig(model=f"org/tiny@{commit}"), [], "", [], [],
                    stage_layers=((0, 2), (2, 4)),
                    model=ModelSource(hub_repo="org/tiny", hub_revision=commit))

    class NoCoordinator:
        def close(self):
            pass

    prep = Preparation(spec, ModelCache(tmp_path / "cache", "w1"), NoCoordinator(),
                       tmp_path / "view", "w1")
    folder = prep.result()
    assert folder.name == commit and (folder / "config.json").exists()
    status = prep.status()
    assert (status.source, status.done, status.bytes_received) == ("hub", True, 0)


def test_fetch_figures_add_up_after_a_resumed_transfer(tmp_path):
    """Bytes a transfer resumed from (its partial file) and a second name of the same content
    were counted neither cached nor received (an outside run: 31,874 cached + 394,416,159
    received of 608,357,537 needed). Now needed = cached + received once it is done."""
    from herd.config import JobConfig
    from herd.digest import FileDigest
    from herd.models.source import ModelSource
    from worker.agent.domain import RankSpec
    from worker.agent.model_cache import ModelCache
    from worker.agent.model_fetch import Preparation

    content = {"config.json": b'{"model_type": "llama"}', "a.safetensors": os.urandom(50_000),
               "tokenizer.json": b"{}"}
    content["b.safetensors"] = content["a.safetensors"]  # the same bytes under a second name
    files = tuple(FileDigest(n, hashlib.sha256(b).hexdigest(), len(b))
                  for n, b in content.items())
    by_sha = {hashlib.sha256(b).hexdigest(): b for b in content.values()}

    class Store:
        def read_blob(self, sha, size):
            return by_sha[sha]

        def blob_chunks(self, sha, offset):
            data = by_sha[sha]
            return [data[i:i + 4096] for i in range(offset, len(data), 4096)]

        def close(self):
            pass

    cache = ModelCache(tmp_path / "cache", "w1")
    shard = files[1]
    cache.part(shard.sha256).parent.mkdir(parents=True, exist_ok=True)
    cache.part(shard.sha256).write_bytes(content["a.safetensors"][:20_000])  # a cut transfer
    spec = RankSpec("job-1", 1, 0, 1, JobConfig(model="m"), [], "", [], [],
                    model=ModelSource(digest="d" * 64, files=files))
    prep = Preparation(spec, cache, Store(), tmp_path / "view", "w1")
    prep.result()
    status = prep.status()
    assert status.done and status.bytes_needed == sum(f.bytes for f in files)
    # the shard's rest, the config and the tokenizer
    assert status.bytes_received == 30_000 + len(content["config.json"]) + len(b"{}")
    assert status.bytes_cached + status.bytes_received == status.bytes_needed, status
    # The whole model is here now: the worker says so (WorkerInfo.cached_models), until a file
    # of it goes.
    assert cache.whole_models() == ["d" * 64]
    cache.blob(files[2].sha256).unlink()
    assert cache.whole_models() == []


def test_placement_prefers_the_workers_that_hold_the_model_among_equal_memory(tmp_path):
    """An outside run: two idle workers held a 600 MB model, and placement chose two others,
    which fetched it all again (40 GB each for a 70B). Among workers of the same memory (to the
    GiB) those holding the job's stored model go first; never one with less memory."""
    from coordinator.domain import Job
    from coordinator.placement import decide_queued
    from herd.config import parse_config
    from tests.test_service_units import GB, worker

    cfg = parse_config({"model": "/m", "data": "d", "num_layers": -1, "batch_size": 4,
                        "cluster": {"workers": 2}})
    job = Job(job_id="j-1", name="j", config=cfg, dataset=[], workers_needed=2, iters=10,
              model_digest="d" * 64)
    warm, mem = ("d" * 64,), 16 * GB + 512 * 2**20
    workers = [worker(1, mem=mem), worker(2, mem=mem, cached_models=warm), worker(3, mem=mem),
               worker(4, mem=16 * GB + 100 * 2**20, cached_models=warm)]  # (less, same GiB)
    assert decide_queued(job, workers, 0, 60).worker_ids == ["w2", "w4"]
    workers[3] = worker(4, mem=15 * GB, cached_models=warm)  # a GiB less: not for a cache
    assert decide_queued(job, workers, 0, 60).worker_ids == ["w2", "w1"]
    cold = Job(job_id="j-2", name="j", config=cfg, dataset=[], workers_needed=2, iters=10)
    assert decide_queued(cold, workers, 0, 60).worker_ids == ["w1", "w2"]  # as before


def _blob(cache, sha: str) -> Path:
    return cache.blobs / sha


def test_the_cache_evicts_least_recently_used_unpinned_files_and_refuses_with_figures(tmp_path):
    from worker.agent.model_cache import ModelCache

    cache = ModelCache(tmp_path / "cache", "w1", max_bytes=3000)
    shas = []
    for i in range(3):  # 3 files of 1000 bytes, used at t=100, 200, 300
        data = bytes([i]) * 1000
        sha = hashlib.sha256(data).hexdigest()
        _blob(cache, sha).write_bytes(data)
        os.utime(_blob(cache, sha), (100 * (i + 1),) * 2)
        shas.append(sha)
    cache.pin(("job-a", 1, 0), {shas[0]})  # the oldest, but a running job needs it
    cache.touch({shas[1]})  # used just now: the newest
    cache.reserve(1000, keep=set())
    assert [_blob(cache, s).exists() for s in shas] == [True, True, False]
    with pytest.raises(PlacementError) as refused:
        cache.reserve(2500, keep=set())
    msg = refused.value.message
    assert "need 2,500 bytes (2.5 kB) more" in msg and "bounded to 3,000 bytes" in msg
    assert "1,000 bytes of other models could be evicted" in msg
    assert [_blob(cache, s).exists() for s in shas] == [True, True, False]  # nothing evicted
    cache.unpin_job("job-a")  # the job ended: its file is the least recently used now
    cache.reserve(2000, keep=set())
    assert [_blob(cache, s).exists() for s in shas] == [False, True, False]


# --- a transfer cut mid-shard ----------------------------------------------------------------

class CoordinatorProcess:
    """A real `herd coordinator` process, killed and started again on the same port and state."""

    def __init__(self, root: Path, tls_dir: Path):
        self.root, self.tls_dir = root, tls_dir
        self.port = free_ports(1)[0]
        self.address = f"{HOST}:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, "HERD_ZEROCONF_INTERFACES": HOST, "HERD_LOG_LEVEL": "warning"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "herd", "coordinator", "--host", HOST, "--port",
             str(self.port), "--state-dir", str(self.root), "--tls-dir", str(self.tls_dir),
             "--no-join"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        import socket

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and self.proc.poll() is None:
            with socket.socket() as s:
                if s.connect_ex((HOST, self.port)) == 0:
                    return
            time.sleep(0.1)
        raise AssertionError(f"coordinator did not start: {self.proc.stderr.read()[-2000:]}")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.mark.slow
def test_a_transfer_cut_mid_shard_resumes_where_it_stopped(tmp_path):
    """The coordinator serving a shard is SIGKILLed mid-transfer and started again: the worker's
    fetch resumes from the bytes it holds (never receiving one twice) and ends with the right
    sha256."""
    from coordinator.domain import Job, JobState
    from coordinator.store import JobStore
    from herd.cli.connection import CoordinatorConnection
    from herd.config import parse_config
    from herd.digest import FileDigest
    from herd.models.manifest import folder_manifest
    from herd.rpc import pki
    from protos.v1 import common_pb2, coordinator_pb2
    from worker.agent.coordinator_client import CoordinatorClient
    from worker.agent.model_cache import ModelCache
    from worker.agent.model_fetch import fetch_file

    ca = pki.Authority.create(tmp_path / "tls")
    ca.issue("coordinator", "coord").save(ca.folder)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "tokenizer.json").write_text("{}")
    shard = folder / "model-00001-of-00001.safetensors"
    shard.write_bytes(os.urandom(96 * 2**20))  # far more than gRPC keeps in flight
    f = FileDigest(shard.name, hashlib.sha256(shard.read_bytes()).hexdigest(),
                   shard.stat().st_size)
    coord = CoordinatorProcess(tmp_path / "coordinator", ca.folder)
    coord.start()

    def run_on_w1(digest: str) -> None:
        """A job on that model, running on w1: a worker reads a stored model's blobs only for
        the job it runs (no rank of it runs, so a restarted coordinator that finds none moves
        it on: it is set again after the restart)."""
        cfg = parse_config({"model": "m", "data": "data", "iters": 10, "batch_size": 4})
        JobStore(coord.root / "herd.db").put_job(Job(
            job_id="fetch-1", name="fetch", config=cfg, dataset=[], workers_needed=1, iters=10,
            state=JobState.RUNNING, attempt=1, worker_ids=["w1"], model_digest=digest))

    try:
        manifest = folder_manifest(folder)
        with CoordinatorConnection(coord.address, ca.issue("client", "t")) as c:
            for path in (shard, folder / "config.json", folder / "tokenizer.json"):
                c.put_blob(path, manifest.by_name()[path.name].sha256)
            files = [common_pb2.FileDigest(name=m.name, sha256=m.sha256, bytes=m.bytes)
                     for m in manifest.files]
            *_, added = c.stub.AddModel(coordinator_pb2.AddModelRequest(name="m", files=files),
                                        timeout=60)
        run_on_w1(added.model.digest)
        cache = ModelCache(tmp_path / "cache", "w1")
        client = CoordinatorClient(coord.address, ca.issue("worker", "w1"))
        offsets, stream = [], client.blob_chunks

        def recording(sha, offset):  # which byte each try asked for
            offsets.append(offset)
            return stream(sha, offset)

        client.blob_chunks = recording
        first, resume = threading.Event(), threading.Event()

        def on_bytes(n):
            if not first.is_set():  # hold the transfer after its first chunk
                first.set()
                resume.wait(120)

        result = {}
        fetch = threading.Thread(target=lambda: result.update(
            received=fetch_file(client, f, cache, on_bytes)))
        fetch.start()
        assert first.wait(120)
        coord.kill()  # the serving side, mid-shard
        coord.start()
        run_on_w1(added.model.digest)
        resume.set()
        fetch.join(240)
        assert not fetch.is_alive()
        client.close()
    finally:
        resume.set()
        coord.stop()
    print(f"tries started at bytes {offsets} of {f.bytes}")
    assert len(offsets) >= 2 and offsets[0] == 0 and 0 < offsets[-1] < f.bytes
    assert result["received"] == f.bytes  # no byte received twice
    assert hashlib.sha256(cache.blob(f.sha256).read_bytes()).hexdigest() == f.sha256
    assert not list(cache.partial.iterdir())


def test_a_corrupted_transfer_is_refused_and_leaves_nothing(tmp_path):
    from herd.errors import ChecksumError
    from herd.rpc.files import receive_resumable

    good = b"x" * 3000
    sha = hashlib.sha256(good).hexdigest()
    part, dest = tmp_path / "part", tmp_path / "blob"
    with pytest.raises(ChecksumError, match="arrived corrupted"):
        receive_resumable(lambda offset: [b"y" * 3000], sha, 3000, part, dest, "shard")
    assert not part.exists() and not dest.exists()
    # A transfer that ends early is a broken connection: the next try asks from its end.
    asked = []

    def stream(offset):
        asked.append(offset)
        return [good[offset:offset + 1000]]

    assert receive_resumable(stream, sha, 3000, part, dest, "shard", sleep=lambda s: None) == 3000
    assert asked == [0, 1000, 2000] and dest.read_bytes() == good


# --- the control loop's fetch phase ----------------------------------------------------------

class FetchingLauncher:
    """Workers that report fetch progress (and may refuse) before any rank may start."""

    def __init__(self, refuse: str | None = None):
        self.refuse, self.prepared, self.started, self.stopped = refuse, [], [], []

    def prepare_rank(self, launch, on_progress):
        from coordinator.domain import FetchProgress

        assert not self.started, "a rank started before every worker was prepared"
        if launch.worker.worker_id == self.refuse:
            raise PlacementError(f"worker {self.refuse} cannot hold the model: 9,000 bytes")
        for got in (0, 500, 1000):
            on_progress(FetchProgress(rank=launch.rank, worker_id=launch.worker.worker_id,
                                      source="store", files=2, bytes_needed=1000,
                                      bytes_received=got, done=got == 1000))
        self.prepared.append(launch)

    def start_rank(self, launch):
        self.started.append(launch)

    def stop_job(self, w, job_id, attempt=0):
        self.stopped.append(w.worker_id)


@pytest.mark.parametrize("refuse", [None, "w2"])
def test_every_rank_is_prepared_before_any_starts_and_a_refusal_fails_the_job(tmp_path, refuse):
    from coordinator.domain import EventKind, JobState
    from coordinator.scheduler import Scheduler
    from coordinator.store import JobStore
    from tests.test_service_units import job, worker

    launcher = FetchingLauncher(refuse)
    s = Scheduler(JobStore(tmp_path / "db"), lambda: [worker(1), worker(2)], launcher)
    j = s.submit(job(workers=2))
    s.tick()
    got = s.store.get_job(j.job_id)
    fetches = [e.fetch for e in s.store.events(j.job_id) if e.kind is EventKind.FETCH]
    if refuse is None:
        assert got.state is JobState.RUNNING and len(launcher.started) == 2
        assert len(fetches) == 6 and sum(f.done for f in fetches) == 2
        assert {f.worker_id for f in fetches} == {"w1", "w2"}
    else:  # no other worker could take w2's place
        assert got.state is JobState.FAILED and not launcher.started
        assert "could not start on w2: worker w2 cannot hold the model: 9,000 bytes" in (
            got.message)
        assert sorted(launcher.stopped) == ["w1", "w2"]


def test_a_worker_that_refuses_a_rank_is_passed_over_for_an_idle_one(tmp_path):
    """An outside run: of three Macs, the one whose model cache could not hold the model was
    picked, and the job failed for good while the third sat idle. Now it starts again at once on
    the others (no restart counted), and is asked again after refusals.FORGET_S; a job with too
    few others left fails as before, naming the refusal."""
    from coordinator.domain import JobState
    from coordinator.refusals import FORGET_S, Refusals
    from coordinator.scheduler import Scheduler
    from coordinator.store import JobStore
    from tests.test_service_units import Clock, job, worker

    launcher, clock = FetchingLauncher("w2"), Clock()
    workers = [worker(1), worker(2), worker(3)]
    s = Scheduler(JobStore(tmp_path / "db"), lambda: list(workers), launcher, clock,
                  placement_timeout_s=60)
    s.refusals = Refusals(clock)
    j = s.submit(job(workers=2))
    s.tick()  # placed on w1, w2 (ids in order at equal memory): w2 refuses
    assert s.store.get_job(j.job_id).state is JobState.RESTARTING
    s.tick()
    got = s.store.get_job(j.job_id)
    assert got.state is JobState.RUNNING and got.worker_ids == ["w1", "w3"], got.message
    assert [la.worker.worker_id for la in launcher.started] == ["w1", "w3"]
    assert [a.outcome for a in s.store.attempt_history(j.job_id)][0] == "interrupted"
    assert list(s.refusals.of(j.job_id)) == ["w2"]
    clock.t += FORGET_S  # (busy then, or its cache freed since: asked again)
    assert s.refusals.of(j.job_id) == {}
    s.cancel(j.job_id)
    launcher.started.clear()
    k = s.submit(job(workers=3, iters=12))
    s.tick()
    s.tick()
    got = s.store.get_job(k.job_id)
    assert got.state is JobState.FAILED, got.message  # no three others: as before
    assert "could not start on w2: worker w2 cannot hold the model" in got.message


def test_a_job_from_either_door_is_pinned_to_its_commit(sharded, offline_hub, tmp_path):
    """gRPC SubmitJob and the HTTP job API both make jobs with coordinator/jobs.new_job: a hub
    id there is pinned to its commit (a raw client need not pin it), a wrong one refused by name."""
    from coordinator.artifacts import BlobStore
    from coordinator.jobs import new_job
    from coordinator.models import ModelCatalog, ModelStore
    from herd.digest import FileDigest

    commit = write_hub_cache(offline_hub, "org/tiny", sharded,
                             names=["config.json", "model.safetensors.index.json"])
    blobs = BlobStore(tmp_path / "blobs")
    train = b'{"text": "hello"}\n' * 4  # batch_size 4's worth: the coordinator checks it
    sha = hashlib.sha256(train).hexdigest()
    blobs.put(sha, [train])
    models = ModelCatalog(ModelStore(tmp_path / "models", blobs))
    dataset = [FileDigest("train.jsonl", sha, len(train))]

    def submit(model: str):
        return new_job("j", f"model: {model}\ndata: d\n", dataset, blobs, models)

    job = submit("org/tiny")
    assert (job.config.model, job.model_digest) == (f"org/tiny@{commit}", "")
    with pytest.raises(ConfigError, match="org/nope"):
        submit("org/nope")


def test_a_model_only_the_laptop_can_read_is_planned_from_the_config_it_sent(offline_hub,
                                                                            tmp_path):
    """A hub model cached only on the laptop (or gated, its token only there): the coordinator
    cannot read its config.json, and used to place a 70B job on 16 GB workers that `herd plan`
    refused (an outside run). The laptop sends the config.json it read; the job that cannot fit
    is refused at submit, with the fixes."""
    from coordinator.artifacts import BlobStore
    from coordinator.jobs import new_job
    from coordinator.models import ModelCatalog, ModelStore
    from coordinator.placement import DoesNotFitError
    from coordinator.scheduler import Scheduler
    from coordinator.store import JobStore
    from herd.digest import FileDigest
    from tests.test_planner import LLAMA_70B
    from tests.test_service_units import FakeLauncher, worker

    blobs = BlobStore(tmp_path / "blobs")
    train = b'{"text": "hello"}\n' * 4
    sha = hashlib.sha256(train).hexdigest()
    blobs.put(sha, [train])
    models = ModelCatalog(ModelStore(tmp_path / "models", blobs))
    s = Scheduler(JobStore(tmp_path / "db"), lambda: [worker(1), worker(2)], FakeLauncher(),
                  models=models)
    pinned = "org/llama-70b@" + "a" * 40  # the laptop pinned it: the coordinator asks nothing

    def submit(sent: str):
        job = new_job("j", f"model: {pinned}\ndata: d\nbatch_size: 2\nnum_layers: -1\n"
                      "cluster: {workers: 2}\n",
                      [FileDigest("train.jsonl", sha, len(train))], blobs, models,
                      model_config_json=sent)
        return s.submit(job)

    with pytest.raises(DoesNotFitError, match="GB"):
        submit(json.dumps(LLAMA_70B))
    assert submit("").state.value == "queued"  # nothing to plan with: placement decides
    small = {**LLAMA_70B, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 1000}
    ok = submit(json.dumps(small))  # fits: kept with the job, which placement (and any
    assert s.store.get_job(ok.job_id).model_config == small  # restart) plans with
    with pytest.raises(ConfigError, match="not a JSON object"):
        submit("[1, 2]")


def test_a_model_an_unfinished_job_uses_is_not_removed(sharded, tmp_path):
    """`herd models rm` (ModelCatalog.remove): refused, naming the jobs, while an unfinished job
    is pinned to the model; once they are final it goes, keeping a dataset's blob it shares."""
    from coordinator.artifacts import BlobStore
    from coordinator.domain import Job, JobState
    from coordinator.models import ModelCatalog, ModelStore
    from herd.config import parse_config
    from herd.digest import FileDigest
    from herd.errors import NotFoundError

    blobs = BlobStore(tmp_path / "blobs")
    models = ModelCatalog(ModelStore(tmp_path / "models", blobs))
    stored = models.store.import_folder(sharded, "sharded", 0, link=False)
    config = stored.manifest.by_name()["config.json"]  # a dataset that holds the same bytes
    cfg = parse_config({"model": "sharded", "data": "d"})

    def job(state: JobState) -> Job:
        return Job(job_id=f"j-{state.value}", name="j", config=cfg, workers_needed=1, iters=1,
                   state=state, model_digest=stored.digest,
                   dataset=[FileDigest("train.jsonl", config.sha256, config.bytes)])

    with pytest.raises(HerdError, match="used by unfinished jobs: j-running") as refused:
        models.remove("sharded", [job(JobState.RUNNING), job(JobState.SUCCEEDED)])
    assert type(refused.value) is HerdError  # exit 1, as for removing an unfinished job
    assert models.store.find("sharded") is not None
    removed, freed, still = models.remove("sharded", [job(JobState.SUCCEEDED)])
    assert still == ()
    assert removed.digest == stored.digest
    assert freed == sum(f.bytes for f in stored.files) - config.bytes
    assert blobs.has(config.sha256) and models.store.find("sharded") is None
    with pytest.raises(NotFoundError, match="no stored model 'sharded'"):
        models.remove("sharded", [])


def test_a_hub_model_is_found_by_the_id_herd_models_add_took(sharded, tiny_model, tmp_path):
    """`herd models add org/name` stores org/name@<commit>; `herd models rm org/name` said "no
    stored model" (an outside run). One revision stored: the id finds it; several: the error
    lists them."""
    from coordinator.artifacts import BlobStore
    from coordinator.models import ModelCatalog, ModelStore
    from herd.errors import NotFoundError

    models = ModelCatalog(ModelStore(tmp_path / "models", BlobStore(tmp_path / "blobs")))
    first = models.store.import_folder(sharded, f"org/m@{'a' * 40}", 0, link=False,
                                       from_hub=True)  # as fetch_hub_model imports it
    assert models.store.find("org/m").digest == first.digest
    assert models.store.find("org/other") is None
    models.store.import_folder(tiny_model, f"org/m@{'b' * 40}", 0, link=False, from_hub=True)
    with pytest.raises(NotFoundError, match=f"2 revisions of it are stored \\(org/m@{'a' * 40}, "
                                            f"org/m@{'b' * 40}\\)"):
        models.remove("org/m", [])
    removed, _, _ = models.remove(f"org/m@{'a' * 40}", [])
    assert removed.digest == first.digest and models.store.find("org/m") is not None
    # the forms `herd models add` takes: a short commit, a tag in this machine's hub cache
    again = models.store.import_folder(sharded, f"org/m@{'c' * 40}", 0, link=False,
                                       from_hub=True)
    assert models.store.find("org/m@ccccccc").digest == again.digest
    assert models.store.find("org/m@ccc") is None  # too short to name a commit
    refs = tmp_path / "hf" / "hub" / "models--org--m" / "refs"
    refs.mkdir(parents=True)
    (refs / "v2").write_text("c" * 40)
    mp = pytest.MonkeyPatch()
    from huggingface_hub import constants

    mp.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    try:
        removed, _, _ = models.remove("org/m@v2", [])
    finally:
        mp.undo()
    assert removed.digest == again.digest and removed.names == (f"org/m@{'c' * 40}",)
    # a second revision of the same files: only the one named goes
    two = models.store.import_folder(sharded, f"org/m@{'d' * 40}", 0, link=False, from_hub=True)
    models.store.import_folder(sharded, f"org/m@{'e' * 40}", 0, link=False, from_hub=True)
    removed, _, still = models.remove("org/m@ddddddd", [])
    assert removed.names == (f"org/m@{'d' * 40}",) and still == (f"org/m@{'e' * 40}",), still
    assert models.store.get(two.digest) is not None


def test_a_name_names_one_model_and_rm_of_a_name_removes_only_that_name(sharded, tiny_model,
                                                                        tmp_path):
    """An outside run: a second folder took a name already in use, and `herd models rm NAME`
    then removed one of the two with every other name it had (a hub revision the coordinator
    had fetched, the user's 40 GB re-download); '..' and another model's digest were taken as
    names."""
    from coordinator.artifacts import BlobStore
    from coordinator.models import ModelCatalog, ModelStore

    models = ModelCatalog(ModelStore(tmp_path / "models", BlobStore(tmp_path / "blobs")))
    hub = models.store.import_folder(sharded, f"org/m@{'a' * 40}", 0, link=False, from_hub=True)
    models.store.import_folder(sharded, "alias", 1, link=False)  # the same files: a 2nd name
    other = models.store.import_folder(tiny_model, "tiny", 2, link=False)
    with pytest.raises(ConfigError, match=f"'alias' already names model {hub.digest[:12]}"):
        models.store.import_folder(tiny_model, "alias", 3, link=False)
    for bad in ("..", ".", " padded", other.digest[:12], hub.digest, "x\ty"):
        with pytest.raises(ConfigError):
            models.store.import_folder(tiny_model, bad, 3, link=False)
    # a folder's own name, spaces, digits and all, unless it reads as a stored digest
    models.store.import_folder(tiny_model, "Llama 3 8B (copy) ünï", 3, link=False)
    models.store.import_folder(tiny_model, "20240101", 3, link=False)
    removed, freed, still = models.remove("alias", [])
    assert (removed.names, freed, still) == (("alias",), 0, (f"org/m@{'a' * 40}",))
    assert models.store.find("org/m").digest == hub.digest  # the hub revision stays, its files
    assert all(models.store.blobs.has(f.sha256) for f in hub.files)
    removed, freed, still = models.remove("org/m", [])  # its one name left: the model goes
    assert removed.digest == hub.digest and freed > 0 and still == ()
    removed, _, still = models.remove(other.digest[:12], [])  # a digest: every name of it
    assert set(removed.names) == {"tiny", "Llama 3 8B (copy) ünï", "20240101"} and still == ()


def test_a_model_folder_missing_a_shard_or_its_tokenizer_is_refused_before_any_worker(
        sharded, tmp_path):
    """Submitted, or stored with `herd models add`, such a folder failed on a rank after
    placement with safetensors' or transformers' own message (an outside run)."""
    import json
    import shutil

    from coordinator.artifacts import BlobStore
    from coordinator.models import ModelStore
    from herd.model_config import check_model_folder

    store = ModelStore(tmp_path / "models", BlobStore(tmp_path / "blobs"))
    check_model_folder(str(sharded))  # complete
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    no_shard = shutil.copytree(sharded, tmp_path / "no-shard")
    (no_shard / shard).unlink()
    no_tokenizer = shutil.copytree(sharded, tmp_path / "no-tokenizer")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (no_tokenizer / f).unlink(missing_ok=True)
    for folder, words in ((no_shard, f"names shards it does not hold: {shard}"),
                          (no_tokenizer, "has no tokenizer")):
        with pytest.raises(ConfigError, match=words):
            check_model_folder(str(folder))
        with pytest.raises(ConfigError, match=words):
            store.import_folder(folder, folder.name, 0, link=False)
    assert store.list() == []


def test_plan_names_a_revision_the_cache_does_not_hold(offline_hub, sharded):
    """`herd plan` on org/name@nope said "no config.json for this hub id" and hinted a download
    that would not help; submit named the revision (an outside run). Both do now."""
    from herd.model_config import resolve_model_config

    write_hub_cache(offline_hub, "org/tiny", sharded, names=["config.json"])
    assert resolve_model_config("org/tiny")["model_type"] == "llama"
    with pytest.raises(ConfigError, match=r"org/tiny has no revision 'nope' with config.json in "
                                          r"the local Hugging Face cache \(cached: .*main"):
        resolve_model_config("org/tiny@nope")


def test_herd_generate_loads_a_hub_jobs_base_at_its_pinned_revision(sharded, offline_hub):
    """A hub job's adapter records its base as the model store pins it, org/name@commit, which
    no mlx-lm tool reads (an outside run: `herd generate` exited 2 on the recorded base): the
    commit's snapshot folder is what mlx-lm gets; one not cached is said, with the way out."""
    from herd.cli.generate import _loadable
    from herd.errors import NotFoundError

    commit = write_hub_cache(offline_hub, "org/tiny", sharded)
    folder = Path(_loadable(f"org/tiny@{commit}"))
    assert folder.name == commit and (folder / "config.json").is_file()
    assert _loadable("org/tiny") == "org/tiny"  # (mlx-lm resolves a bare id itself)
    assert _loadable(str(sharded)) == str(sharded)
    with pytest.raises(NotFoundError, match=f"org/tiny@{'0' * 40} is not in the local") as e:
        _loadable(f"org/tiny@{'0' * 40}")
    assert "pass --model" in e.value.hint


def test_herd_generate_given_a_job_id_says_how_to_get_its_adapter(capsys):
    """`herd generate JOB` printed mlx_lm.generate's whole usage and "unrecognized arguments"
    (an outside run): it names the way, `herd pull JOB -o DIR` first."""
    from herd.cli.generate import main

    assert main(["generate", "comp-5ab429", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "herd pull comp-5ab429 -o DIR" in err and "usage:" not in err


def test_the_convert_command_for_a_hub_base_names_what_mlx_lm_convert_reads(sharded, offline_hub):
    """mlx_lm.convert has no --revision, and failed on the recorded org/name@commit (an outside
    run): the commit's cached folder, or the repo with its revision said."""
    from herd.adapter_card import convert_hint

    commit = write_hub_cache(offline_hub, "org/tiny", sharded)
    q = {"bits": 4, "group_size": 64}
    cached = convert_hint(f"org/tiny@{commit}", q)
    assert f"--hf-path {offline_hub}" in cached and commit in cached, cached
    assert cached.endswith("--mlx-path tiny-4bit")
    gone = convert_hint(f"org/tiny@{'0' * 40}", q)
    assert "--hf-path org/tiny -q" in gone and f"the adapter's base is {'0' * 40}" in gone
    assert convert_hint("/models/llama", q).startswith("mlx_lm.convert --hf-path /models/llama")
