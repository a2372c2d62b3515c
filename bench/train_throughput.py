"""Training throughput: herd vs mlx_lm.lora, 2 ranks vs 1, OpenBLAS vs reference BLAS.

Run by hand (not a test):  uv run python bench/train_throughput.py [--iters 16] [--quick]
Writes bench/results/train-throughput-<date>.md with the machine noted. Every ratio compares two
runs made in this one invocation, on this machine.

- herd vs mlx_lm.lora: same ~100M llama-shaped model, data, config and seed, one process each,
  both compiled (the production path). mlx_lm.lora's own train() is called through its own
  train_model() with a callback to read its tokens/sec; herd runs as the CLI (`herd train`).
- herd's data parallelism vs mlx_lm.lora's own (2 ranks each, the same launcher and pinning,
  the same global batch).
- 2 ranks vs 1 rank, each rank pinned to its own core (taskset, OPENBLAS_NUM_THREADS=1), ranks
  started directly with MLX_RANK + MLX_HOSTFILE (shared/FACTS.md: mlx.launch's relaying costs).
- OpenBLAS preloaded vs not, on a smaller model (the reference BLAS is ~25x slower).
Throughput excludes the first report window (compilation of new shapes).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from herd.cli.tiny import ANIMALS, facts, make_tiny_model  # noqa: E402
from herd.rpc.ports import free_ports  # noqa: E402 (after the path)


def long_text_data(out: Path, n_train: int = 256, words: int = 300, seed: int = 0) -> Path:
    """Records of ~`words` words (a few hundred tokens), so matmuls, not overheads, dominate."""
    out.mkdir(parents=True, exist_ok=True)
    rng, table = random.Random(seed), facts()
    for split, n in (("train", n_train), ("valid", 16)):
        with open(out / f"{split}.jsonl", "w") as f:
            for _ in range(n):
                k = rng.randint(words // 2, words)
                text = " ".join(f"the {a} is {table[a]}." for a in rng.choices(ANIMALS, k=k // 4))
                f.write(json.dumps({"text": text}) + "\n")
    return out


def job(path: Path, model: Path, data: Path, iters: int, adapter: Path, **kw) -> Path:
    cfg = {
        "model": str(model), "data": str(data), "train": True, "fine_tune_type": "lora",
        "num_layers": -1, "batch_size": 4, "iters": iters, "learning_rate": 1e-4,
        "steps_per_report": 4, "steps_per_eval": 100000, "val_batches": 1, "save_every": iters,
        "seed": 0, "max_seq_length": 512, "adapter_path": str(adapter),
        "lora_parameters": {"rank": 8, "scale": 20.0, "dropout": 0.0},
    }
    cfg.update(kw)
    path.write_text(yaml.safe_dump(cfg))
    return path


def steady_tok_s(events: list[dict], skip: int = 1) -> float:
    train = [e for e in events if e.get("event") == "train"][skip:]  # skip the compile window
    seconds = sum(e["step_seconds"] for e in train)
    return sum(e["tokens_per_second"] * e["step_seconds"] for e in train) / seconds


def run_herd(cfg: Path, ranks: int = 1, pin: bool = False, env_extra: dict | None = None,
             python: list[str] | None = None, skip_windows: int = 1) -> dict:
    """``herd train`` on ``ranks`` directly started ranks; ``python``: the command that runs
    herd's CLI (default ``python -m herd``)."""
    metrics = cfg.with_suffix(".jsonl")
    metrics.unlink(missing_ok=True)
    base_env = {**os.environ, **(env_extra or {})}
    procs, t0 = [], time.perf_counter()
    if ranks > 1:
        ports = free_ports(ranks)
        hostfile = cfg.with_suffix(".hosts.json")
        hostfile.write_text(json.dumps([f"127.0.0.1:{p}" for p in ports]))
    for r in range(ranks):
        env = dict(base_env)
        if ranks > 1:
            env.update(MLX_RANK=str(r), MLX_WORLD_SIZE=str(ranks), MLX_HOSTFILE=str(hostfile),
                       HERD_RANK=str(r),
                       HERD_EXCHANGE_PEERS=",".join(f"127.0.0.1:{p + 1000}" for p in ports))
            env.setdefault("HERD_RANK_TLS", rank_tls(cfg.parent))
        cmd = [*(python or [sys.executable, "-m", "herd"]), "train", str(cfg), "--quiet",
               "--metrics-file", str(metrics)]
        procs.append(start_rank(cmd, env, r, pin))
    wait_ranks(procs, "herd train")
    wall = time.perf_counter() - t0
    events = [json.loads(line) for line in metrics.read_text().splitlines()]
    events = [e for e in events if e.get("rank", 0) == 0]
    train = [e for e in events if e.get("event") == "train"][skip_windows:]
    share = sum(e["exchange_seconds"] for e in train) / sum(e["step_seconds"] for e in train)
    splits = sorted({tuple(e["shares"]) for e in train if e.get("shares")})
    return {"tok_s": steady_tok_s(events, skip_windows), "wall_s": wall, "exchange_share": share,
            "shares": splits}


def start_rank(cmd: list[str], env: dict, rank: int, pin: bool) -> subprocess.Popen:
    """One rank's process; ``pin``: on its own core (taskset) with one BLAS thread."""
    if pin:
        env = {**env, "OPENBLAS_NUM_THREADS": "1"}
        cmd = ["taskset", "-c", str(rank % os.cpu_count()), *cmd]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def wait_ranks(procs: list[subprocess.Popen], what: str) -> None:
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            raise SystemExit(f"{what} failed:\n{err[-3000:]}")


def rank_tls(folder: Path) -> str:
    """One job attempt's rank credential (what a worker agent hands its rank), made once."""
    from herd.rpc import pki

    tls = folder / "rank-tls"
    if not (tls / "rank.pem").exists():
        pki.Authority.create(tls / "ca").issue("rank", pki.rank_scope("bench", 1)).save(
            tls, "rank")
    return str(tls)


MLX_LM_RUNNER = r"""
import json, sys, types, yaml, numpy as np
from mlx_lm import lora
from mlx_lm.tuner.datasets import load_dataset
from mlx_lm.utils import load
cfg = yaml.safe_load(open(sys.argv[1]))
args = dict(lora.CONFIG_DEFAULTS); args.update(cfg); args = types.SimpleNamespace(**args)
events = []
class CB:
    def on_train_loss_report(self, info):
        seconds = args.steps_per_report / info["iterations_per_second"]
        events.append({"event": "train", **info, "step_seconds": seconds})
    def on_val_loss_report(self, info): pass
np.random.seed(args.seed)
model, tok = load(args.model)
train_set, valid_set, _ = load_dataset(args, tok)
lora.train_model(args, model, train_set, valid_set, training_callback=CB())
json.dump(events, open(sys.argv[2], "w"))
"""


def run_mlx_lm(cfg: Path, ranks: int = 1, pin: bool = False) -> dict:
    """mlx_lm.lora's own train(); with ``ranks`` > 1 its own data parallelism (each rank takes
    ``batch[rank::size]`` of the global batch and gradients are averaged with
    ``average_gradients``), ranks started directly with MLX_RANK + MLX_HOSTFILE as run_herd
    starts herd's, pinned the same way. Its reported tokens/s is the global figure, as herd's."""
    from worker.rank.runtime import preload_env

    outs = [cfg.with_suffix(f".mlxlm{r}.json") for r in range(ranks)]
    base = preload_env()
    if ranks > 1:
        hostfile = cfg.with_suffix(".mlxlm-hosts.json")
        hostfile.write_text(json.dumps([f"127.0.0.1:{p}" for p in free_ports(ranks)]))
    t0, procs = time.perf_counter(), []
    for r in range(ranks):
        env = dict(base)
        if ranks > 1:
            env.update(MLX_RANK=str(r), MLX_WORLD_SIZE=str(ranks), MLX_HOSTFILE=str(hostfile))
        procs.append(start_rank([sys.executable, "-c", MLX_LM_RUNNER, str(cfg), str(outs[r])],
                                env, r, pin))
    wait_ranks(procs, "mlx_lm.lora")
    return {"tok_s": steady_tok_s(json.loads(outs[0].read_text())),
            "wall_s": time.perf_counter() - t0}


def machine() -> str:
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    import mlx.core as mx
    return (f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} cores, "
            f"Python {platform.python_version()}, mlx {mx.__version__}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--skip", default="", help="comma list of: mlxlm,ranks,dp,blas,exchange")
    ap.add_argument("--note", default="")
    ap.add_argument("--suffix", default="", help="appended to the results file name")
    a = ap.parse_args()
    skip = set(filter(None, a.skip.split(",")))
    tmp = Path(tempfile.mkdtemp(prefix="herd-bench-"))
    model = make_tiny_model(tmp / "model", "llama", layers=a.layers, hidden=a.hidden,
                            intermediate=a.hidden * 4)
    n_params = sum(os.path.getsize(model / "model.safetensors") for _ in [0]) // 4
    data = long_text_data(tmp / "data")
    rows, notes = [], []

    def compare(what: str, ours: dict, base: dict, goal: str) -> None:
        rows.append((what, f"{ours['tok_s']:.1f}", f"{base['tok_s']:.1f}",
                     ours["tok_s"] / base["tok_s"], goal))

    if "mlxlm" not in skip:
        h = run_herd(job(tmp / "h.yaml", model, data, a.iters, tmp / "h"))
        m = run_mlx_lm(job(tmp / "m.yaml", model, data, a.iters, tmp / "m"))
        compare("herd (1 process) vs mlx_lm.lora", h, m, "≥ 1.0")
    if "ranks" not in skip:
        one = run_herd(job(tmp / "r1.yaml", model, data, a.iters, tmp / "r1"), ranks=1, pin=True)
        two = run_herd(job(tmp / "r2.yaml", model, data, a.iters, tmp / "r2",
                           cluster={"exchange": "mlx"}), ranks=2, pin=True)
        compare("2 ranks vs 1 rank, 1 core each", two, one, "≥ 1.9")
    if "exchange" not in skip:
        # The same 2-rank pinned run over each transport: throughput and the share of step time
        # spent in the exchange (gradient all-reduce, including waiting for the slower rank).
        mlx = run_herd(job(tmp / "x1.yaml", model, data, a.iters, tmp / "x1",
                           cluster={"exchange": "mlx"}), ranks=2, pin=True)
        grpc = run_herd(job(tmp / "x2.yaml", model, data, a.iters, tmp / "x2",
                            cluster={"exchange": "grpc"}), ranks=2, pin=True)
        compare("2 ranks: gRPC exchange vs MLX ring", grpc, mlx, "≥ 0.9")
        notes.append(f"Exchange share of step time, 2 ranks: MLX ring {mlx['exchange_share']:.1%}, "
                     f"gRPC {grpc['exchange_share']:.1%}.")
    if "dp" not in skip:
        # Data parallelism against data parallelism: the same launcher (ranks started directly,
        # one core each), the same global batch; mlx-lm averages per-rank means, herd sums
        # token-weighted gradients (the exact update).
        herd_dp = run_herd(job(tmp / "d1.yaml", model, data, a.iters, tmp / "d1",
                               cluster={"exchange": "mlx"}), ranks=2, pin=True)
        mlx_dp = run_mlx_lm(job(tmp / "d2.yaml", model, data, a.iters, tmp / "d2"), ranks=2,
                            pin=True)
        compare("2 ranks: herd DP vs mlx_lm.lora's own DP, 1 core each", herd_dp, mlx_dp, "≥ 1.0")
    if "blas" not in skip:
        small = make_tiny_model(tmp / "small", "llama", layers=4, hidden=256)
        ob = run_herd(job(tmp / "b1.yaml", small, data, 8, tmp / "b1", max_seq_length=256))
        ref = run_herd(job(tmp / "b0.yaml", small, data, 8, tmp / "b0", max_seq_length=256),
                       env_extra={"HERD_NO_OPENBLAS": "1"})
        compare("OpenBLAS preloaded vs reference BLAS (4 x 256 llama)", ob, ref, "-")

    date = dt.date.today().isoformat()
    lines = [
        f"# Training throughput, {date}", "",
        f"Machine: {machine()}.",
        f"Model: llama, hidden {a.hidden}, {a.layers} layers, ~{n_params/1e6:.0f}M parameters "
        f"(fp32); LoRA rank 8 on all layers; batch 4, max_seq_length 512, {a.iters} iterations, "
        "compiled; tok/s excludes the first report window.", a.note, "",
        "| comparison | herd tok/s | baseline tok/s | ratio | goal |", "|---|---|---|---|---|",
    ]
    lines += [f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.2f} | {r[4]} |" for r in rows]
    lines += [""] + notes
    out = REPO / "bench" / "results" / f"train-throughput-{date}{a.suffix}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
