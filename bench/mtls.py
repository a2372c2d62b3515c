"""What mutual TLS costs the gradient exchange: mTLS (herd's only path) vs the same exchange in
plaintext (a baseline made for this benchmark alone), measured in one run on one machine.

    .venv/bin/python bench/mtls.py [--rounds 3] [--iters 12] [--hidden 512] [--layers 8]

- all-reduce bus bandwidth, 2 ranks, 64 MB (goal mTLS / plaintext >= 0.9): fresh rank processes
  of bench/allreduce.py per measurement (``--worker grpc`` vs ``--worker grpc-plain``), on
  loopback, and with ``--link 1gbit,10gbit`` (root) also between two network namespaces joined
  by a link of each rate (tbf, tests/netns.py): on loopback no link is slower than the CPU;
- 2-rank training throughput, ``exchange: grpc`` (goal >= 0.97): ``herd train`` ranks started
  directly, each pinned to its own core (bench/train_throughput.py ``run_herd``); the plaintext
  ranks run the same CLI with ``GrpcExchange.from_env`` patched to pass no credential.
Measurements alternate (mTLS, plaintext, mTLS, ...) so a load change on a shared machine hits both
alike; the ratio is of the medians. Writes bench/results/mtls-<date>.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import train_throughput as tt  # noqa: E402 (after the path)

from herd.rpc.ports import free_ports  # noqa: E402

MB = 1024 * 1024
# A rank whose exchange has no credential: the patch is made in this process, then `herd train`
# runs in it (LD_PRELOAD is already set, so the rank does not re-exec and lose the patch).
PLAINTEXT_RANK = r"""
import os, sys
import worker.exchange.grpc as g
def from_env(timeout_s=60.0, wire_dtype="float32"):
    peers = os.environ["HERD_EXCHANGE_PEERS"].split(",")
    return g.GrpcExchange(int(os.environ["HERD_RANK"]), peers, None, timeout_s=timeout_s,
                          wire_dtype=wire_dtype)
g.GrpcExchange.from_env = staticmethod(from_env)
from herd.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def allreduce_once(worker: str, mb: int, reps: int, tmp: Path, hosts=None) -> float:
    """Median seconds of ``reps`` 64 MB all-reduces on 2 fresh rank processes: on loopback, or
    one in each of ``hosts`` (namespaces, ``--link``)."""
    from allreduce import rank_credential

    ports = free_ports(2)
    addrs = [h.address() for h in hosts] if hosts else ["127.0.0.1"] * 2
    env = {**os.environ, "BENCH_PORTS": ",".join(map(str, ports)),
           "HERD_EXCHANGE_PEERS": ",".join(f"{a}:{p}" for a, p in zip(addrs, ports)),
           "HERD_RANK_TLS": rank_credential(tmp / "tls"), "HERD_LOG_LEVEL": "warning",
           "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(REPO / "bench" / "allreduce.py"), "--worker", worker,
           "--reps", str(reps), "--warmup", "2", "--sizes-mb", str(mb), "--chunk-bytes", "0"]
    if hosts:
        procs = [h.python(*cmd[1:], env={**env, "HERD_RANK": str(r)}, stdout=subprocess.PIPE,
                          text=True) for r, h in enumerate(hosts)]
    else:
        procs = [subprocess.Popen(cmd, env={**env, "HERD_RANK": str(r)},
                                  stdout=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"all-reduce ({worker}) failed")
    return statistics.median(json.loads(outs[0].strip().splitlines()[-1])[str(mb)]["times"])


@contextlib.contextmanager
def _two_hosts(rate: str):
    """Two namespaces on one bridge, each link limited to ``rate`` both ways (tests/netns.py)."""
    from tests.netns import Topology

    with Topology() as net:
        net.bridge("lan")
        hosts = [net.host("r1"), net.host("r2")]
        for i, h in enumerate(hosts, 1):
            net.link(h, "lan", f"198.18.0.{i}/24")
            net.limit(h, rate, "eth0")
        yield hosts


def train_once(plain: bool, model: Path, data: Path, iters: int, tmp: Path, i: int) -> dict:
    from allreduce import rank_credential

    name = f"{'plain' if plain else 'mtls'}-{i}"
    cfg = tt.job(tmp / f"{name}.yaml", model, data, iters, tmp / name,
                 max_seq_length=256, cluster={"exchange": "grpc"})
    from worker.rank.runtime import preload_env

    # OpenBLAS preloaded up front for both: a rank that re-executed itself to preload it would
    # lose the plaintext patch.
    env = {"HERD_RANK_TLS": rank_credential(tmp / "tls"),
           "LD_PRELOAD": preload_env().get("LD_PRELOAD", "")}
    if not plain:
        return tt.run_herd(cfg, ranks=2, pin=True, env_extra=env)
    runner = tmp / "plain_rank.py"
    runner.write_text(PLAINTEXT_RANK)
    return tt.run_herd(cfg, ranks=2, pin=True, env_extra=env, python=[sys.executable,
                                                                      str(runner)])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="mTLS/plaintext pairs of each measure")
    ap.add_argument("--reps", type=int, default=5, help="timed all-reduces per process pair")
    ap.add_argument("--mb", type=int, default=64)
    ap.add_argument("--iters", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--skip", default="", help="comma list of: allreduce,train")
    ap.add_argument("--link", default="", metavar="RATES",
                    help="also run the all-reduce between two network namespaces joined by a "
                    "link of each tbf rate (comma list, e.g. 1gbit,10gbit; root)")
    a = ap.parse_args()
    skip = set(filter(None, a.skip.split(",")))
    tmp = Path(tempfile.mkdtemp(prefix="herd-bench-mtls-"))
    started = time.perf_counter()
    load = os.getloadavg()
    rows = []
    links = [] if "allreduce" in skip else [None, *filter(None, a.link.split(","))]
    for link in links:
        with _two_hosts(link) if link else contextlib.nullcontext() as hosts:
            times = {"grpc": [], "grpc-plain": []}
            for _ in range(a.rounds):
                for worker in ("grpc", "grpc-plain"):
                    times[worker].append(allreduce_once(worker, a.mb, a.reps, tmp, hosts))
                    print(link or "loopback", worker, round(times[worker][-1], 3),
                          file=sys.stderr, flush=True)
        bw = {w: 2 * (2 - 1) / 2 * a.mb * MB / 1e9 / statistics.median(t)
              for w, t in times.items()}
        where = f"two namespaces, a {link} link (tbf)" if link else "loopback"
        rows.append((f"all-reduce bus bandwidth, 2 ranks, {a.mb} MB, {where} (GB/s)", bw["grpc"],
                     bw["grpc-plain"], "≥ 0.9",
                     "per-pair medians: mTLS " + ", ".join(f"{t * 1e3:.0f}" for t in times["grpc"])
                     + " ms; plaintext " + ", ".join(f"{t * 1e3:.0f}" for t in times["grpc-plain"])
                     + " ms"))
    if "train" not in skip:
        model = tt.make_tiny_model(tmp / "model", "llama", layers=a.layers, hidden=a.hidden,
                                   intermediate=a.hidden * 4)
        data = tt.long_text_data(tmp / "data")
        got = {False: [], True: []}
        for i in range(a.rounds):
            for plain in (False, True):
                got[plain].append(train_once(plain, model, data, a.iters, tmp, i))
                print("plain" if plain else "mtls", round(got[plain][-1]["tok_s"], 1),
                      file=sys.stderr, flush=True)
        med = {k: statistics.median(r["tok_s"] for r in v) for k, v in got.items()}
        share = {k: statistics.median(r["exchange_share"] for r in v) for k, v in got.items()}
        rows.append((f"2-rank training, exchange: grpc (tok/s; llama hidden {a.hidden}, "
                     f"{a.layers} layers, batch 4 x 256, {a.iters} iters)", med[False], med[True],
                     "≥ 0.97",
                     "runs: mTLS " + ", ".join(f"{r['tok_s']:.0f}" for r in got[False])
                     + "; plaintext " + ", ".join(f"{r['tok_s']:.0f}" for r in got[True])
                     + f" tok/s; exchange share of step time {share[False]:.1%} / "
                     f"{share[True]:.1%}"))
    date = dt.date.today().isoformat()
    lines = [f"# Cost of mutual TLS on the gradient exchange, {date}", "",
             f"`.venv/bin/python bench/mtls.py {' '.join(sys.argv[1:])}`, "
             f"{time.perf_counter() - started:.0f} s. Machine: {tt.machine()}; load average at "
             f"start {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} (a machine shared with other "
             "people's test runs). mTLS and plaintext runs alternate; ratio of medians of "
             f"{a.rounds} each.", "",
             "| measure | mTLS | plaintext | mTLS / plaintext | goal | detail |",
             "|---|---:|---:|---:|---|---|"]
    lines += [f"| {r[0]} | {r[1]:.3f} | {r[2]:.3f} | {r[1] / r[2]:.2f} | {r[3]} | {r[4]} |"
              for r in rows]
    out = REPO / "bench" / "results" / f"mtls-{date}.md"
    n = 1
    while out.exists():  # (a second run of the day overwrote the first's figures)
        n += 1
        out = out.with_name(f"mtls-{date}-{n}.md")
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
