"""The Ray backend vs the zeroconf backend: job start latency and steady tokens/s, same job.

Run by hand (not a test):  uv run python bench/ray_vs_zeroconf.py [--pairs 3] [--iters 40]
Writes bench/results/ray-vs-zeroconf-<date>.md with the machine noted.

One coordinator (`herd coordinator --ray auto`) serves both: two `herd worker` agents on 127.0.0.1
(static targets) and a local Ray cluster (a head with no herd slot and two herd nodes on
127.0.0.2, ray.cluster_utils). The same 2-rank data-parallel job (MLX ring) is submitted with
`backend: zeroconf` and `backend: ray`, alternating which goes first in each pair, so both see the
same machine load. Start latency: `herd submit` called -> the first progress event stored by the
coordinator (both clocks are this machine's). Steady tok/s: the median of rank 0's reported
tokens/s, the first report (warm-up) left out. Ranks get one BLAS thread each on both backends.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from train_throughput import job, long_text_data  # noqa: E402

from herd.cli.tiny import make_tiny_model  # noqa: E402
from herd.rpc.ports import free_ports  # noqa: E402

HOST, NODE_IP = "127.0.0.1", "127.0.0.2"


def herd(*args: str, timeout: float = 600) -> str:
    proc = subprocess.run([sys.executable, "-m", "herd", *args], capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"herd {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def run_job(address: str, identity, cfg: Path) -> dict:
    """Submits ``cfg`` and follows its events to the end."""
    from herd.cli.connection import CoordinatorConnection
    from protos.v1 import common_pb2, coordinator_pb2

    t0 = time.time() * 1000
    job_id = herd("submit", str(cfg), "--coordinator", address).strip().splitlines()[-1]
    coord = CoordinatorConnection(address, identity)
    first, rates, end, state = None, [], None, ""
    try:
        for e in coord.stub.WatchJob(coordinator_pb2.WatchJobRequest(job_id=job_id),
                                     timeout=900):
            if e.kind == common_pb2.JobEvent.KIND_PROGRESS and e.progress.iteration > 0:
                first = first or e.time_unix_ms
                if e.progress.rank == 0 and e.progress.tokens_per_second:
                    rates.append(e.progress.tokens_per_second)
            if e.kind == common_pb2.JobEvent.KIND_STATE:
                state, end = common_pb2.JobState.Name(e.state), e.time_unix_ms
    finally:
        coord.close()
    if state != "JOB_STATE_SUCCEEDED" or first is None:
        raise SystemExit(f"{job_id} ended {state}")
    return {"job": job_id, "start_s": (first - t0) / 1000, "wall_s": (end - t0) / 1000,
            "tok_s": statistics.median(rates[1:] or rates), "reports": len(rates)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="hb-", dir="/tmp"))  # short: Ray's unix socket paths
    os.environ.update({"HERD_HOME": str(root / "home"), "RAY_TMPDIR": str(root),
                       "RAY_USAGE_STATS_ENABLED": "0", "OPENBLAS_NUM_THREADS": "1",
                       "HERD_LOG_LEVEL": "warning", "HERD_ZEROCONF_INTERFACES": HOST,
                       "HERD_MODEL_ROOTS": "/",  # the Ray nodes' policy (worker/agent/policy.py)
                       "RAY_agent_register_timeout_ms": "300000",
                       "RAY_raylet_start_wait_time_s": "300",
                       # uncompiled: a new shape's compile would dominate this short job's noise
                       "MLX_DISABLE_COMPILE": "1"})
    for k in ("HERD_SECRET", "HERD_COORDINATOR", "RAY_ADDRESS"):
        os.environ.pop(k, None)
    herd("init")
    from herd.rpc import pki

    me = pki.Identity.load(root / "home" / "tls", "client")  # `herd init` made it
    model = make_tiny_model(root / "model", layers=args.layers, hidden=args.hidden)
    data = long_text_data(root / "data", n_train=64, words=120)
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "node_ip_address": NODE_IP, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=1, node_ip_address=NODE_IP,
                         resources={"herd_worker": 1, "herd_memory_gb": 8})
    ports = free_ports(3)
    procs = [subprocess.Popen([sys.executable, "-m", "herd", "worker", "--host", HOST, "--port",
                               str(ports[i]), "--id", f"bench-{i}", "--state-dir",
                               str(root / f"w{i}"), "--model-root", "/"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for i in (1, 2)]
    address = f"{HOST}:{ports[0]}"
    log = open(root / "coordinator.log", "w")
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "herd", "coordinator", "--host", HOST, "--port", str(ports[0]),
         "--state-dir", str(root / "coord"), "--ray", "auto",
         "--worker", f"{HOST}:{ports[1]}", "--worker", f"{HOST}:{ports[2]}"],
        stdout=log, stderr=subprocess.STDOUT))
    load = [os.getloadavg()[0]]
    results: dict[str, list[dict]] = {"zeroconf": [], "ray": []}
    try:
        while "listening on" not in (root / "coordinator.log").read_text():
            time.sleep(0.5)
        time.sleep(3)  # the static agents' first health check
        for pair in range(args.pairs):
            order = ["zeroconf", "ray"] if pair % 2 == 0 else ["ray", "zeroconf"]
            for backend in order:
                cfg = job(root / f"{backend}-{pair}.yaml", model, data, args.iters,
                          root / "adapters", max_seq_length=256,
                          cluster={"workers": 2, "exchange": "mlx", "backend": backend})
                r = run_job(address, me, cfg)
                results[backend].append(r)
                print(f"pair {pair} {backend}: start {r['start_s']:.1f} s, "
                      f"{r['tok_s']:.0f} tok/s, wall {r['wall_s']:.1f} s", flush=True)
    finally:
        load.append(os.getloadavg()[0])
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)
        cluster.shutdown()
    write(results, args, load)
    shutil.rmtree(root, ignore_errors=True)
    return 0


def write(results: dict, args, load: list[float]) -> None:
    def med(backend: str, key: str) -> float:
        return statistics.median(r[key] for r in results[backend])

    z_tok, r_tok = med("zeroconf", "tok_s"), med("ray", "tok_s")
    z_start, r_start = med("zeroconf", "start_s"), med("ray", "start_s")
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text()
                .splitlines() if ln.startswith("model name")), platform.processor())
    import mlx.core as mx
    import ray

    rows = "\n".join(
        f"| {i} | {b} | {r['start_s']:.1f} | {r['tok_s']:.0f} | {r['wall_s']:.1f} |"
        for i in range(args.pairs) for b in ("zeroconf", "ray") for r in [results[b][i]])
    text = f"""# Ray backend vs zeroconf backend ({dt.date.today()})

Machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores ({cpu}), Linux
{platform.release()}, MLX {mx.__version__} CPU backend, Ray {ray.__version__}. Shared machine: 1-min
load average {load[0]:.1f} at the start, {load[1]:.1f} at the end (other engineers' test runs).
Command: `uv run python bench/ray_vs_zeroconf.py --pairs {args.pairs} --iters {args.iters}`.

Job: tiny llama ({args.layers} layers, hidden {args.hidden}), LoRA r8 on all layers, batch 4 x
<=256 tokens, {args.iters} iterations, 2 ranks data parallel over the MLX ring (one per agent, or
one per Ray node), one BLAS thread per rank, uncompiled (MLX_DISABLE_COMPILE=1), the same
coordinator for both. Pairs alternate
which backend goes first.

| pair | backend | start (s): submit -> 1st step | tok/s (rank 0, median) | submit -> done (s) |
| --- | --- | --- | --- | --- |
{rows}

**Medians: steady tok/s Ray / zeroconf = {r_tok / z_tok:.3f}** (goal >= 0.98);
start latency Ray {r_start:.1f} s vs zeroconf {z_start:.1f} s (+{r_start - z_start:.1f} s: the
placement group, then one actor process per rank, each polled on the scheduler's 0.5 s tick).
"""
    out = REPO / "bench" / "results" / f"ray-vs-zeroconf-{dt.date.today()}.md"
    out.write_text(text)
    print(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
