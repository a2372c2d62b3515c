"""Speed-balanced data parallelism: 2 ranks, one at half speed, balanced vs equal split.

Run by hand (not a test), on an otherwise idle machine with >= 2 cores:
    uv run python bench/balance.py [--iters 48]
Writes bench/results/balance-<date>.md with the machine and its load average noted.

Rank 0 is pinned to core 0, rank 1 to core 1, and a busy loop is pinned to core 1 too, so rank 1
gets about half a core (``taskset`` sharing; the issue's alternative is cgroup ``cpu.max``). Same
model, data, seed and global batch (8) in both runs: ``balance: false`` keeps the equal split 4:4;
``balance: true`` measures each rank's items/s and moves toward ~5:3 (the update is the same:
tests/test_balance.py). tok/s excludes the first two report windows (compilation, and the first
measurement before the split moves).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from train_throughput import job, long_text_data, machine, run_herd  # noqa: E402

from herd.cli.tiny import make_tiny_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=48)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--note", default="")
    a = ap.parse_args()
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("needs 2 cores")
    tmp = Path(tempfile.mkdtemp(prefix="herd-bench-balance-"))
    model = make_tiny_model(tmp / "model", "llama", layers=a.layers, hidden=a.hidden,
                            intermediate=a.hidden * 4)
    data = long_text_data(tmp / "data")
    spinner = subprocess.Popen(["taskset", "-c", "1", sys.executable, "-c", "while True: pass"])
    load = [os.getloadavg()]
    try:
        runs = {}
        for name, balance in (("equal", False), ("balanced", True)):
            runs[name] = run_herd(job(tmp / f"{name}.yaml", model, data, a.iters, tmp / name,
                                      batch_size=8, steps_per_report=4,
                                      cluster={"exchange": "mlx", "balance": balance}),
                                  ranks=2, pin=True, skip_windows=2)
    finally:
        spinner.kill()
        spinner.wait()
    load.append(os.getloadavg())
    e, b = runs["equal"], runs["balanced"]
    lines = [
        f"# Balanced vs equal split, one rank at half speed, {dt.date.today().isoformat()}", "",
        f"Machine: {machine()}.",
        f"Load average (1, 5, 15 min) before: {load[0]}, after: {load[1]}.",
        f"Model: llama hidden {a.hidden}, {a.layers} layers; global batch 8, 2 ranks pinned to "
        f"cores 0 and 1, a busy loop sharing core 1; {a.iters} iterations.", a.note, "",
        "| run | tok/s | splits seen | ratio | goal |", "|---|---|---|---|---|",
        f"| equal (balance: false) | {e['tok_s']:.0f} | {e['shares']} | 1.00 | |",
        f"| balanced (balance: true) | {b['tok_s']:.0f} | {b['shares']} | "
        f"{b['tok_s'] / e['tok_s']:.2f} | ≥ 1.3 |",
    ]
    out = REPO / "bench" / "results" / f"balance-{dt.date.today().isoformat()}.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
