"""A job's ``model``: a local folder, or a hub id with an optional revision
(``mlx-community/Llama-3.3-70B-Instruct-4bit@<rev>``), resolved through ``huggingface_hub`` and
its cache, so HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE mean what they mean for mlx-lm.

At submit the revision is pinned to the commit it names (``pin``), reading ``config.json`` and the
safetensors index only: a laptop never downloads weights, and a restarted job or a late worker
loads the same bytes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from herd.errors import ConfigError

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
# What a model folder holds that herd moves: weights, configs and tokenizer files. Never code
# (*.py): a job's model runs no code on a worker (mlx-lm's own list, less "*.py").
MODEL_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "tiktoken.model",
                  "*.txt", "*.jsonl", "*.jinja"]
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class ModelRef:
    """What ``model:`` names: a local folder (``path``) or a hub repository at a revision."""

    text: str
    path: Path | None = None
    repo_id: str = ""
    revision: str | None = None  # None: the default branch

    @property
    def is_local(self) -> bool:
        return self.path is not None

    @property
    def pinned(self) -> bool:
        """A hub id at a commit: the bytes it names can never change."""
        return self.revision is not None and bool(_COMMIT.match(self.revision))

    def at(self, commit: str) -> str:
        return f"{self.repo_id}@{commit}"


def parse(text: str) -> ModelRef:
    """A local folder when it exists here (or is written as a path), else a hub id."""
    path = Path(text).expanduser()
    if text.startswith(("/", "./", "../", "~")) or path.exists():
        return ModelRef(text, path=path)
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    repo, sep, revision = text.partition("@")
    try:
        validate_repo_id(repo)
    except HFValidationError as e:
        raise ConfigError(f"model = {text!r} is neither a folder here nor a hub id: {e}",
                          hint="give a model folder, or a hub id such as org/name[@revision]"
                          ) from None
    if sep and not revision:
        raise ConfigError(f"model = {text!r}: nothing after '@'",
                          hint="org/name@revision (a branch, a tag or a commit), or no '@'")
    return ModelRef(text, repo_id=repo, revision=revision or None)


NAME_MAX = 200


def check_folder_name(name: str) -> str:
    """A folder import's name in the model store (``herd models add FOLDER --name N``): plain,
    printable text. '/' and '@' make a hub id (org/name@revision), which names only a model the
    coordinator fetched from the hub itself: a folder listed as acme/tiny-llama@<commit> read as
    that hub model to everyone else (an outside review). Control characters would reach every
    user's terminal through `herd models`."""
    if not name.isprintable():
        raise ConfigError(f"model name {name!r} holds control characters",
                          hint="give a plain name, e.g. --name my-llama")
    if not name or len(name) > NAME_MAX:
        raise ConfigError(f"model name {name[:40]!r} is {len(name)} characters (1 to "
                          f"{NAME_MAX})", hint="give a plain name, e.g. --name my-llama")
    if "/" in name or "@" in name:
        raise ConfigError(f"model name {name!r} has a hub id's form (org/name@revision): only "
                          "a model the coordinator fetches from the hub is stored under one",
                          hint="give the folder a plain name without '/' or '@' (--name "
                          "my-llama), or `herd models add ORG/NAME` to store the hub's own files")
    # ('..' and ' x ' were stored: an outside run; a name that reads as a stored model's digest
    # is refused by the store, which knows them)
    if not name.strip(". ") or name != name.strip():
        raise ConfigError(f"model name {name!r} is only dots, or starts or ends with a space",
                          hint="e.g. --name my-llama")
    return name


@dataclass(frozen=True)
class HubModel:
    """A hub model pinned to a commit, with what planning needs from it."""

    repo_id: str
    commit: str
    config: dict[str, Any]
    index: dict[str, Any] | None  # None: one unsharded weights file (or no index cached)

    @property
    def pinned(self) -> str:
        return f"{self.repo_id}@{self.commit}"


def _hub_error(ref: ModelRef, e: Exception) -> ConfigError:
    """What went wrong, naming the id and revision, in the terms the user wrote them in."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    rev = ref.revision or "main"
    if isinstance(e, RevisionNotFoundError):
        return ConfigError(f"model = {ref.text!r}: {ref.repo_id} has no revision {rev!r}",
                           hint="a branch, a tag or a commit of the repository")
    if isinstance(e, GatedRepoError):
        return ConfigError(f"model = {ref.text!r}: {ref.repo_id} is gated",
                           hint="accept its terms on the hub and log in (`hf auth login`)")
    if isinstance(e, RepositoryNotFoundError):
        return ConfigError(f"model = {ref.text!r}: no hub repository {ref.repo_id!r}",
                           hint="check the id (org/name), or log in for a private one")
    if isinstance(e, LocalEntryNotFoundError):
        cached = _cached_revisions(ref.repo_id)
        where = f"the local hub cache ({constants.HF_HUB_CACHE})"
        if cached is None:
            what = f"{ref.repo_id} is not in {where}"
        else:
            what = (f"{ref.repo_id} has no revision {rev!r} with {CONFIG} in {where} (cached: "
                    f"{', '.join(cached) or 'nothing'})")
        return ConfigError(f"model = {ref.text!r}: {what}, and the hub cannot be reached "
                           "(offline)", hint="check the id and revision, or fetch it once where "
                           "the hub is reachable (HF_HUB_OFFLINE unset)")
    return ConfigError(f"model = {ref.text!r}: {type(e).__name__}: {e}")


def _cached_revisions(repo_id: str) -> list[str] | None:
    """The refs and commits the hub cache holds for ``repo_id`` (None: not cached at all)."""
    from huggingface_hub import constants, scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:  # the cache the lookup used (named: scan_cache_dir's own default can be stale)
        repos = [r for r in scan_cache_dir(constants.HF_HUB_CACHE).repos
                 if r.repo_id == repo_id and r.repo_type == "model"]
    except CacheNotFound:
        return None
    if not repos:
        return None
    return sorted({name for rev in repos[0].revisions
                   for name in (*rev.refs, rev.commit_hash[:12])})


def resolve(ref: ModelRef) -> HubModel:
    """Pins a hub id's revision to its commit and reads its config.json and safetensors index,
    nothing else (from the cache, else the hub). ConfigError naming the id or revision when
    either does not exist."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
    )

    try:
        commit = hf_hub_download(ref.repo_id, CONFIG, revision=ref.revision,
                                 dry_run=True).commit_hash
        config = json.loads(Path(hf_hub_download(ref.repo_id, CONFIG, revision=commit))
                            .read_text())
    except (HfHubHTTPError, LocalEntryNotFoundError, HFValidationError, OSError) as e:
        raise _hub_error(ref, e) from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"model = {ref.text!r}: its {CONFIG} is not JSON: {e}") from None
    try:
        index = json.loads(Path(hf_hub_download(ref.repo_id, INDEX, revision=commit)).read_text())
    except (EntryNotFoundError, LocalEntryNotFoundError):
        index = None  # one weights file (or, offline, an index the cache never held)
    except (HfHubHTTPError, OSError) as e:
        raise _hub_error(ref, e) from None
    return HubModel(ref.repo_id, commit, config, index)


def snapshot(repo_id: str, revision: str | None, patterns: list[str] | None = None,
             tqdm_class=None) -> Path:
    """The hub snapshot folder holding ``patterns`` (default: the whole model), downloaded into
    the hub cache where missing (and the hub reachable)."""
    from huggingface_hub import snapshot_download

    ref = ModelRef(f"{repo_id}@{revision}" if revision else repo_id, repo_id=repo_id,
                   revision=revision)
    patterns = patterns or MODEL_PATTERNS
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                        tqdm_class=tqdm_class))
    except Exception as e:  # the library's errors, each said in the job's terms
        raise _hub_error(ref, e) from None
    # Offline, the library returns a cached snapshot as it is: check it holds the weights asked.
    index = folder / INDEX
    wanted = [p for p in patterns if p.endswith(".safetensors") and "*" not in p]
    if "*.safetensors" in patterns:
        wanted += (sorted(set(json.loads(index.read_text())["weight_map"].values()))
                   if index.is_file() else [])
        if not wanted and not any(folder.glob("*.safetensors")):
            wanted = ["model.safetensors"]
    missing = [w for w in wanted if not (folder / w).is_file()]
    if missing:
        raise ConfigError(f"model = {ref.text!r}: the hub cache's snapshot {folder} lacks "
                          f"weights {missing} and the hub cannot provide them (offline?)",
                          hint="fetch the model where the hub is reachable, or `herd models add` "
                          "it on the coordinator")
    return folder


def hub_progress(on_bytes: Callable[[int], None]):
    """A tqdm class for ``snapshot_download`` that counts the bytes it writes (its aggregated
    "Reconstructing" bar) and shows nothing: the CLI draws its own bar from the counts."""
    from tqdm.auto import tqdm

    class Counting(tqdm):
        def __init__(self, *args, **kwargs):
            self._counts = kwargs.get("unit") == "B" and str(
                kwargs.get("desc", "")).startswith("Reconstruct")
            kwargs.pop("name", None)
            super().__init__(*args, **{**kwargs, "disable": True})

        def update(self, n=1):
            if self._counts and n:
                on_bytes(int(n))
            return super().update(n)

    return Counting


def download_bytes(repo_id: str, commit: str, patterns: list[str]) -> int:
    """What fetching ``patterns`` would download into the hub cache (a dry run): 0 when the hub
    cannot be asked (offline: the cache must then hold the files already)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import DryRunError

    try:
        infos = snapshot_download(repo_id, revision=commit, allow_patterns=patterns, dry_run=True)
    except (DryRunError, OSError):
        return 0
    return sum(i.file_size or 0 for i in infos if i.will_download)


def local_folder(model: str) -> Path:
    """The folder a process loads ``model`` from: the folder itself, or the hub snapshot."""
    ref = parse(model)
    if ref.is_local:
        return ref.path
    return snapshot(ref.repo_id, ref.revision)


def read_config(model: str) -> dict[str, Any]:
    """A model's config.json: from its folder, or (a hub id) config.json alone."""
    ref = parse(model)
    if not ref.is_local:
        return resolve(ref).config
    path = ref.path / CONFIG
    if not path.is_file():
        raise ConfigError(f"{path} does not exist",
                          hint="give a model folder (config.json alone is enough to plan) or a "
                          "hub id")
    return json.loads(path.read_text())
