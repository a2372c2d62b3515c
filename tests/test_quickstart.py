"""The README's Quickstart, run as written: its bash block, line by line, in a copy of the
repository, with `herd` installed the way the block installs it (`uv tool install`, into a
temporary tool folder), on loopback, with a HOME of its own and nothing from the internet.

What is replaced, and only that: the coordinator's port (a free one, since 7450 may be taken on
a shared machine). The CLI finds that coordinator by zeroconf, as the README says."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, free_ports

pytestmark = pytest.mark.slow


def quickstart_block() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Quickstart"):]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def _copy_of_the_repo(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.splitlines()
    for name in files:
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def _tool_env(root: Path) -> dict:
    """`uv tool` installing into ``root`` only; the project's .venv is not on PATH (the installed
    command must stand alone). The lock's versions are pinned, so the install reads uv's cache."""
    lock = root / "constraints.txt"
    lock.write_text(subprocess.run(
        ["uv", "export", "--frozen", "--no-hashes", "--no-dev", "--no-emit-project", "--quiet"],
        cwd=REPO, capture_output=True, text=True, check=True).stdout)
    venv = str(Path(sys.executable).parent)
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != venv]
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "HERD_COORDINATOR", "HERD_LOG_LEVEL",
                        "PYTHONPATH")}
    env.update({"UV_TOOL_DIR": str(root / "tools"), "UV_TOOL_BIN_DIR": str(root / "bin"),
                "UV_CONSTRAINT": str(lock), "PATH": os.pathsep.join([str(root / "bin"), *path]),
                # The interpreter this suite runs on (HOME moves, so uv would not find its own).
                "UV_PYTHON": getattr(sys, "_base_executable", sys.executable),
                "HOME": str(root / "user"), "HF_HUB_OFFLINE": "1", "HF_HOME": str(root / "hf"),
                "UV_CACHE_DIR": os.environ.get("UV_CACHE_DIR", str(Path.home() / ".cache/uv"))})
    return env


@pytest.mark.timeout(900)
def test_the_readme_quickstart_runs_line_by_line(tmp_path):
    if shutil.which("uv") is None:
        pytest.skip("uv is not installed (make setup installs it)")
    block = quickstart_block()
    cfg = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    iters = cfg["iters"]
    work = tmp_path / "herd"
    _copy_of_the_repo(work)
    port = free_ports(1)[0]
    script = block.replace("herd coordinator &", f"herd coordinator --port {port} &")
    assert script.count(f"--port {port}") == 1
    # Line by line: stop at the first failing line and say which.
    script = "set -euo pipefail\ntrap 'echo \"QUICKSTART FAILED AT: $BASH_COMMAND\"' ERR\n" + script

    log = tmp_path / "quickstart.log"  # a file: the block's daemons hold its output open
    with open(log, "w") as f:
        proc = subprocess.Popen(["bash", "-c", script], cwd=work, env=_tool_env(tmp_path),
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        proc.wait(timeout=840)
    finally:  # the block's daemons, if it stopped before its kill line
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    out = log.read_text(errors="replace")
    print(out[-6000:])
    assert proc.returncode == 0, out[-6000:]
    home = tmp_path / "user" / ".herd"
    # The commands came from the installed tool, not the project's virtualenv.
    assert (tmp_path / "bin" / "herd").exists() and (tmp_path / "bin" / "mlx_lm.generate").exists()
    # Two agents on one machine: their own folders and ids, by default.
    assert (home / "worker" / "worker-id").read_text() != (home / "worker-2" / "worker-id")\
        .read_text()
    assert re.search(rf"planned for the cluster at 127\.0\.0\.1:{port} \(found by zeroconf\): "
                     r"2 worker\(s\)", out), out[-4000:]
    job = re.search(r"submitted (quickstart-[0-9a-f]{6})", out).group(1)
    assert f"{job}: state succeeded" in out and f"{job}: checkpoint {iters} stored" in out
    assert re.search(rf"iter +{iters}/{iters} +saved", out)  # the tail of `herd logs`
    # The validation loss fell (the tiny model learns tiny-data's pattern).
    val = [float(v) for v in re.findall(r"val[_ ]loss[ =:]+([0-9.]+)", out)]
    assert len(val) >= 2 and val[-1] < val[0], val
    assert (work / "adapters" / "adapters.safetensors").exists()
    assert "Generation:" in out  # mlx_lm.generate ran with the pulled adapter
    assert "PyTorch" not in out
