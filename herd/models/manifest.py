"""A model as content-addressed files: its manifest (every file's name, sha256 and size), the
digest that names the whole, and which of the files one rank needs.

A pipeline stage needs only the safetensors shards that hold its blocks (read from the
``model.safetensors.index.json`` weight map, with the ownership rule the stage loader uses), plus
every non-weight file (config, tokenizer); a data-parallel rank needs them all.
"""

from __future__ import annotations

import fnmatch
import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from herd.digest import BLOCK_BYTES, FileDigest
from herd.errors import ConfigError
from herd.models.ref import CONFIG, INDEX, MODEL_PATTERNS
from herd.stage_cut import StagePiece, owned_key

WEIGHTS_SUFFIX = ".safetensors"
# sha256 releases the GIL: a few files hash in parallel (40 GB on one core is ~20 s).
HASH_THREADS = 4


@dataclass(frozen=True)
class ModelManifest:
    """A model's files, sorted by name. ``digest`` names the whole: the same files, the same
    digest, wherever they came from (a folder or the hub)."""

    files: tuple[FileDigest, ...]

    @classmethod
    def of(cls, files: Iterable[FileDigest]) -> ModelManifest:
        files = tuple(sorted(files, key=lambda f: f.name))
        names = [f.name for f in files]
        if len(set(names)) != len(names):
            raise ConfigError(f"a model lists a file twice: {names}")
        return cls(files)

    @property
    def digest(self) -> str:
        lines = "".join(f"{f.name} {f.sha256} {f.bytes}\n" for f in self.files)
        return hashlib.sha256(lines.encode()).hexdigest()

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.files)

    def by_name(self) -> dict[str, FileDigest]:
        return {f.name: f for f in self.files}


def is_model_file(name: str) -> bool:
    return not name.startswith(".") and any(fnmatch.fnmatch(name, p) for p in MODEL_PATTERNS)


def model_files(folder: Path) -> list[Path]:
    """The files of a model folder herd moves (top level; weights, configs, tokenizer)."""
    if not folder.is_dir():
        what = "a file" if folder.exists() else "it does not exist"
        raise ConfigError(f"{folder} is not a folder here ({what})",
                          hint="give a model folder, or a hub id")
    if not (folder / CONFIG).is_file():
        raise ConfigError(f"{folder} is not a model folder: it has no {CONFIG}",
                          hint="a model folder holds config.json, *.safetensors and a tokenizer")
    roots = link_roots(folder)
    files = sorted(p for p in folder.iterdir()
                   if is_model_file(p.name) and _contained(p, roots) and p.is_file())
    if not any(p.name.endswith(WEIGHTS_SUFFIX) for p in files):
        raise ConfigError(f"{folder} holds no *{WEIGHTS_SUFFIX} weights",
                          hint="herd moves safetensors weights only")
    return files


def link_roots(folder: Path) -> tuple[Path, ...]:
    """Where a model folder's symlinks may lead: inside the folder; for a hub cache snapshot
    (models--org--name/snapshots/<commit>/, each file a link to ../../blobs/<etag>), inside that
    repository's cache folder too."""
    folder = folder.resolve()
    repo = folder.parent.parent
    if folder.parent.name == "snapshots" and repo.name.startswith("models--"):
        return folder, repo.resolve(), (repo / "blobs").resolve()
    return (folder,)


def _contained(path: Path, roots: tuple[Path, ...]) -> bool:
    """True for a file (or a link that stays within ``roots``); a link leading anywhere else is
    refused by name: a cloned model repo can carry one to ~/.ssh/id_ed25519 or herd's own client
    key, and `herd models add` uploaded what it pointed to (an outside review)."""
    if not path.is_symlink():
        return True
    target = path.resolve()
    if any(target.is_relative_to(r) for r in roots):
        return True
    raise ConfigError(f"{path} is a link to {target}, outside the model folder {roots[0]}",
                      hint="herd moves only files inside the model folder: remove the link, or "
                      "copy the file in if it really belongs to the model")


def hash_file(path: Path, on_bytes: Callable[[int], None] | None = None) -> FileDigest:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(BLOCK_BYTES):
            h.update(block)
            size += len(block)
            if on_bytes:
                on_bytes(len(block))
    return FileDigest(path.name, h.hexdigest(), size)


def folder_manifest(folder: Path,
                    on_bytes: Callable[[int], None] | None = None) -> ModelManifest:
    """Every model file of ``folder``, hashed (``on_bytes``: progress, from several threads)."""
    paths = model_files(folder)
    with ThreadPoolExecutor(HASH_THREADS) as pool:
        return ModelManifest.of(pool.map(lambda p: hash_file(p, on_bytes), paths))


def fingerprint(files: Iterable[tuple[str, int]]) -> frozenset[tuple[str, int]]:
    """Names and sizes: cheap to compare before hashing anything."""
    return frozenset(files)


def stage_shards(index: dict[str, Any], piece: StagePiece, tied: bool) -> list[str]:
    """The shards holding a weight that stage ``piece`` owns (herd.stage_cut.owned_key)."""
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise ConfigError(f"{INDEX} has no weight_map")
    first, last = piece.index == 0, piece.index == piece.count - 1
    return sorted({shard for key, shard in weight_map.items()
                   if owned_key(key, piece.start, piece.end, first, last, tied) is not None})


def tied_embeddings(config: dict[str, Any]) -> bool:
    """Whether the head reuses the embedding (mlx-lm's default when config.json is silent)."""
    text = config.get("text_config") or {}
    return bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", True)))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tiktoken.model", "vocab.json")


def check_complete(names: set[str], index: dict[str, Any] | None, model: str) -> None:
    """ConfigError when a model's files lack what loading it needs: a shard its index names, or
    any tokenizer. Said at `herd models add` and `herd submit`: a rank found them missing only
    after placement, with transformers' or safetensors' own message (an outside run)."""
    weight_map = (index or {}).get("weight_map")
    if isinstance(weight_map, dict):
        missing = sorted(set(weight_map.values()) - names)
        if missing:
            raise ConfigError(f"model {model}: {INDEX} names shards it does not hold: "
                              f"{', '.join(missing)}",
                              hint="an interrupted download or copy: fetch the model again")
    if not any(n in names or n.endswith(".tiktoken") for n in TOKENIZER_FILES):
        raise ConfigError(f"model {model} has no tokenizer (none of "
                          f"{', '.join(TOKENIZER_FILES)})",
                          hint="copy the tokenizer files from the model's hub repository")


def needed_files(names: Iterable[str], config: dict[str, Any], index: dict[str, Any] | None,
                 piece: StagePiece | None) -> list[str]:
    """The files one rank needs: all of them for the whole model (``piece`` None); for a pipeline
    stage, every non-weight file and only the shards its blocks live in. Without an index the
    weights are one file, which every stage needs."""
    names = sorted(names)
    if piece is None or index is None:
        return names
    shards = stage_shards(index, piece, tied_embeddings(config))
    missing = [s for s in shards if s not in names]
    if missing:
        raise ConfigError(f"{INDEX} names shards the model does not hold: {missing}")
    return [n for n in names if not n.endswith(WEIGHTS_SUFFIX) or n in shards]
