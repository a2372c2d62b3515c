"""The dependency rules of STYLE.md, checked on the source (a test that fails when someone breaks
them)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# The training core is pure MLX: it reports through a callback and never talks to the network
# itself.
TRAINING_CORE = ["worker/rank/trainer.py", "worker/rank/batches.py", "worker/exchange/__init__.py",
                 "worker/rank/model.py", "worker/rank/checkpoint.py"]
FORBIDDEN_IN_CORE = {"grpc", "google", "protos", "zeroconf", "ray", "structlog", "coordinator"}


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_training_core_imports_no_network_or_logging():
    for rel in TRAINING_CORE:
        bad = imports(REPO / rel) & FORBIDDEN_IN_CORE
        assert not bad, f"{rel} imports {bad}"


def test_planes_do_not_import_each_other():
    for plane, other in (("coordinator", "worker"), ("worker", "coordinator")):
        for path in (REPO / plane).rglob("*.py"):
            assert other not in imports(path), f"{path.relative_to(REPO)} imports {other}"
    for path in (REPO / "herd").rglob("*.py"):
        if path.is_relative_to(REPO / "herd" / "cli"):  # the composition root names both planes
            continue
        bad = imports(path) & {"coordinator", "worker"}
        assert not bad, f"{path.relative_to(REPO)} imports {bad}: herd/ is the shared vocabulary"


def test_no_module_is_a_grab_bag():
    for plane in ("herd", "coordinator", "worker"):
        for path in (REPO / plane).rglob("*.py"):
            assert path.name not in {"utils.py", "helpers.py", "misc.py"}, path
