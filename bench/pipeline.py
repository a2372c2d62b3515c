"""Pipeline efficiency against the GPipe bound m / (m + S - 1), and the cost of moving activations.

For S stages and m microbatches per step (global batch fixed), S real stage processes run
``python -m worker.pipeline`` on a loopback MLX ring, each pinned to a core. Per step:
utilization = sum over stages of busy (compute) seconds / (S x the step's wall time); GPipe can
reach at most m / (m + S - 1) (the bubble). We report utilization, the bound, and their ratio.
Moving activations is timed apart: a ping-pong of one microbatch's hidden states between two
ranks, scaled to the 2 x (S - 1) x m transfers a step makes.

    .venv/bin/python bench/pipeline.py [--stages 2,3] [--microbatches 1,4,8]
        [--out bench/results/pipeline-linux-cpu.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from herd.rpc.ports import free_ports  # noqa: E402 (after the path)

HIDDEN, LAYERS, BATCH, SEQ, ITERS, WARMUP = 256, 12, 8, 256, 6, 2


def _launch(argv: list[str], world: int, tmp: Path) -> None:
    from worker.rank.runtime import preload_env

    hostfile = tmp / "hosts.json"
    hostfile.write_text(json.dumps([f"127.0.0.1:{p}" for p in free_ports(world)]))
    cores = os.cpu_count() or 1
    procs = []
    for r in range(world):
        env = {**preload_env(), "MLX_RANK": str(r), "MLX_WORLD_SIZE": str(world),
               "MLX_HOSTFILE": str(hostfile), "OPENBLAS_NUM_THREADS": "1",
               "MLX_DISABLE_COMPILE": "1", "HERD_LOG_LEVEL": "warning"}
        procs.append(subprocess.Popen(["taskset", "-c", str(r % cores), sys.executable, *argv],
                                      env=env, cwd=REPO, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=900)
        if p.returncode:
            raise SystemExit(f"rank failed:\n{err[-3000:]}")


def _job(tmp: Path, model: Path, data: Path) -> Path:
    import yaml

    job = {"model": str(model), "data": str(data), "train": True, "num_layers": -1,
           "batch_size": BATCH, "iters": ITERS, "learning_rate": 1e-4, "max_seq_length": SEQ,
           "seed": 0, "lora_parameters": {"rank": 8, "scale": 20.0, "dropout": 0.0},
           "adapter_path": str(tmp / "a")}
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def measure(stages: int, m: int, job: Path, tmp: Path, cut: str) -> dict:
    from herd.stage_cut import even_split

    metrics = tmp / f"m-{stages}-{m}-{cut}.jsonl"
    # Without --stage-layers a stage cuts for equal compute (herd/stage_cut.py).
    spans = ["--stage-layers", ",".join(f"{a}:{b}" for a, b in even_split(LAYERS, stages))] \
        if cut == "even" else []
    _launch(["-m", "worker.pipeline", str(job), "--adapter-path", str(tmp / f"a{stages}{m}{cut}"),
             "--microbatches", str(m), "--metrics-file", str(metrics), *spans], stages, tmp)
    events = map(json.loads, metrics.read_text().splitlines())
    rows = sorted((e for e in events if e["event"] == "stage_done"), key=lambda r: r["rank"])
    utils = []
    for i in range(WARMUP, ITERS):
        wall = max(r["step_seconds"][i] for r in rows)
        utils.append(sum(r["step_compute_seconds"][i] for r in rows) / (stages * wall))
    walls = [max(r["step_seconds"][i] for r in rows) for i in range(WARMUP, ITERS)]
    busy = [statistics.median(r["step_compute_seconds"][WARMUP:]) for r in rows]
    return {"util": statistics.median(utils), "step_s": statistics.median(walls),
            "layers": [tuple(r["layers"]) for r in rows], "busy": busy}


def pingpong_main() -> None:
    """Rank body: time send/recv of one microbatch's hidden states, there and back."""
    import mlx.core as mx

    group = mx.distributed.init(strict=True)
    shape = tuple(json.loads(os.environ["PP_SHAPE"]))
    x = mx.random.normal(shape)
    mx.eval(x)
    times = []
    for _ in range(12):
        tic = time.perf_counter()
        if group.rank() == 0:
            mx.eval(mx.distributed.send(x, 1, group=group))
            mx.eval(mx.distributed.recv(shape, mx.float32, 1, group=group))
        else:
            y = mx.distributed.recv(shape, mx.float32, 0, group=group)
            mx.eval(y)
            mx.eval(mx.distributed.send(y, 0, group=group))
        times.append((time.perf_counter() - tic) / 2)
    if group.rank() == 0:
        Path(os.environ["PP_OUT"]).write_text(json.dumps(statistics.median(times[2:])))


def transfer_seconds(rows: int, tmp: Path) -> float:
    os.environ["PP_SHAPE"] = json.dumps([rows, SEQ, HIDDEN])
    os.environ["PP_OUT"] = str(tmp / "pp.json")
    _launch([str(Path(__file__).resolve()), "--pingpong"], 2, tmp)
    return json.loads((tmp / "pp.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stages", default="2,3")
    ap.add_argument("--microbatches", default="1,4,8")
    ap.add_argument("--out", default=str(REPO / "bench/results/pipeline-linux-cpu.md"))
    ap.add_argument("--cuts", default="balanced,even", help="stage cuts to measure")
    ap.add_argument("--pingpong", action="store_true")
    args = ap.parse_args()
    if args.pingpong:
        return pingpong_main()
    from herd.cli.tiny import make_tiny_data, make_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="bench-pp-"))
    model = make_tiny_model(tmp / "model", arch="llama", layers=LAYERS, hidden=HIDDEN,
                            intermediate=4 * HIDDEN)
    data = make_tiny_data(tmp / "data", fmt="text", train=64, valid=8, test=8)
    job = _job(tmp, model, data)
    lines = [
        "# Pipeline efficiency vs the GPipe bound",
        "",
        f"Machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, Linux, MLX CPU "
        f"backend (OpenBLAS preloaded, 1 BLAS thread per stage, stage r pinned to core r mod "
        f"{os.cpu_count()}).",
        f"Model: tiny llama, hidden {HIDDEN}, {LAYERS} blocks, LoRA rank 8 on all blocks; global "
        f"batch {BATCH} x <= {SEQ} tokens; {ITERS} steps, first {WARMUP} dropped, medians.",
        "utilization = sum of stages' busy seconds / (S x step wall); bound = m / (m + S - 1).",
        "",
        "Schedule: 1F1B (worker/pipeline/schedule.py). cut: blocks per stage, balanced = equal "
        "compute (herd/stage_cut.py, the default) or even; busy = each stage's compute seconds "
        "per step.",
        "",
        "| S | m | cut | step (s) | busy per stage (s) | utilization | GPipe bound "
        "| utilization / bound | activation moves/step (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in map(int, args.stages.split(",")):
        for m in map(int, args.microbatches.split(",")):
            move = transfer_seconds(BATCH // m, tmp) * 2 * (s - 1) * m
            for cut in args.cuts.split(","):
                r = measure(s, m, job, tmp, cut)
                bound = m / (m + s - 1)
                spans = ",".join(f"{a}:{b}" for a, b in r["layers"])
                busy = " / ".join(f"{b:.3f}" for b in r["busy"])
                lines.append(f"| {s} | {m} | {cut} {spans} | {r['step_s']:.3f} | {busy} | "
                             f"{r['util']:.3f} | {bound:.3f} | {r['util'] / bound:.2f} | "
                             f"{move:.4f} "
                             f"({move / r['step_s']:.1%} of a step) |")
                print(lines[-1], flush=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
