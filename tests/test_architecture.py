"""The dependency rules of STYLE.md and DESIGN.md, checked on the source (a test that fails when
someone breaks them)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("herd", "coordinator", "worker", "protos")

# The training core is pure MLX: it reports through a callback and never talks to the network
# itself. That is the whole rank package, and the exchange's interface and reduction.
TRAINING_CORE = sorted((REPO / "worker" / "rank").glob("*.py")) + [
    REPO / "worker" / "exchange" / "__init__.py"]
FORBIDDEN_IN_CORE = {"grpc", "google", "protos", "zeroconf", "ray", "structlog", "coordinator"}

# Modules above the budget, each with the reason it is one module.
MODULE_BUDGET = 400
OVER_BUDGET = {
    "herd/config.py": "the job schema: every mlx-lm key, herd's section and their cross-checks in "
    "one pydantic model that `herd check`, the coordinator and every rank parse alike",
    "herd/dataset.py": "follows mlx-lm's loader format by format and reports every problem of a "
    "file in one pass; its record checks, token counts and report change together with it",
    "worker/exchange/grpc/__init__.py": "the group's lifecycle and the client half of the ring: "
    "every state change happens under one lock, next to the grpcio behaviours its comments record "
    "(the server half is already server.py)",
}

# Where protobuf may be imported: the edges that convert, serve or call (and the exchange, whose
# hand-encoded wire format is its own edge). Never in the scheduler, placement, the planner, the
# rank or the pipeline.
PROTO_EDGES = {
    "coordinator/convert.py", "coordinator/service.py", "coordinator/worker_client.py",
    "coordinator/join.py",  # JoinService, the join port's servicer
    "worker/agent/convert.py", "worker/agent/service.py", "worker/agent/coordinator_client.py",
}
PROTO_EDGE_FOLDERS = ("herd/rpc/", "herd/cli/", "worker/exchange/grpc/", "protos/")
NEVER_PROTOS = ("coordinator/scheduler.py", "coordinator/placement.py", "coordinator/planner/",
                "worker/rank/", "worker/pipeline/")


def modules(*packages: str) -> list[Path]:
    """Source modules (generated stubs excluded)."""
    return [p for pkg in packages for p in sorted((REPO / pkg).rglob("*.py"))
            if not p.name.endswith(("_pb2.py", "_pb2_grpc.py"))]


def rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def imported_modules(path: Path) -> set[str]:
    """Full dotted names imported (``from a.b import c`` gives ``a.b`` and ``a.b.c``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return found


def strings(path: Path) -> list[str]:
    """The string constants of a module, docstrings left out (prose may name any module)."""
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in [tree, *ast.walk(tree)]:
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
            and isinstance(n.value, str) and id(n) not in docstrings]


def test_training_core_imports_no_network_or_logging():
    for path in TRAINING_CORE:
        bad = imports(path) & FORBIDDEN_IN_CORE
        assert not bad, f"{rel(path)} imports {bad}"


def test_planes_do_not_import_each_other():
    for plane, other in (("coordinator", "worker"), ("worker", "coordinator")):
        for path in (REPO / plane).rglob("*.py"):
            assert other not in imports(path), f"{path.relative_to(REPO)} imports {other}"
    for path in (REPO / "herd").rglob("*.py"):
        if path.is_relative_to(REPO / "herd" / "cli"):  # the composition root names both planes
            continue
        bad = imports(path) & {"coordinator", "worker"}
        assert not bad, f"{path.relative_to(REPO)} imports {bad}: herd/ is the shared vocabulary"


def test_nothing_outside_the_cli_names_a_plane_module_even_as_a_string():
    """A module path in a string is an import by another name (importlib, ``python -m``): only
    herd/cli/ composes the planes. A plane may name its own modules (the agent starts
    ``python -m worker.rank``), never the other plane's."""
    named = re.compile(r"(?<![\w.-])(coordinator|worker)\.[a-z]")
    rules = [("herd", {"coordinator", "worker"}), ("coordinator", {"worker"}),
             ("worker", {"coordinator"})]
    for package, forbidden in rules:
        for path in modules(package):
            if path.is_relative_to(REPO / "herd" / "cli"):
                continue
            for text in strings(path):
                for m in named.finditer(text):
                    assert m.group(1) not in forbidden, f"{rel(path)} names {text!r}"


def test_the_rank_the_exchange_and_the_pipeline_never_import_the_agent():
    for package in ("worker/rank", "worker/exchange", "worker/pipeline"):
        for path in modules(package):
            bad = {m for m in imported_modules(path) if m.startswith("worker.agent")}
            assert not bad, f"{rel(path)} imports {bad}: the agent runs the rank, not the reverse"


def test_the_agent_imports_no_mlx():
    """The agent daemon never loads MLX (a fresh interpreter, every agent module imported)."""
    probe = (
        "import pkgutil, sys, importlib, worker.agent\n"
        "for m in pkgutil.iter_modules(worker.agent.__path__, 'worker.agent.'):\n"
        "    importlib.import_module(m.name)\n"
        "loaded = sorted(m for m in sys.modules if m == 'mlx' or m.startswith('mlx.'))\n"
        "assert not loaded, loaded\n"
        "assert 'worker.agent.main' in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_protos_are_imported_only_at_the_edges():
    for path in modules("herd", "coordinator", "worker"):
        name = rel(path)
        if "protos" not in imports(path):
            continue
        assert name in PROTO_EDGES or name.startswith(PROTO_EDGE_FOLDERS), (
            f"{name} imports protos: convert at the edge (a convert, service or client module)")
    for name in PROTO_EDGES:
        assert not name.startswith(NEVER_PROTOS), name


def test_modules_stay_within_the_budget():
    """About 400 lines a module (STYLE.md); a longer one is listed above with its reason, and an
    entry that is no longer needed is removed."""
    sizes = {rel(p): len(p.read_text().splitlines()) for p in modules(*PACKAGES)}
    over = {name: n for name, n in sizes.items() if n > MODULE_BUDGET}
    unexplained = {name: n for name, n in over.items() if name not in OVER_BUDGET}
    assert not unexplained, f"modules over {MODULE_BUDGET} lines: {unexplained}"
    stale = [name for name in OVER_BUDGET if name not in over]
    assert not stale, f"no longer over the budget, drop from OVER_BUDGET: {stale}"


def test_no_module_is_a_grab_bag():
    for plane in ("herd", "coordinator", "worker"):
        for path in (REPO / plane).rglob("*.py"):
            assert path.name not in {"utils.py", "helpers.py", "misc.py"}, path
