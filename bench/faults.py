"""Detection time and work redone, fault by fault, across hosts (network namespaces; root).

The review's faults on a 2-worker job, on both exchanges: a stopped rank (SIGSTOP), a worker cut
off for 120 s, the worker-to-worker link cut for 150 s, a killed agent, a lost worker (its agent
gone for good: the job shrinks, then grows back when it returns) and a killed coordinator. For
each: the time from the fault to the job's first state change (detection), the iterations redone
(the highest iteration the failed attempt reached minus the checkpoint the next resumed from),
the outcome, and whether the final adapter equals one uninterrupted process's (tests/conftest.py
SAME_UPDATE). The goal (issue 15): detection <= 2 x step time + exchange_timeout_s; redone <=
save_every. The step time is measured in the same run (the job's own reports).

    sudo .venv/bin/python bench/faults.py [--cut 120] [--ring-cut 150] [--timeout 20]
        [--out bench/results/faults-linux-cpu.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("MLX_DISABLE_COMPILE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cut", type=float, default=120.0, help="seconds a worker is cut off")
    p.add_argument("--ring-cut", type=float, default=150.0,
                   help="seconds the worker-to-worker link is cut")
    p.add_argument("--stop", type=float, default=60.0, help="seconds a rank is stopped")
    p.add_argument("--timeout", type=float, default=20.0, help="the jobs' exchange_timeout_s")
    p.add_argument("--exchanges", default="mlx,grpc")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" /
                   "faults-linux-cpu.md")
    args = p.parse_args()

    from herd.cli.tiny import make_tiny_data, make_tiny_model
    from tests import faults
    from tests.netns import lan_topology

    tmp = Path(tempfile.mkdtemp(prefix="herd-faults-"))
    model = make_tiny_model(tmp / "model", arch="llama", layers=2, hidden=64)
    data = make_tiny_data(tmp / "data", fmt="text", train=64, valid=16, test=8)
    rows = []
    with lan_topology() as net:
        cluster = faults.Cluster(net, tmp / "cluster")
        cluster.start()
        reference = faults.reference(tmp / "reference", model, data)
        scenarios = faults.scenarios(cluster, cut_s=args.cut, ring_cut_s=args.ring_cut,
                                     stop_s=args.stop, lost_s=args.cut)
        for exchange in args.exchanges.split(","):
            for name, fault in scenarios:
                kw = dict(fault)  # each exchange's pass reads the same scenarios
                if kw.pop("mlx_only", False) and exchange != "mlx":
                    continue
                t0 = time.monotonic()
                try:
                    r = faults.run_fault(cluster, reference, tmp / f"{name}-{exchange}", model,
                                         data, exchange, timeout_s=args.timeout, **kw)
                    rows.append((name, exchange, r))
                except AssertionError as e:
                    rows.append((name, exchange, {"error": str(e)[:300]}))
                print(f"{name} [{exchange}]: {rows[-1][2].get('detected_s', 'n/a')} "
                      f"({time.monotonic() - t0:.0f}s)", flush=True)
                _write(args, rows)  # row by row: a run cut short still leaves its table
    return 0


def _write(args, rows) -> None:
    from tests.faults import JOB

    lines = [
        "# Fault detection and work redone (issue 15)",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}; "
        "a coordinator, two workers and the CLI each in their own network namespace on one "
        "bridge (tests/netns.py), real zeroconf, MLX ring or gRPC exchange between the hosts. "
        f"Job: tiny llama (2 layers, hidden 64), {JOB['iters']} iterations, save_every "
        f"{JOB['save_every']}, exchange_timeout_s {args.timeout:g}. `bench/faults.py --cut "
        f"{args.cut:g} --ring-cut {args.ring_cut:g} --stop {args.stop:g}`; load average "
        f"{os.getloadavg()[0]:.1f} when written.",
        "",
        "Detection: fault -> the job's first state change, as `herd watch` shows it. Bound: "
        "2 x step time (the job's own measured step, the slowest report) + exchange_timeout_s. "
        "Redone: the iteration the failed attempt reached minus the checkpoint resumed from "
        f"(goal <= save_every), as the job's reports show it: they come every "
        f"{JOB['steps_per_report']} iterations, so up to {JOB['steps_per_report'] - 1} more may "
        "have been computed and lost.",
        "",
        "| fault | exchange | detected (s) | bound (s) | redone | resumed from | outcome | "
        "adapter vs one process |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, exchange, r in rows:
        if "error" in r:
            lines.append(f"| {name} | {exchange} | - | - | - | - | FAILED: {r['error']} | - |")
            continue
        bound = 2 * r["step_s"] + args.timeout
        lines.append(
            f"| {name} | {exchange} | {r['detected_s']:.1f} | {bound:.1f} | {r['redone']} | "
            f"{r['resumed']} | {r['outcome']} | {r['rel']:.1e} of the update |")
    lines += ["", "First state change per fault:", ""]
    for name, exchange, r in rows:
        if "line" in r:
            lines.append(f"- {name} [{exchange}]: `{r['line'].split(': ', 1)[1][:300]}`")
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
