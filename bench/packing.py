"""Sequence packing: real tokens per second, packed herd vs mlx_lm.lora, on long-tailed lengths.

Run by hand (not a test):  uv run python bench/packing.py [--iters 160] [--note "..."]
Writes bench/results/packing-<date>.md with the machine and its load average noted. Every ratio
compares runs made in this one invocation.

Data: text records whose lengths in words are drawn from a log-normal (median ``--median`` words,
sigma 1.0, clipped to [4, 900]): most records short, a long tail ~10x the median, as chat and
instruction data are. "Real tokens" are the loss's target tokens (both herd and mlx-lm count
``mask.sum()``: no padding), so tok/s compares like with like.

- mlx_lm.lora: ``--batch`` examples a step, length-sorted batches padded to the longest (its
  own train_model, bench/train_throughput.py's runner).
- herd unpacked: the same config (herd's per-process parity with mlx-lm, for reference).
- herd packed: ``cluster.packing``, rows of max_seq_length; ``batch_size`` rows chosen so a step
  holds about as many real tokens as mlx-lm's step (rows = batch x mean length / row length).
Throughput excludes the first report window only: mlx-lm's padded batches take many shapes (each
compiled once), packed rows one, so short runs flatter packing; use enough iterations (default
160) that most padded shapes have been seen.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import random
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from train_throughput import job, machine, run_herd, run_mlx_lm  # noqa: E402

from herd.cli.tiny import ANIMALS, facts, make_tiny_model  # noqa: E402


def long_tailed_data(out: Path, n_train: int, median: int, seed: int = 0) -> tuple[Path, list]:
    out.mkdir(parents=True, exist_ok=True)
    rng, table = random.Random(seed), facts()
    lengths = []
    for split, n in (("train", n_train), ("valid", 16)):
        with open(out / f"{split}.jsonl", "w") as f:
            for _ in range(n):
                words = int(min(900, max(4, rng.lognormvariate(math.log(median), 1.0))))
                text = " ".join(f"the {a} is {table[a]}."
                                for a in rng.choices(ANIMALS, k=max(1, words // 4)))
                f.write(json.dumps({"text": text}) + "\n")
                if split == "train":
                    lengths.append(words)
    return out, lengths


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=160)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--median", type=int, default=40, help="median record length, words")
    ap.add_argument("--seq", type=int, default=1024, help="max_seq_length (a packed row)")
    ap.add_argument("--note", default="")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="herd-bench-packing-"))
    model = make_tiny_model(tmp / "model", "llama", layers=a.layers, hidden=a.hidden,
                            intermediate=a.hidden * 4)
    data, words = long_tailed_data(tmp / "data", 2048, a.median)
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(model)
    toks = [min(a.seq, len(tok.encode(json.loads(x)["text"])))
            for x in (data / "train.jsonl").read_text().splitlines()]
    mean = sum(toks) / len(toks)
    rows = max(1, round(a.batch * mean / a.seq))
    common = dict(max_seq_length=a.seq, steps_per_report=8)
    load = [os.getloadavg()]
    m = run_mlx_lm(job(tmp / "m.yaml", model, data, a.iters, tmp / "m", batch_size=a.batch,
                       **common))
    h = run_herd(job(tmp / "h.yaml", model, data, a.iters, tmp / "h", batch_size=a.batch,
                     **common))
    p = run_herd(job(tmp / "p.yaml", model, data, a.iters, tmp / "p", batch_size=rows,
                     cluster={"packing": True}, **common))
    load.append(os.getloadavg())
    s = sorted(toks)
    lines = [
        f"# Packing: real tokens/s, packed herd vs mlx_lm.lora, {dt.date.today().isoformat()}",
        "", f"Machine: {machine()}.",
        f"Load average (1, 5, 15 min) before: {load[0]}, after: {load[1]} "
        f"({os.cpu_count()} cores shared with other work: ratios are noisy when it is high).",
        f"Model: llama, hidden {a.hidden}, {a.layers} layers (fp32), LoRA rank 8 on all layers; "
        f"{a.iters} iterations, compiled; tok/s = target tokens (no padding) per second, first "
        "report window excluded.",
        f"Data: 2048 text records, words ~ log-normal(median {a.median}, sigma 1), clipped to "
        f"[4, 900]; tokens: median {s[len(s) // 2]}, p90 {s[len(s) * 9 // 10]}, max {s[-1]}, "
        f"mean {mean:.0f}.",
        f"Steps: mlx_lm.lora and herd unpacked {a.batch} records; herd packed {rows} rows of "
        f"{a.seq} tokens (about the same real tokens a step).", a.note, "",
        "| run | tok/s | ratio to mlx_lm.lora | goal |", "|---|---|---|---|",
        f"| mlx_lm.lora (padded, length-sorted batches) | {m['tok_s']:.0f} | 1.00 | |",
        f"| herd, unpacked | {h['tok_s']:.0f} | {h['tok_s'] / m['tok_s']:.2f} | ≥ 1.0 |",
        f"| herd, packed | {p['tok_s']:.0f} | {p['tok_s'] / m['tok_s']:.2f} | ≥ 1.25 |",
    ]
    out = REPO / "bench" / "results" / f"packing-{dt.date.today().isoformat()}.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
