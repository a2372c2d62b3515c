"""Joining pipeline stages' adapter pieces into one mlx-lm adapter folder.

Pure Python on the safetensors byte format (8-byte header length, JSON header, raw data), so the
caller needs neither MLX nor numpy (bfloat16 tensors are copied as bytes) — the coordinator, which
never computes on tensors, can run it on the pieces it stored.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from herd.errors import HerdError


def _read(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    return header, raw[8 + n:]


def merge_stage_adapters(stage_dirs: list[Path], out_dir: Path) -> Path:
    """Write ``out_dir/{adapters.safetensors, adapter_config.json}`` from the stages' folders
    (each: adapters.safetensors with full-model names, adapter_config.json, stage.json).
    Refuses a missing stage, a stage given twice, pieces of different jobs' layouts, and a tensor
    present in two pieces."""
    tensors: dict[str, tuple[dict, bytes]] = {}
    seen: set[int] = set()
    count = None
    for d in map(Path, stage_dirs):
        meta = json.loads((d / "stage.json").read_text())
        count = meta["stages"] if count is None else count
        if meta["stages"] != count or meta["stage"] in seen:
            raise HerdError(
                f"{d}: stage {meta['stage']} of {meta['stages']} does not belong with the others"
            )
        seen.add(meta["stage"])
        header, data = _read(d / "adapters.safetensors")
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if name in tensors:
                raise HerdError(f"{d}: {name} is in two stages' adapters")
            b, e = info["data_offsets"]
            tensors[name] = ({"dtype": info["dtype"], "shape": info["shape"]}, data[b:e])
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
    tmp = out_dir / "adapters.safetensors.tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in chunks:
            f.write(blob)
    tmp.replace(out_dir / "adapters.safetensors")
    config = (Path(stage_dirs[0]) / "adapter_config.json").read_text()
    (out_dir / "adapter_config.json").write_text(config)
    return out_dir
