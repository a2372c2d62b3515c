"""How far herd's token-weighted gradient accumulation is from mlx_lm.lora's, and that
``cluster.gradient_average: mlx_lm`` closes the gap.

    .venv/bin/python bench/accumulation_vs_mlx_lm.py                # accumulation 2, 3, 4
    .venv/bin/python bench/accumulation_vs_mlx_lm.py --accum 2 --iters 48

For each accumulation, one config (a tiny real llama, chat data whose examples differ in length,
so micro-batches hold different numbers of target tokens) is trained three times from the same
seed: by ``python -m mlx_lm lora``, by ``herd train`` (default: the step's mean over all its
tokens) and by ``herd train`` with ``gradient_average: mlx_lm`` (mlx-lm's mean of per-micro-batch
means). Reported: max |adapter difference| against mlx-lm's, absolute and relative to how far
mlx-lm's training moved the adapter, after one optimizer step and after ``--iters``
micro-batches, for SGD (the update is linear in the gradient: after one step the difference is
the averaging alone) and Adam (which rescales each entry by its running size, so the difference
in small gradient entries weighs more), at learning rates where training is stable. No timing:
this is numbers, not speed. Writes bench/results/accumulation-vs-mlx-lm-<date>.md (see --out).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _run(cmd: list[str], env: dict) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--accum", default="2,3,4")
    p.add_argument("--iters", type=int, default=48)
    p.add_argument("--out", type=Path,
                   default=ROOT / "bench" / "results"
                   / f"accumulation-vs-mlx-lm-{datetime.date.today()}.md")
    args = p.parse_args()

    import mlx.core as mx

    from herd.cli.tiny import make_tiny_data, make_tiny_model
    from worker.rank.runtime import preload_env

    env = preload_env({**os.environ, "MLX_DISABLE_COMPILE": "1", "HERD_LOG_LEVEL": "warning"})
    tmp = Path(tempfile.mkdtemp(prefix="herd-accum-"))
    model = make_tiny_model(tmp / "model", arch="llama", layers=4, hidden=128)
    data = make_tiny_data(tmp / "data", fmt="chat", train=96, valid=16, test=8)

    def initial_adapter(cfg: dict) -> dict:
        """The LoRA init both start from (drawn from the seed)."""
        from mlx.utils import tree_flatten

        from herd.config import parse_config
        from worker.rank.model import apply_adapters, load_base

        job = parse_config(cfg)
        m, _ = load_base(job)
        apply_adapters(m, job)
        return dict(tree_flatten(m.trainable_parameters()))

    def adapter(folder: Path) -> dict:
        return dict(mx.load(str(folder / "adapters.safetensors")))

    def diff(a: dict, b: dict) -> float:
        return max(mx.abs(a[k] - b[k]).max().item() for k in a)

    rows = []
    cases = [(accum, optimizer, lr, iters) for accum in map(int, args.accum.split(","))
             for optimizer, lr in (("sgd", 2e-3), ("adam", 1e-4))
             for iters in (accum, args.iters)]
    for accum, optimizer, lr, iters in cases:
        base = {
            "model": str(model), "data": str(data), "train": True, "num_layers": -1,
            "batch_size": 4, "iters": iters, "learning_rate": lr,
            "optimizer": optimizer, "grad_accumulation_steps": accum, "seed": 3,
            "steps_per_eval": 10_000, "save_every": 10_000, "max_seq_length": 256,
            "mask_prompt": True,
            "lora_parameters": {"rank": 8, "scale": 20.0, "dropout": 0.0},
        }
        runs = {}
        for name, extra in (("mlx_lm", None), ("tokens", {}),
                            ("mean", {"cluster": {"gradient_average": "mlx_lm"}})):
            out = tmp / f"{name}-{accum}-{optimizer}-{iters}"
            cfg = {**base, "adapter_path": str(out), **(extra or {})}
            (tmp / f"{out.name}.yaml").write_text(yaml.safe_dump(cfg))
            cmd = ([sys.executable, "-m", "mlx_lm", "lora", "-c"] if extra is None
                   else [sys.executable, "-m", "herd", "train", "--quiet"])
            _run(cmd + [str(tmp / f"{out.name}.yaml")], env)
            runs[name] = adapter(out)
        moved = diff(runs["mlx_lm"], initial_adapter(base))
        d_tok, d_mean = diff(runs["tokens"], runs["mlx_lm"]), diff(runs["mean"], runs["mlx_lm"])
        rows.append((accum, optimizer, iters, d_tok, d_tok / moved, d_mean, moved))
        print(rows[-1], flush=True)

    lines = [
        "# herd vs mlx_lm.lora with gradient accumulation",
        "",
        f"{datetime.datetime.now():%Y-%m-%d %H:%M}, {platform.machine()} "
        f"{os.cpu_count()} cores, {platform.platform()}; OpenBLAS preloaded; uncompiled. "
        f"Tiny llama (4 layers, hidden 128), chat data with mask_prompt, batch 4, "
        f"{args.iters} micro-batches, LoRA r8 on every layer, seed 3.",
        "",
        "| accumulation | optimizer, lr | micro-batches | herd (tokens) vs mlx-lm: max abs | "
        "relative to mlx-lm's update | herd (gradient_average: mlx_lm) vs mlx-lm | "
        "mlx-lm's update (max abs) |",
        "|---|---|---|---|---|---|---|",
    ]
    lr_of = {"sgd": "sgd 2e-3", "adam": "adam 1e-4"}
    lines += [f"| {a} | {lr_of[o]} | {i} | {d:.2e} | {r:.2e} | {m:.1e} | {mv:.2e} |"
              for a, o, i, d, r, m, mv in rows]
    lines += ["", "Command: `.venv/bin/python bench/accumulation_vs_mlx_lm.py "
              f"--accum {args.accum} --iters {args.iters}`", ""]
    args.out.write_text("\n".join(lines))
    print(args.out)


if __name__ == "__main__":
    main()
