"""Checkpoints: an mlx-lm adapter folder plus exact trainer state, written atomically.

Layout under ADAPTER_PATH::

    adapters.safetensors, adapter_config.json  the latest adapter (mlx_lm.generate --adapter-path)
    checkpoints/0000100/                       one folder per saved step, complete iff manifest.json
        adapters.safetensors, adapter_config.json
        trainer_state.safetensors              optimizer state (flattened tree)
        trainer_state.json                     iteration, tokens, seed, world size
        manifest.json                          {"step", "files": {name: {"sha256", "bytes"}}}
    checkpoints/latest                             the newest complete folder's name

A checkpoint is built in a temporary folder, fsynced, then renamed into place; ``latest`` and the
top-level adapter are replaced with os.replace. A crash at any point leaves the previous checkpoint
as the latest, never a half-written one.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from herd.digest import sha256_file

ADAPTERS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class TrainerState:
    iteration: int  # micro-batch iterations completed (mlx-lm's "iters" unit)
    trained_tokens: int
    seed: int
    world_size: int
    # mx.random's key after ``iteration`` (LoRA dropout's stream); None in checkpoints written
    # before it was saved, or by a pipeline stage (which reseeds per microbatch).
    random_key: tuple[int, int] | None = None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    _fsync(tmp)
    os.replace(tmp, path)


def write_manifest(folder: Path, step: int) -> dict:
    files = {
        p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {"step": step, "files": files}
    _atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=2))
    return manifest


def verify_manifest(folder: Path) -> dict:
    """The manifest, after checking every listed file's size and sha256 (ValueError if not)."""
    manifest = json.loads((folder / MANIFEST).read_text())
    for name, meta in manifest["files"].items():
        path = folder / name
        if (not path.is_file() or path.stat().st_size != meta["bytes"]
                or sha256_file(path) != meta["sha256"]):
            raise ValueError(f"checkpoint {folder}: {name} does not match its manifest")
    return manifest


def save_checkpoint(
    adapter_path: Path,
    model,
    optimizer,
    adapter_config: dict,
    state: TrainerState,
) -> Path:
    adapter_path = Path(adapter_path)
    root = adapter_path / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"{state.iteration:07d}"
    final = root / name
    tmp = root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()

    adapters = dict(tree_flatten(model.trainable_parameters()))
    opt_state = dict(tree_flatten(optimizer.state))
    mx.save_safetensors(str(tmp / ADAPTERS), adapters)
    mx.save_safetensors(str(tmp / STATE_TENSORS), opt_state)
    (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=4))
    (tmp / STATE_JSON).write_text(json.dumps(state.__dict__, indent=2))
    for p in tmp.iterdir():
        _fsync(p)
    write_manifest(tmp, state.iteration)

    if final.exists():  # re-saving the same step (a resumed run): replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    _atomic_write_text(root / "latest", name)
    # The top-level copy is what mlx_lm.generate --adapter-path loads.
    for fname in (ADAPTERS, ADAPTER_CONFIG):
        staged = adapter_path / f".{fname}.tmp"
        shutil.copyfile(final / fname, staged)
        os.replace(staged, adapter_path / fname)
    return final


def latest_checkpoint(adapter_path: Path) -> Path | None:
    root = Path(adapter_path) / "checkpoints"
    try:
        name = (root / "latest").read_text().strip()
    except FileNotFoundError:
        return None
    folder = root / name
    return folder if (folder / MANIFEST).exists() else None


def resolve_resume(path: Path) -> Path:
    """``--resume`` takes an adapter path (its latest checkpoint) or one checkpoint folder."""
    path = Path(path)
    if (path / MANIFEST).exists():
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"no complete checkpoint under {path}")
    return found


def load_checkpoint(folder: Path, model, optimizer) -> TrainerState:
    """Restore adapter weights and optimizer state in place; return the trainer state."""
    verify_manifest(folder)
    model.load_weights(str(folder / ADAPTERS), strict=False)
    optimizer.state = tree_unflatten(list(mx.load(str(folder / STATE_TENSORS)).items()))
    fields = json.loads((folder / STATE_JSON).read_text())
    if fields.get("random_key") is not None:
        fields["random_key"] = tuple(fields["random_key"])
    return TrainerState(**fields)
