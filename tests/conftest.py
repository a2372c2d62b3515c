"""Shared fixtures: tiny real models and datasets, built once per session (nothing is
downloaded)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from herd.rpc.ports import free_ports  # noqa: F401 (tests import it from here)

# mx.compile JIT-compiles C++ on the CPU backend: ~25 s per new shape set, for identical numbers.
# Tests run uncompiled (subprocesses inherit this); tests/test_training.py checks the compiled path
# once.
os.environ.setdefault("MLX_DISABLE_COMPILE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HERD_LOG_LEVEL", "warning")
# Nothing in the suite may reach the internet (only package registries are reachable, and a test
# must not depend on the hub): the hub and datasets read their caches only, Ray and wandb stay
# local. Subprocesses inherit these; a test that needs another value sets it explicitly.
for _key, _value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
                     "RAY_USAGE_STATS_ENABLED": "0"}.items():
    os.environ.setdefault(_key, _value)

REPO = Path(__file__).resolve().parent.parent

# `pytest -n 2 --dist loadgroup` (what `make test` runs) runs the suite as two streams side by
# side (pytest-xdist): run as one stream, a third of its time the CPUs wait
# (cuts healing, watchdogs, ranks starting), and one stream fills the other's waits. The
# streams must not see each other, so they split by what they share:
# - "apart": modules whose processes live in their own network namespaces (tests/netns.py; their
#   zeroconf and ports are invisible from here), and modules that train without any coordinator
#   or advert (local rings on loopback ports only);
# - "loopback": everything else, in one stream in file order as before: coordinators, workers and
#   adverts on this machine's loopback, the Ray cluster, the default coordinator port, the /proc
#   scans that look for a job's ranks.
# A module not listed goes to "loopback" (the safe side); plain `pytest` runs it all as one.
APART = {"test_faults_multihost", "test_network_e2e", "test_netns", "test_training",
         "test_pipeline", "test_drop_in", "test_packing", "test_balance", "test_planner",
         "test_cli_local"}


def stream_of(nodeid: str) -> str:
    module = Path(nodeid.split("::", 1)[0]).stem
    return "apart" if module in APART else "loopback"


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """The two streams as xdist work units (xdist's own xdist_group marks are lost on pytest 9,
    which no longer lets a plugin rename a test: the scheduler groups by the test's module here)."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class TwoStreams(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return stream_of(nodeid)

    return TwoStreams(config, log)


def pids_of(*markers: str) -> list[int]:
    """Processes whose command line (arguments joined by spaces) holds every one of ``markers``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if all(m in cmd for m in markers):
                pids.append(int(proc.name))
    return pids


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@pytest.fixture(params=["default", "Haswell"])
def blas_kernels(request, monkeypatch):
    """Run an equality test on OpenBLAS's own kernel choice for this CPU and on its Haswell (AVX2)
    kernels: some machines here set OPENBLAS_CORETYPE=Haswell in the environment CI inherits, others
    nothing, and the two round differently. The training subprocesses read it at start."""
    if request.param == "default":
        monkeypatch.delenv("OPENBLAS_CORETYPE", raising=False)
        monkeypatch.delenv("OPENBLAS_L2_SIZE", raising=False)
    elif "avx2" not in _cpu_flags():
        pytest.skip("OpenBLAS's Haswell kernels need an x86 CPU with AVX2")
    else:
        monkeypatch.setenv("OPENBLAS_CORETYPE", request.param)
    return request.param


@pytest.fixture(scope="session")
def cluster_ca(tmp_path_factory):
    """A cluster CA for the tests' servers and clients; ``cluster_ca.issue(role, name)`` gives an
    identity (herd/rpc/pki.py)."""
    from herd.rpc import pki

    return pki.Authority.create(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from herd.cli.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "llama", arch="llama", layers=2,
                           hidden=64)


@pytest.fixture(scope="session")
def tiny_model_16(tmp_path_factory) -> Path:
    """16 blocks: mlx-lm's example config trains the last 16 (and refuses fewer)."""
    from herd.cli.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "llama-16", arch="llama",
                           layers=16, hidden=64)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    from herd.cli.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "qwen2", arch="qwen2", layers=2,
                           hidden=64)


@pytest.fixture(scope="session")
def tiny_bf16(tmp_path_factory) -> Path:
    from herd.cli.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "llama-bf16", arch="llama", layers=2,
                           hidden=64, dtype="bfloat16")


@pytest.fixture(scope="session")
def tiny_quantized(tmp_path_factory, tiny_model) -> Path:
    """A 4-bit copy made by mlx-lm's own converter (a pre-quantized folder, as from the hub)."""
    from mlx_lm import convert

    out = tmp_path_factory.mktemp("models") / "llama-4bit"
    convert(str(tiny_model), str(out), quantize=True, q_bits=4, q_group_size=64)
    return out


@pytest.fixture(scope="session")
def tiny_quantized8(tmp_path_factory, tiny_model) -> Path:
    """An 8-bit copy made by mlx-lm's own converter."""
    from mlx_lm import convert

    out = tmp_path_factory.mktemp("models") / "llama-8bit"
    convert(str(tiny_model), str(out), quantize=True, q_bits=8, q_group_size=64)
    return out


@pytest.fixture(scope="session")
def tiny_tools_model(tmp_path_factory, tiny_model) -> Path:
    """The tiny model with a chat template that renders ``tools`` (the shipped one ignores it)."""
    import shutil

    out = tmp_path_factory.mktemp("models") / "llama-tools"
    shutil.copytree(tiny_model, out)
    template = out / "chat_template.jinja"  # where transformers saves a tokenizer's template
    template.write_text("{% if tools %}<|system|>{{ tools | tojson }}<|end|>\n{% endif %}"
                        + template.read_text())
    return out


def reformat_data(src: Path, out: Path, record) -> Path:
    """A copy of a data folder with every record passed through ``record``."""
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid", "test"):
        lines = (src / f"{split}.jsonl").read_text().splitlines()
        (out / f"{split}.jsonl").write_text(
            "".join(json.dumps(record(json.loads(line))) + "\n" for line in lines))
    return out


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    from herd.cli.tiny import make_tiny_data

    return make_tiny_data(tmp_path_factory.mktemp("data") / "text", fmt="text", train=64, valid=16,
                          test=8)


@pytest.fixture(scope="session")
def tiny_chat_data(tmp_path_factory) -> Path:
    from herd.cli.tiny import make_tiny_data

    return make_tiny_data(tmp_path_factory.mktemp("data") / "chat", fmt="chat", train=64, valid=16,
                          test=8)


@pytest.fixture(scope="session")
def tiny_completions_data(tmp_path_factory) -> Path:
    from herd.cli.tiny import make_tiny_data

    return make_tiny_data(tmp_path_factory.mktemp("data") / "completions", fmt="completions",
                          train=64, valid=16, test=8)


@pytest.fixture(scope="session")
def start_adapter(tmp_path_factory, tiny_model) -> Path:
    """An adapter file as mlx-lm writes one (write_job's LoRA layout, random weights)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from herd.config import parse_config
    from worker.rank.model import apply_adapters, load_base

    job = parse_config({"model": str(tiny_model), "num_layers": -1, "train": True,
                        "lora_parameters": {"rank": 4, "scale": 10.0}})
    model, _ = load_base(job)
    apply_adapters(model, job)
    mx.random.seed(1)
    weights = {k: mx.random.normal(v.shape) * 0.01
               for k, v in tree_flatten(model.trainable_parameters())}
    out = tmp_path_factory.mktemp("start") / "adapters.safetensors"
    mx.save_safetensors(str(out), weights)
    return out


def write_job(path: Path, model: Path, data: Path, **overrides) -> Path:
    """A small job YAML in mlx_lm.lora's keys."""
    job = {
        "model": str(model),
        "data": str(data),
        "train": True,
        "fine_tune_type": "lora",
        "num_layers": -1,
        "batch_size": 4,
        "iters": 8,
        "learning_rate": 1e-3,
        "steps_per_report": 4,
        "steps_per_eval": 1000,
        "val_batches": 2,
        "save_every": 4,
        "seed": 7,
        "max_seq_length": 128,
        "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.0},
        "adapter_path": str(path.parent / "adapters"),
    }
    job.update(overrides)
    path.write_text(yaml.safe_dump(job))
    return path


def herd(*args: str, env: dict | None = None, timeout: float = 240, check: bool = True, cwd=None):
    """Run the real `herd` CLI in a subprocess."""
    proc = subprocess.run(
        [sys.executable, "-m", "herd", *map(str, args)],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"herd {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                             f"{proc.stderr[-4000:]}")
    return proc


def up_worker_ids(home: Path, n: int) -> list[str]:
    """The ids `herd up` gives its ``n`` workers with the CA in ``home``/tls."""
    from herd.cli.up import worker_id
    from herd.rpc import pki

    ca = pki.Authority.load(home / "tls")
    return [worker_id(ca, i) for i in range(1, n + 1)]


def start_ranks(argv: list[str], world: int, extra_env: dict | None = None,
                hostfile_dir: Path | None = None, command: tuple[str, ...] = ("-m", "herd")):
    """Start `world` ranks of `python -m herd ...` (or `python COMMAND ...`) directly (MLX_RANK +
    MLX_HOSTFILE, as FACTS.md advises)."""
    ports = free_ports(world)
    hostfile = (hostfile_dir or Path(os.environ.get("TMPDIR", "/tmp"))) / f"hosts-{ports[0]}.json"
    hostfile.write_text(json.dumps([f"127.0.0.1:{p}" for p in ports]))
    procs = []
    for r in range(world):
        env = {
            **os.environ,
            "MLX_RANK": str(r),
            "MLX_WORLD_SIZE": str(world),
            "MLX_HOSTFILE": str(hostfile),
            **(extra_env or {}),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, *command, *argv], env=env,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
        )
    return procs


def wait_all(procs, timeout: float = 240) -> list[str]:
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            if p.returncode != 0:
                raise AssertionError(f"rank exited {p.returncode}:\n{err[-4000:]}")
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return outs


def load_adapter(path: Path) -> dict:
    import mlx.core as mx

    return dict(mx.load(str(Path(path) / "adapters.safetensors")))


def max_abs_diff(a: dict, b: dict) -> float:
    import mlx.core as mx

    assert sorted(a) == sorted(b), f"different tensors: {sorted(set(a) ^ set(b))}"
    return max(mx.abs(a[k].astype(mx.float32) - b[k].astype(mx.float32)).max().item() for k in a)


# Equal updates, N processes vs one. N ranks, pipeline stages, microbatches or a compiled graph
# sum the same per-token terms as one process in another order: float32 rounding only, which
# no bound on absolute differences captures on every BLAS kernel. Adam divides each gradient
# entry by its own running size, so a rounding difference in a near-zero entry becomes a step of
# up to +-lr; these tests therefore compare updates where the update is linear in the gradient
# (SGD), at a learning rate where the training dynamics contract perturbations instead of
# amplifying them. There, N ranks agree with one process to ~3e-7 of how far training moved the
# adapter (measured over 8 and 120 steps, OpenBLAS's Haswell and AVX-512 kernels alike), while
# averaging by rank instead of by tokens is off by 3e-2 to 6e-2 of it. (At 2.5x this learning
# rate, 120 steps amplify rounding to ~2e-4: the bound holds for this rate, not for any.)
SAME_UPDATE = {"optimizer": "sgd", "learning_rate": 2e-3}
SAME_UPDATE_RTOL = 1e-5


def initial_adapter(cfg: Path) -> dict:
    """The adapter a job starts from (its LoRA init, drawn from the seed), built in this process."""
    from mlx.utils import tree_flatten

    from herd.config import load_config
    from worker.rank.model import apply_adapters, load_base

    job = load_config(str(cfg), {})
    model, _ = load_base(job)
    apply_adapters(model, job)
    return dict(tree_flatten(model.trainable_parameters()))


def update_diff(got: dict, want: dict, start: dict) -> float:
    """max |got - want| relative to how far training moved ``want`` from ``start``."""
    moved = max_abs_diff(want, start)
    assert moved > 1e-4, f"training barely moved the adapter ({moved})"
    return max_abs_diff(got, want) / moved
