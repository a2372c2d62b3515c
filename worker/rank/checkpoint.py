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

Taking a checkpoint is two parts so that training need not wait for the disk: ``snapshot`` (on
the training thread, between two steps) holds the adapter and optimizer arrays as they are then,
as NumPy views of MLX's own buffers: MLX arrays are immutable, an update makes new ones, and a held
array's buffer is never donated to another op, so the views stay the step's state while training
goes on. ``write_checkpoint`` writes a snapshot and touches no MLX (MLX's eval is not thread-safe;
mx.save_safetensors evaluates): it may run on a background thread (``BackgroundWriter``).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from herd.digest import sha256_file
from herd.errors import DISK_ERRNOS, StorageError

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
    # The data-parallel split in force (worker/rank/balance.py), and whether batches were packed
    # rows (a resume must batch as the run did).
    shares: list[int] | None = None
    packing: bool = False


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


# safetensors dtype names (https://github.com/huggingface/safetensors, the format's README)
_ST_DTYPES = {
    mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.float64: "F64",
    mx.int8: "I8", mx.int16: "I16", mx.int32: "I32", mx.int64: "I64", mx.uint8: "U8",
    mx.uint16: "U16", mx.uint32: "U32", mx.uint64: "U64", mx.bool_: "BOOL",
}


@dataclass(frozen=True)
class Tensor:
    dtype: str  # safetensors' name
    shape: tuple[int, ...]
    data: np.ndarray  # C-contiguous, a view of the MLX buffer where it can be


def capture(arrays: dict[str, mx.array]) -> dict[str, Tensor]:
    """Evaluated arrays as byte views, on the training thread (bfloat16, which NumPy lacks, is
    viewed as uint16: the same bytes)."""
    mx.eval(list(arrays.values()))
    out = {}
    for name, a in arrays.items():
        raw = a.view(mx.uint16) if a.dtype == mx.bfloat16 else a
        out[name] = Tensor(_ST_DTYPES[a.dtype], tuple(a.shape), np.ascontiguousarray(raw))
    return out


def write_safetensors(path: Path, tensors: dict[str, Tensor]) -> None:
    """The safetensors format: an 8-byte little-endian header size, a JSON header, the bytes.
    Written here rather than with the safetensors package, whose writer holds the GIL for the
    whole write (safetensors#541) and would stall the training thread; ``file.write`` of a NumPy
    buffer releases it."""
    header: dict = {"__metadata__": {"format": "mlx"}}
    offset = 0
    for name in sorted(tensors):
        t = tensors[name]
        header[name] = {"dtype": t.dtype, "shape": list(t.shape),
                        "data_offsets": [offset, offset + t.data.nbytes]}
        offset += t.data.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name in sorted(tensors):
            f.write(memoryview(tensors[name].data).cast("B"))


@dataclass(frozen=True)
class Snapshot:
    """A checkpoint's content as it was between two steps (see the module docstring)."""

    state: TrainerState
    adapters: dict[str, Tensor]
    optimizer: dict[str, Tensor]
    adapter_config: dict
    # more files for the top level of the adapter path: name -> tensors (a pipeline stage's
    # adapter under the full model's names) or text
    extra: dict[str, dict[str, Tensor] | str] = field(default_factory=dict)


def snapshot(model, optimizer, adapter_config: dict, state: TrainerState) -> Snapshot:
    return Snapshot(state, capture(dict(tree_flatten(model.trainable_parameters()))),
                    capture(dict(tree_flatten(optimizer.state))), adapter_config)


# Beyond the tensors' own bytes: JSON files, safetensors headers and the top-level adapter copy.
_SLACK_BYTES = 1 << 20


def _need_free(root: Path, snap: Snapshot) -> None:
    """A disk that cannot hold the checkpoint fails it now, with numbers, not halfway through.
    The adapter is written twice (the step's folder and the top-level copy)."""
    need = _SLACK_BYTES + sum(t.data.nbytes for t in (*snap.adapters.values(),
                                                       *snap.adapters.values(),
                                                       *snap.optimizer.values()))
    free = shutil.disk_usage(root).free
    if free < need:
        raise StorageError(
            f"checkpoint {snap.state.iteration} needs {need / 1e6:.1f} MB and the disk holding "
            f"{root} has {free / 1e6:.1f} MB free",
            hint="free space on that disk (old job folders under the worker's state dir) or "
            "point the worker's --state-dir at a larger one")


def write_checkpoint(adapter_path: Path, snap: Snapshot) -> Path:
    """Write ``snap`` as the checkpoint of its step, atomically, then make it the latest; no MLX
    call (safe on a background thread). A full or failing disk is a StorageError naming it."""
    try:
        return _write_checkpoint(Path(adapter_path), snap)
    except OSError as e:
        if e.errno not in DISK_ERRNOS:
            raise
        raise StorageError(f"checkpoint {snap.state.iteration} could not be written under "
                           f"{adapter_path}: {e.strerror}",
                           hint="free space on that disk or check it") from None


def _write_checkpoint(adapter_path: Path, snap: Snapshot) -> Path:
    state = snap.state
    root = adapter_path / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"{state.iteration:07d}"
    final = root / name
    tmp = root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)

    _need_free(root, snap)
    tmp.mkdir()
    write_safetensors(tmp / ADAPTERS, snap.adapters)
    write_safetensors(tmp / STATE_TENSORS, snap.optimizer)
    (tmp / ADAPTER_CONFIG).write_text(json.dumps(snap.adapter_config, indent=4))
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
    for fname, content in snap.extra.items():
        staged = adapter_path / f".{fname}.tmp"
        if isinstance(content, str):
            staged.write_text(content)
        else:
            write_safetensors(staged, content)
        os.replace(staged, adapter_path / fname)
    return final


def save_checkpoint(adapter_path: Path, model, optimizer, adapter_config: dict,
                    state: TrainerState) -> Path:
    """Snapshot and write, on this thread."""
    return write_checkpoint(adapter_path, snapshot(model, optimizer, adapter_config, state))


class BackgroundWriter:
    """Runs checkpoint writes on a background thread, one at a time: training goes on while a
    checkpoint is written (and, under the herd service, uploaded by the agent once its event is
    out). A write still running when the next is submitted is waited for first; a failed write
    raises in the training thread at the next ``submit`` or ``wait``."""

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, write: Callable[[], object]) -> None:
        self.wait()
        self._thread = threading.Thread(target=self._run, args=(write,),
                                        name="herd-checkpoint-writer")
        self._thread.start()

    def _run(self, write: Callable[[], object]) -> None:
        try:
            write()
        except BaseException as e:  # handed to the training thread, raised there
            self._error = e

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err


def latest_checkpoint(adapter_path: Path) -> Path | None:
    root = Path(adapter_path) / "checkpoints"
    try:
        name = (root / "latest").read_text().strip()
    except FileNotFoundError:
        return None
    folder = root / name
    return folder if (folder / MANIFEST).exists() else None


def resolve_resume(path: Path) -> Path | None:
    """``--resume`` takes an adapter path (its latest checkpoint) or one checkpoint folder;
    None when ``path`` holds no herd checkpoint (it may be an mlx-lm adapter:
    ``adapter_weights_file``)."""
    path = Path(path)
    if not path.is_dir():
        return None  # a file: an mlx-lm adapter's weights (or nothing, which loading names)
    if (path / MANIFEST).exists():
        return path
    return latest_checkpoint(path)


def adapter_weights_file(path: Path) -> Path:
    """The weights of an adapter as mlx-lm writes one: a ``.safetensors`` file
    (``resume_adapter_file``, or a ``0000100_adapters.safetensors`` checkpoint) or a folder
    holding ``adapters.safetensors``."""
    path = Path(path)
    if path.is_dir() and (path / ADAPTERS).is_file():
        return path / ADAPTERS
    if path.is_file():
        return path
    raise FileNotFoundError(
        f"{path} is neither a herd checkpoint, nor an adapter folder holding {ADAPTERS}, nor an "
        "adapter .safetensors file"
    )


def load_adapter_weights(path: Path, model) -> tuple[Path, list[str]]:
    """Load an mlx-lm adapter's weights into ``model`` (as mlx_lm.lora's resume_adapter_file:
    weights only, ``load_weights(strict=False)``): a tensor the job's model does not train (an
    adapter of more layers than ``num_layers``) is left out, as mlx-lm leaves it; returns the
    file and their names. ValueError naming each tensor of another shape (another rank), or
    when no tensor is the job's (another layout or fine_tune_type: nothing would be resumed)."""
    file = adapter_weights_file(path)
    weights = mx.load(str(file))
    trainable = dict(tree_flatten(model.trainable_parameters()))
    ignored = sorted(name for name in weights if name not in trainable)
    errors = [f"{name}: shape {tuple(w.shape)}, the job's is {tuple(trainable[name].shape)}"
              for name, w in weights.items()
              if name in trainable and w.shape != trainable[name].shape]
    if len(ignored) == len(weights):
        errors = [f"{name}: not a trainable parameter of this job's model" for name in ignored]
    if errors:
        shown = "\n  ".join(errors[:5]) + (f"\n  and {len(errors) - 5} more" if len(errors) > 5
                                            else "")
        raise ValueError(f"adapter {file} does not fit this job (fine_tune_type, num_layers, "
                         f"lora_parameters must match the run that wrote it):\n  {shown}")
    model.load_weights([(k, w) for k, w in weights.items() if k in trainable], strict=False)
    return file, ignored


def load_checkpoint(folder: Path, model, optimizer) -> TrainerState:
    """Restore adapter weights and optimizer state in place; return the trainer state."""
    verify_manifest(folder)
    model.load_weights(str(folder / ADAPTERS), strict=False)
    # The learning rate is the config's, not the one saved: the same on a plain resume, lower
    # after a rollback (cluster.lr_scale). A schedule recomputes it before every update anyway.
    lr = optimizer.state.get("learning_rate")
    optimizer.state = tree_unflatten(list(mx.load(str(folder / STATE_TENSORS)).items()))
    if lr is not None:
        optimizer.state["learning_rate"] = lr
    fields = json.loads((folder / STATE_JSON).read_text())
    if fields.get("random_key") is not None:
        fields["random_key"] = tuple(fields["random_key"])
    known = TrainerState.__dataclass_fields__
    fields = {k: v for k, v in fields.items() if k in known}
    return TrainerState(**fields)
