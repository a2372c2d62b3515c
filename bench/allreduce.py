"""All-reduce bus bandwidth, local processes: gRPC exchange vs MLX ring, TCP ring, grpcio streams.

    .venv/bin/python bench/allreduce.py                      # N = 2,3,4; 1,16,64,256 MB; one run
    .venv/bin/python bench/allreduce.py --ranks 2 --sizes-mb 64,256 --reps 5

Bus bandwidth = 2(N-1)/N x bytes / time (what every rank sends and receives in a ring
all-reduce, per second). Each (transport, N) gets fresh processes: an MLX process can form only
one group. MLX ranks are started directly with MLX_RANK + MLX_HOSTFILE, not through mlx.launch,
whose output relaying costs a 2-core box dearly (shared/FACTS.md). The TCP ring runs the same
chunked, pipelined schedule as the gRPC exchange (worker/exchange/grpc/ring.py) over bare
sockets: the ceiling for this algorithm in Python on this machine. The grpcio streams move the
same messages on the same schedule over persistent grpcio streams, summing and checking nothing:
the floor under any all-reduce written on grpcio's Python API (it copies each message into
``bytes`` to send it, and twice more to receive it).

Every call donates its input, as the trainer's does (``reduce_gradients`` in
worker/exchange/__init__.py): the gRPC and TCP rings sum in place; MLX's ``all_sum`` allocates its
result regardless.
Times are the median of --reps, measured on rank 0 after --warmup untimed all-reduces of the
same size and a small all-reduce that lines the ranks up. Writes a markdown table to
bench/results/allreduce-<date>.md (see --out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from herd.rpc.ports import free_ports  # noqa: E402 (after the path)
from worker.exchange.grpc import DEFAULT_CHUNK_BYTES  # noqa: E402

TRANSPORTS = ("grpc", "mlx", "tcp", "streams")
WORKERS = (*TRANSPORTS, "grpc-plain")  # grpc-plain: only for bench/mtls.py
MB = 1024 * 1024


# ---- one rank ---------------------------------------------------------------------------------

class TcpRing:
    """The gRPC exchange's ring schedule over two plain sockets (right neighbour out, left in)."""

    def __init__(self, rank: int, ports: list[int], chunk_bytes: int):
        self.rank, self.size, self.chunk_elements = rank, len(ports), chunk_bytes // 4
        listener = socket.create_server(("127.0.0.1", ports[rank]))
        right_port = ports[(rank + 1) % self.size]
        deadline = time.monotonic() + 30
        while True:
            try:
                self.out = socket.create_connection(("127.0.0.1", right_port))
                break
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.inp, _ = listener.accept()
        listener.close()

    def all_sum(self, flat, donate=False):
        import mlx.core as mx
        import numpy as np

        from worker.exchange.grpc.ring import RingPlan

        out = flat if donate else mx.array(flat)
        mx.eval(out)
        buf = np.asarray(out)
        plan = RingPlan(buf.size, self.size, self.rank, self.chunk_elements)
        c = plan.chunks_per_segment
        received = [0]
        cond = threading.Condition()

        def send():
            for i in range(plan.messages):
                with cond:
                    cond.wait_for(lambda: received[0] > i - c)
                start, stop, _ = plan.outgoing(i)
                self.out.sendall(memoryview(buf[start:stop]).cast("B"))

        sender = threading.Thread(target=send)
        sender.start()
        scratch = np.empty(-(-buf.size // self.size) // c + 1, dtype=np.float32)
        for i in range(plan.messages):
            start, stop, add = plan.incoming(i)
            view = memoryview(scratch[: stop - start]).cast("B")
            got = 0
            while got < len(view):
                n = self.inp.recv_into(view[got:])
                if n == 0:
                    raise ConnectionError("left neighbour closed")
                got += n
            if add:
                np.add(buf[start:stop], scratch[: stop - start], out=buf[start:stop])
            else:
                buf[start:stop] = scratch[: stop - start]
            with cond:
                received[0] = i + 1
                cond.notify_all()
        sender.join()
        return out

    def close(self):
        self.out.close()
        self.inp.close()


class GrpcStreams:
    """The floor under the gRPC exchange: the same ring messages over one persistent grpcio stream
    per link, without the sum, the wire header or any check. Only what grpcio's Python API needs
    to move the bytes: a copy into ``bytes`` to send, and its own receive path."""

    def __init__(self, rank: int, ports: list[int], chunk_bytes: int):
        import queue
        from concurrent import futures

        import grpc

        from herd.rpc.channel import CHANNEL_OPTIONS

        self.rank, self.size, self.chunk_elements = rank, len(ports), chunk_bytes // 4
        self._cond = threading.Condition()
        self._received = 0  # messages in, over the group's life
        self._expected = 0  # messages in by the end of the current all-reduce
        self._work: queue.SimpleQueue = queue.SimpleQueue()  # each all-reduce's outgoing messages
        handlers = {"Link": grpc.stream_stream_rpc_method_handler(self._on_link)}
        self._server = grpc.server(futures.ThreadPoolExecutor(2), options=CHANNEL_OPTIONS)
        self._server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("bench.Streams", handlers)])
        self._server.add_insecure_port(f"127.0.0.1:{ports[rank]}")
        self._server.start()
        right = f"127.0.0.1:{ports[(rank + 1) % self.size]}"
        self._channel = grpc.insecure_channel(right, options=CHANNEL_OPTIONS)
        grpc.channel_ready_future(self._channel).result(timeout=30)
        self._call = self._channel.stream_stream("/bench.Streams/Link")(self._requests())

    def _requests(self):
        while (messages := self._work.get()) is not None:
            yield from messages

    def _on_link(self, requests, context):
        for _ in requests:
            with self._cond:
                self._received += 1
                self._cond.notify_all()
        yield from ()

    def all_sum(self, flat, donate=False):  # moves the bytes, sums nothing
        import mlx.core as mx
        import numpy as np

        from worker.exchange.grpc.ring import RingPlan

        out = flat if donate else mx.array(flat)
        mx.eval(out)
        buf = np.asarray(out)
        plan = RingPlan(buf.size, self.size, self.rank, self.chunk_elements)
        c, first = plan.chunks_per_segment, self._expected
        self._expected += plan.messages

        def messages():
            for i in range(plan.messages):
                # The exchange's pipeline: message i waits for incoming message i - C.
                with self._cond:
                    self._cond.wait_for(lambda: self._received - first > i - c)
                start, stop, _ = plan.outgoing(i)
                yield buf[start:stop].tobytes()

        self._work.put(messages())
        with self._cond:
            self._cond.wait_for(lambda: self._received >= self._expected)
        return out

    def close(self):
        self._work.put(None)
        time.sleep(0.2)  # let the half-close reach the neighbour
        self._server.stop(grace=0.5).wait()
        self._channel.close()


class MlxRing:
    def __init__(self):
        import mlx.core as mx

        self.group = mx.distributed.init(backend="ring", strict=True)

    def all_sum(self, flat, donate=False):  # MLX allocates the result itself
        import mlx.core as mx

        out = mx.distributed.all_sum(flat, group=self.group, stream=mx.cpu)
        mx.eval(out)
        return out

    def close(self):
        pass


def worker(args) -> None:
    import mlx.core as mx

    rank = int(os.environ["HERD_RANK"])
    ports = [int(p) for p in os.environ["BENCH_PORTS"].split(",")]
    if args.worker in ("grpc", "grpc-plain"):
        from worker.exchange.grpc import GrpcExchange

        if args.worker == "grpc":  # as a rank runs it: mutual TLS with its attempt's credential
            ring = GrpcExchange.from_env(timeout_s=300)
        else:  # the same exchange in plaintext: bench/mtls.py's baseline, never herd's own path
            peers = os.environ["HERD_EXCHANGE_PEERS"].split(",")
            ring = GrpcExchange(rank, peers, None, timeout_s=300)
        if args.chunk_bytes:
            ring._chunk_elements = args.chunk_bytes // 4
    elif args.worker == "mlx":
        ring = MlxRing()
    elif args.worker == "streams":
        ring = GrpcStreams(rank, ports, args.chunk_bytes or DEFAULT_CHUNK_BYTES)
    else:
        ring = TcpRing(rank, ports, args.chunk_bytes or 4 * MB)
    small = mx.ones((16,), dtype=mx.float32)
    ring.all_sum(small)  # warm-up and line-up
    results = {}
    for mb in args.sizes_mb:
        flat = mx.random.normal((int(mb * MB) // 4,), dtype=mx.float32)
        mx.eval(flat)
        for _ in range(args.warmup):
            flat = ring.all_sum(flat, donate=True)
        times, cpu = [], 0.0
        for _ in range(args.reps):
            ring.all_sum(small)
            cpu_started, started = cpu_seconds(), time.perf_counter()
            # As the trainer calls it (worker/exchange/__init__.py): the input is a temporary,
            # donated.
            flat = ring.all_sum(flat, donate=True)
            times.append(time.perf_counter() - started)
            cpu += cpu_seconds() - cpu_started
        results[str(mb)] = {"times": times, "cpu": cpu / args.reps}
        del flat
    ring.close()
    if rank == 0:
        print(json.dumps(results), flush=True)


def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads: a cost the load of others hides less."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ---- the driver --------------------------------------------------------------------------------

def rank_credential(folder: Path) -> str:
    """A folder holding one job attempt's rank credential, from a CA made for the benchmark (what
    the worker agent writes for a rank; HERD_RANK_TLS names it)."""
    from herd.rpc import pki

    if not (folder / "rank.pem").exists():
        ca = pki.Authority.create(folder / "ca")
        ca.issue("rank", pki.rank_scope("bench", 1)).save(folder, "rank")
    return str(folder)


def run_group(transport: str, n: int, args, hostfile: Path) -> dict[str, list[float]]:
    ports = free_ports(n)
    mlx_ports = free_ports(n)
    hostfile.write_text(json.dumps([f"127.0.0.1:{p}" for p in mlx_ports]))
    base = {**os.environ, "BENCH_PORTS": ",".join(map(str, ports)),
            "HERD_EXCHANGE_PEERS": ",".join(f"127.0.0.1:{p}" for p in ports),
            "HERD_RANK_TLS": rank_credential(hostfile.parent / f"{hostfile.stem}-tls"),
            "MLX_HOSTFILE": str(hostfile), "MLX_WORLD_SIZE": str(n), "HERD_LOG_LEVEL": "warning"}
    cmd = [sys.executable, __file__, "--worker", transport, "--reps", str(args.reps),
           "--warmup", str(args.warmup),
           "--sizes-mb", ",".join(map(str, args.sizes_mb)), "--chunk-bytes", str(args.chunk_bytes)]
    procs = [subprocess.Popen(cmd, env={**base, "HERD_RANK": str(r), "MLX_RANK": str(r)},
                              stdout=subprocess.PIPE, text=True) for r in range(n)]
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=args.group_timeout)
        if p.returncode != 0:
            raise SystemExit(f"{transport} N={n}: a rank exited with {p.returncode}")
        outs.append(out)
    return json.loads(outs[0].strip().splitlines()[-1])


def machine() -> str:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()[:10]
    load = os.getloadavg()
    return "\n".join([*lscpu, f"nproc: {os.cpu_count()}",
                      f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"])


def report(table: dict, args, elapsed: float) -> str:
    import mlx.core as mx

    lines = [
        f"# All-reduce bus bandwidth, {datetime.date.today().isoformat()}",
        "",
        "`.venv/bin/python bench/allreduce.py " + " ".join(sys.argv[1:]) + "`, "
        f"{elapsed:.0f} s, mlx {mx.__version__}. Bus bandwidth = 2(N-1)/N x bytes / time, GB/s "
        f"(10^9 B/s), median of {args.runs} x {args.reps} (best in brackets): {args.runs} "
        f"sweep(s) of fresh processes, {args.reps} timed all-reduces each. All local processes "
        "on loopback. "
        "CPU = rank 0's user+system CPU seconds per all-reduce (all its threads), which the load "
        "of others distorts less than wall time.",
        "",
        "```", machine(), "```",
        "",
        "| N | MB | gRPC GB/s | MLX ring GB/s | TCP ring GB/s | grpcio streams GB/s | gRPC / MLX "
        "| gRPC / streams | CPU s gRPC / MLX / TCP / streams |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in args.ranks:
        for mb in args.sizes_mb:
            cells, bw, cpu = [], {}, []
            for t in TRANSPORTS:
                times = table[(t, n)][str(mb)]["times"]
                scale = 2 * (n - 1) / n * mb * MB / 1e9
                bw[t] = scale / statistics.median(times)
                cells.append(f"{bw[t]:.3f} ({scale / min(times):.3f})")
                cpu.append(f"{table[(t, n)][str(mb)]['cpu']:.3f}")
            lines.append(f"| {n} | {mb} | " + " | ".join(cells)
                         + f" | {bw['grpc'] / bw['mlx']:.2f} | {bw['grpc'] / bw['streams']:.2f} | "
                         + " / ".join(cpu) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="2,3,4", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--sizes-mb", default="1,16,64,256",
                        type=lambda s: [float(x) if "." in x else int(x) for x in s.split(",")])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed all-reduces of each size first, as nccl-tests does: a "
                        "training run repeats the same sizes thousands of times, so the steady "
                        "state is what counts")
    parser.add_argument("--runs", type=int, default=1,
                        help="repeat the whole sweep (fresh processes each time), pooling the "
                        "reps: on a small machine the spread between process groups exceeds that "
                        "within one")
    parser.add_argument("--transports", default=",".join(TRANSPORTS))
    parser.add_argument("--chunk-bytes", type=int, default=0, help="0: the exchange's default")
    parser.add_argument("--group-timeout", type=float, default=600)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0
    started = time.perf_counter()
    table = {}
    hostfile = Path(f"/tmp/herd-bench-hosts-{os.getpid()}.json")
    for run in range(args.runs):
        for n in args.ranks:
            for t in args.transports.split(","):
                got = run_group(t, n, args, hostfile)
                print(run, t, n, {k: ([round(x, 3) for x in v["times"]], round(v["cpu"], 3))
                                  for k, v in got.items()}, file=sys.stderr, flush=True)
                pooled = table.setdefault((t, n), {})
                for size, v in got.items():
                    cell = pooled.setdefault(size, {"times": [], "cpus": []})
                    cell["times"] += v["times"]
                    cell["cpus"].append(v["cpu"])
    for pooled in table.values():
        for cell in pooled.values():
            cell["cpu"] = statistics.median(cell.pop("cpus"))
    hostfile.unlink(missing_ok=True)
    shutil.rmtree(hostfile.parent / f"{hostfile.stem}-tls", ignore_errors=True)
    if set(args.transports.split(",")) != set(TRANSPORTS):
        # A partial run is for tuning, not for the results table: medians only.
        for (t, n), pooled in sorted(table.items()):
            for size, cell in pooled.items():
                median = statistics.median(cell["times"]) * 1e3
                print(f"{t} N={n} {size} MB: median {median:.1f} ms, "
                      f"best {min(cell['times']) * 1e3:.1f} ms, CPU {cell['cpu'] * 1e3:.1f} ms")
        return 0
    text = report(table, args, time.perf_counter() - started)
    today = datetime.date.today().isoformat()
    out = args.out or ROOT / "bench" / "results" / f"allreduce-{today}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
