"""Joining pipeline stages' adapter pieces into one mlx-lm adapter folder.

Pure Python on the safetensors byte format (8-byte header length, JSON header, raw data), so the
caller needs neither MLX nor numpy (bfloat16 tensors are copied as bytes): the coordinator, which
never computes on tensors, runs it on the pieces its workers uploaded, and a pipeline's rank 0 on
the pieces of a shared disk.

A piece names its tensors either with the full model's block numbers (``stage.json`` pieces a
stage writes beside its checkpoints) or with stage-local ones (a stage's checkpoint, where block 0
is the stage's first block); ``AdapterPiece.layer_offset`` maps the latter back.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from herd.errors import HerdError
from herd.stage_cut import shift_block

ADAPTERS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class AdapterPiece:
    """One stage's adapter: ``folder`` holds adapters.safetensors and adapter_config.json."""

    folder: Path
    stage: int
    stages: int
    layer_offset: int = 0  # added to every block number (stage-local names -> the model's)


def _read(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    if len(raw) < 8:
        raise HerdError(f"{path}: not a safetensors file")
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    return header, raw[8 + n:]


def merge_pieces(pieces: list[AdapterPiece], out_dir: Path) -> Path:
    """Write ``out_dir/{adapters.safetensors, adapter_config.json}`` from every stage's piece.
    Refuses a missing stage, a stage given twice, pieces of different layouts, and a tensor
    present in two pieces. The adapter file is replaced atomically."""
    tensors: dict[str, tuple[dict, bytes]] = {}
    seen: set[int] = set()
    count = pieces[0].stages if pieces else None
    for p in pieces:
        if p.stages != count or p.stage in seen:
            raise HerdError(
                f"{p.folder}: stage {p.stage} of {p.stages} does not belong with the others")
        seen.add(p.stage)
        header, data = _read(Path(p.folder) / ADAPTERS)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            full = shift_block(name, p.layer_offset)
            if full in tensors:
                raise HerdError(f"{p.folder}: {full} is in two stages' adapters")
            b, e = info["data_offsets"]
            tensors[full] = ({"dtype": info["dtype"], "shape": info["shape"]}, data[b:e])
    if count is None or seen != set(range(count)):
        raise HerdError(f"stages {sorted(seen)} of {count}: some stage's adapter is missing")
    header, chunks, offset = {}, [], 0
    for name in sorted(tensors):
        info, blob = tensors[name]
        header[name] = {**info, "data_offsets": [offset, offset + len(blob)]}
        chunks.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format aligns the data to 8 bytes
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f"{ADAPTERS}.tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in chunks:
            f.write(blob)
    tmp.replace(out_dir / ADAPTERS)
    first = min(pieces, key=lambda p: p.stage)
    (out_dir / ADAPTER_CONFIG).write_text((Path(first.folder) / ADAPTER_CONFIG).read_text())
    return out_dir


def merge_stage_adapters(stage_dirs: list[Path], out_dir: Path) -> Path:
    """Merge the pieces a pipeline writes beside its stage checkpoints (each folder:
    adapters.safetensors with the model's names, adapter_config.json, stage.json)."""
    pieces = []
    for d in map(Path, stage_dirs):
        meta = json.loads((d / "stage.json").read_text())
        pieces.append(AdapterPiece(d, int(meta["stage"]), int(meta["stages"])))
    return merge_pieces(pieces, out_dir)
