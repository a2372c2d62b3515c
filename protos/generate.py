"""Regenerate the Python stubs for every .proto in protos/v1 (``make protos``).

The generated files are committed and never edited by hand; tests/test_protos.py regenerates them
into a temporary folder and fails when the committed ones are stale.
The .proto files declare ``package herd.v1``; their Python modules live at ``protos.v1``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos" / "v1"


def generate(out_dir: Path = ROOT) -> list[Path]:
    protos = sorted(PROTO_DIR.glob("*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p.relative_to(ROOT)) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return protos


if __name__ == "__main__":
    generated = generate()
    print(f"generated stubs for {len(generated)} protos", file=sys.stderr)
