"""The model store: every model once, content-addressed, and what the scheduler needs to know
about a job's model.

A stored model is a manifest (herd.models.manifest: each file's name, sha256 and size; its digest
names the model) plus its files, kept as blobs of the BlobStore (so a file two models share, or a
model stored under two names, takes its space once). Models come from the hub (the coordinator
fetches them through huggingface_hub: ``herd models add org/name``) or from a folder the CLI
uploads (``herd models add FOLDER``). Workers pull the files their rank needs with GetBlob.

A job's model is pinned at submit (``ModelCatalog.pin``): a hub id to its commit, and to the
stored model the coordinator fetched from the hub for that commit (``hub_ids``, never a name: a
folder import takes only a plain name, see herd.models.ref.check_folder_name); a local folder to
the stored model with the same digest.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import re
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from coordinator.artifacts import BlobStore
from coordinator.domain import FileDigest, Job, ModelSource
from herd import log
from herd.config import JobConfig
from herd.errors import ConfigError, DatasetError, HerdError, NotFoundError, PlacementError
from herd.models import ref as refs
from herd.models.manifest import (
    ModelManifest,
    check_complete,
    hash_file,
    is_model_file,
    model_files,
)
from herd.rpc.names import check_path, check_sha

_DIGEST = re.compile(r"^(?:sha256:)?([0-9a-f]{8,64})$")


@dataclass(frozen=True)
class StoredModel:
    manifest: ModelManifest
    names: tuple[str, ...]
    added_ms: int
    # The pinned hub ids (org/name@commit) the coordinator itself fetched these files for: the
    # only way a job's hub id reaches a stored model. A record stored before herd kept this has
    # none, so a hub-like name a folder took then lists and removes but never stands in for the
    # hub model (`herd models add ORG/NAME@REV` fetches it and records it).
    hub_ids: tuple[str, ...] = ()

    @property
    def digest(self) -> str:
        return self.manifest.digest

    @property
    def files(self) -> tuple[FileDigest, ...]:
        return self.manifest.files

    @property
    def bytes(self) -> int:
        return self.manifest.bytes


class ModelStore:
    """<root>/<digest>.json per model (its names, files and when it was added); the files are
    blobs. Thread-safe."""

    def __init__(self, root: Path, blobs: BlobStore):
        self.root, self.blobs = root, blobs
        root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()

    def _path(self, digest: str) -> Path:
        return self.root / f"{check_sha(digest)}.json"

    @staticmethod
    def _load(path: Path) -> StoredModel:
        m = json.loads(path.read_text())
        return StoredModel(ModelManifest.of(FileDigest(**f) for f in m["files"]),
                           tuple(m["names"]), m["added_ms"], tuple(m.get("hub_ids", ())))

    def list(self) -> list[StoredModel]:
        with self._lock:
            models = [self._load(p) for p in self.root.glob("*.json")]
        return sorted(models, key=lambda m: (m.added_ms, m.digest))

    def get(self, digest: str) -> StoredModel | None:
        path = self._path(digest)
        with self._lock:
            return self._load(path) if path.exists() else None

    def find(self, key: str) -> StoredModel | None:
        """By a name it is stored under, else a hub id without its revision when one revision of
        it is stored (as `herd models add ID` took it), else by its digest or a unique prefix of
        it."""
        models = self.list()
        for m in models:
            if key in m.names:
                return m
        if len(pinned := self.revisions_of(key)) == 1:
            return pinned[0]
        if "@" in key and (hit := self.revision(*key.split("@", 1))) is not None:
            return hit[0]
        if match := _DIGEST.match(key):
            hits = [m for m in models if m.digest.startswith(match.group(1))]
            if len(hits) == 1:
                return hits[0]
        return None

    def revision(self, repo: str, rev: str) -> tuple[StoredModel, set[str]] | None:
        """``repo@rev`` as `herd models add` took it: a stored commit that ``rev`` abbreviates,
        or that the branch or tag ``rev`` points to in this machine's hub cache (rm said "no
        stored model" to the forms add takes: an outside run); the model and its names that
        match."""
        from huggingface_hub import constants

        ref = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "refs" / rev
        try:
            commit = ref.read_text().strip() if ".." not in rev else ""
        except (OSError, ValueError):
            commit = ""
        hits: dict[str, tuple[StoredModel, set[str]]] = {}
        for m in self.revisions_of(repo):
            for n in m.names:
                if n.startswith(f"{repo}@") and (n == f"{repo}@{commit}" or (
                        len(rev) >= 7 and n.split("@", 1)[1].startswith(rev))):
                    hits.setdefault(m.digest, (m, set()))[1].add(n)
        return next(iter(hits.values())) if len(hits) == 1 else None

    def fetched(self, pinned: str) -> StoredModel | None:
        """The model the coordinator fetched from the hub for ``pinned`` (org/name@commit)."""
        return next((m for m in self.list() if pinned in m.hub_ids), None)

    def revisions_of(self, hub_id: str) -> list[StoredModel]:
        """The stored models named ``hub_id@<revision>``."""
        return [m for m in self.list() if any(n.startswith(f"{hub_id}@") for n in m.names)]

    def add(self, files: list[FileDigest], name: str, now_ms: int,
            from_hub: bool = False) -> StoredModel:
        """Stores a model whose files are already blobs; the same files again add ``name`` to the
        model already stored (idempotent). ``from_hub``: this coordinator fetched the files from
        the hub for ``name`` (a pinned hub id); anything else takes a plain name only."""
        if not from_hub:
            refs.check_folder_name(name)
        for f in files:
            check_path(f.name, "model")
            check_sha(f.sha256)
            if not is_model_file(f.name):
                raise DatasetError(f"{f.name} is not a model file herd stores",
                                   hint="weights (*.safetensors), configs and tokenizer files")
        manifest = ModelManifest.of(files)
        names = {f.name for f in manifest.files}
        if refs.CONFIG not in names or not any(n.endswith(".safetensors") for n in names):
            raise DatasetError(f"model {name!r} needs {refs.CONFIG} and *.safetensors weights")
        missing = [f.name for f in manifest.files if not self.blobs.has(f.sha256)]
        if missing:
            raise DatasetError(f"model {name!r}: files not uploaded: {', '.join(missing)}",
                               hint="`herd models add FOLDER` uploads them first")
        index = manifest.by_name().get(refs.INDEX)
        check_complete(names, json.loads(self.blobs.path(index.sha256).read_text())
                       if index else None, repr(name))
        with self._lock:
            # A name names one model: a second model under a name made `herd models rm NAME`
            # remove either, with every other name of it (an outside run). (A pinned hub id the
            # coordinator fetched itself is its own: only an old folder record can hold it.)
            stored = self.list()
            other = next((m for m in stored if name in m.names
                          and m.digest != manifest.digest), None)
            if other is not None and not from_hub:
                raise ConfigError(f"model name {name!r} already names model {other.digest[:12]}",
                                  hint=f"choose another --name, or `herd models rm {name}` first")
            # (`herd models rm` takes a digest's prefix too: a name that reads as one was
            # ambiguous, the name winning: an outside run)
            digests = [m.digest for m in stored] + [manifest.digest]
            if not from_hub and (hit := _DIGEST.match(name)) and any(
                    d.startswith(hit.group(1)) for d in digests):
                raise ConfigError(f"model name {name!r} reads as the digest of a stored model",
                                  hint="choose another --name, e.g. my-llama")
            old = self.get(manifest.digest)
            hub_ids = (*(old.hub_ids if old else ()), *((name,) if from_hub else ()))
            model = StoredModel(manifest, tuple(dict.fromkeys((*(old.names if old else ()),
                                                               name))),
                                old.added_ms if old else now_ms, tuple(dict.fromkeys(hub_ids)))
            self._write(model)
        return model

    def _write(self, model: StoredModel) -> None:
        doc = {"names": list(model.names), "added_ms": model.added_ms,
               "hub_ids": list(model.hub_ids), "files": [f.__dict__ for f in model.files]}
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".model-")
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, self._path(model.digest))

    def import_folder(self, folder: Path, name: str, now_ms: int, link: bool,
                      on_bytes: Callable[[int], None] | None = None,
                      from_hub: bool = False) -> StoredModel:
        """A model folder on this machine (a hub snapshot), hashed file by file into the store."""
        if not from_hub:  # said before hashing anything
            refs.check_folder_name(name)
        files = []
        for path in model_files(folder):
            digest = hash_file(path, on_bytes)
            self.blobs.import_file(path, digest.sha256, link)
            files.append(digest)
        return self.add(files, name, now_ms, from_hub)

    def read_json(self, model: StoredModel, name: str) -> dict[str, Any] | None:
        f = model.manifest.by_name().get(name)
        return json.loads(self.blobs.path(f.sha256).read_text()) if f else None

    def unname(self, model: StoredModel, names: set[str]) -> StoredModel:
        """The model without ``names`` (some of its names, not all), as now stored."""
        with self._lock:
            kept = dataclasses.replace(
                model, names=tuple(n for n in model.names if n not in names),
                hub_ids=tuple(n for n in model.hub_ids if n not in names))
            self._write(kept)
        return kept

    def remove(self, model: StoredModel, keep: set[str]) -> int:
        """Removes the model, and its files no other model holds and ``keep`` (datasets' blobs)
        does not name; returns the bytes freed."""
        with self._lock:
            self._path(model.digest).unlink(missing_ok=True)
            held = {f.sha256 for m in self.list() for f in m.files} | keep
            return sum(self.blobs.remove(f.sha256) for f in set(model.files)
                       if f.sha256 not in held)


class ModelCatalog:
    """The scheduler's questions about a job's model: which stored model or hub commit it is
    pinned to (at submit), its config.json (to plan) and where its workers get it."""

    def __init__(self, store: ModelStore):
        self.store = store
        self._hub_configs: dict[str, dict | None] = {}

    def pin(self, cfg: JobConfig, folder_digest: str) -> tuple[JobConfig, str]:
        """(config with a hub id pinned to its commit, the stored model's digest or "")."""
        ref = refs.parse(cfg.model)
        want = cfg.cluster.model_source
        if ref.is_local:
            if folder_digest:
                if self.store.get(folder_digest) is None:
                    raise ConfigError(f"model = {cfg.model!r}: the coordinator's model store does"
                                      f" not hold it (digest {folder_digest[:12]})",
                                      hint=f"`herd models add {cfg.model}` first")
                return cfg, folder_digest
            if want == "coordinator":
                raise ConfigError(f"model = {cfg.model!r}: this folder is not in the "
                                  "coordinator's model store (cluster.model_source: coordinator)",
                                  hint=f"`herd models add {cfg.model}` first")
            return cfg, ""  # a folder every worker holds at this path
        if not ref.pinned:  # a raw client: the CLI pins on the laptop already
            cfg = cfg.model_copy(update={"model": refs.resolve(ref).pinned})
        stored = self.store.fetched(cfg.model) if want != "hub" else None
        if want == "coordinator" and stored is None:
            raise ConfigError(f"model = {cfg.model!r} is not in the coordinator's model store "
                              "as fetched from the hub (cluster.model_source: coordinator)",
                              hint=f"`herd models add {cfg.model}` first (the coordinator "
                              "fetches it), or model_source: auto")
        return cfg, stored.digest if stored else ""

    def config(self, job: Job) -> dict[str, Any] | None:
        """config.json of the job's model: this coordinator's own reading, else the one the
        laptop sent with the job; None when neither (the job is then placed as data parallel,
        and a pipeline is refused)."""
        own = self._own_config(job)
        return own if own is not None else job.model_config

    def _own_config(self, job: Job) -> dict[str, Any] | None:
        if job.model_digest:
            model = self.store.get(job.model_digest)
            return self.store.read_json(model, refs.CONFIG) if model else None
        ref = refs.parse(job.config.model)
        if ref.is_local:
            path = ref.path / refs.CONFIG
            return json.loads(path.read_text()) if path.is_file() else None
        if job.config.model not in self._hub_configs:
            try:
                self._hub_configs[job.config.model] = refs.resolve(ref).config
            except HerdError:
                self._hub_configs[job.config.model] = None  # the workers may still reach it
        return self._hub_configs[job.config.model]

    def source(self, job: Job) -> ModelSource:
        if job.model_digest:
            model = self.store.get(job.model_digest)
            if model is None:
                raise PlacementError(f"the model store no longer holds {job.config.model} "
                                     f"({job.model_digest[:12]})", hint="`herd models add` it")
            return ModelSource(digest=model.digest, files=model.files)
        ref = refs.parse(job.config.model)
        if ref.is_local:
            return ModelSource()
        return ModelSource(hub_repo=ref.repo_id, hub_revision=ref.revision or "")

    def remove(self, key: str, jobs: list[Job]) -> tuple[StoredModel, int, tuple[str, ...]]:
        """``key`` removed: a name (or a hub id's one stored revision) only that name while the
        model has others (a model's every name went with any one of them: an outside run), a
        digest the whole model. (the model as it was, under the names removed; bytes freed; the
        names it is still stored under)."""
        model = self.store.find(key)
        if model is None:
            several = sorted(n for m in self.store.revisions_of(key) for n in m.names
                             if n.startswith(f"{key}@"))
            raise NotFoundError(f"no stored model {key!r}" + (
                f": {len(several)} revisions of it are stored ({', '.join(several)})"
                if several else ""), hint="name one as listed by `herd models`")
        if key in model.names:
            named = {key}
        elif "@" in key and (revision := self.store.revision(*key.split("@", 1))):
            named = revision[1]  # (a short commit, a branch or tag)
        else:  # a hub id's one stored revision, else a digest: every name
            named = {n for n in model.names if n.startswith(f"{key}@")} or set(model.names)
        if named != set(model.names):
            kept = self.store.unname(model, named)
            return dataclasses.replace(model, names=tuple(sorted(named))), 0, kept.names
        users = [j.job_id for j in jobs if j.model_digest == model.digest and not j.state.final]
        if users:
            # (exit 1, as removing an unfinished job is: a conflict, not a placement)
            raise HerdError(f"model {key} is used by unfinished jobs: {', '.join(users)}",
                            hint="wait for them, or `herd cancel` them")
        keep = {d.sha256 for j in jobs for d in j.dataset}
        return model, self.store.remove(model, keep), ()


def fetch_hub_model(store: ModelStore, hub, now_ms: int, active: Callable[[], bool]
                    ) -> Iterator[tuple[str, int, int, StoredModel | None]]:
    """`herd models add ORG/NAME`: download ``hub`` (refs.resolve's pinned commit) and import it
    into ``store``, in a thread of its own; yields (phase, bytes done, bytes total, None) every
    half second while ``active()``, then ("import", bytes, bytes, the stored model)."""
    counts = {"download": 0, "import": 0}
    progress: queue.Queue = queue.Queue()

    def work():
        try:
            folder = refs.snapshot(hub.repo_id, hub.commit, tqdm_class=refs.hub_progress(
                lambda n: counts.__setitem__("download", counts["download"] + n)))
            total = sum(p.stat().st_size for p in model_files(folder))
            progress.put(("import", total))
            progress.put(store.import_folder(
                folder, hub.pinned, now_ms, link=True, from_hub=True,
                on_bytes=lambda n: counts.__setitem__("import", counts["import"] + n)))
        except HerdError as e:
            progress.put(e)

    threading.Thread(target=work, daemon=True, name="add-model").start()
    phase, total = "download", 0
    while active():
        try:
            item = progress.get(timeout=0.5)
        except queue.Empty:
            yield phase, counts[phase], total, None
            continue
        if isinstance(item, HerdError):
            raise item
        if isinstance(item, tuple):
            phase, total = item
            continue
        log.get(__name__).info("model_added", model=hub.pinned, digest=item.digest,
                               bytes=item.bytes)
        yield "import", item.bytes, item.bytes, item
        return
