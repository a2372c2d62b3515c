"""Model distribution rate: the coordinator's model store -> W workers, against plain copies.

    .venv/bin/python bench/model_distribution.py                    # loopback: 4 x 256 MB, W = 2
    .venv/bin/python bench/model_distribution.py --link 1gbit       # hosts in network namespaces
    .venv/bin/python bench/model_distribution.py --shard-mb 512 --runs 5

One real `herd coordinator` process holds a model (random shards + config.json, in its model
store); W worker processes each run the agent's own fetch (worker/agent/model_fetch.py
``Preparation``: the whole model, FETCH_STREAMS files at once, every byte sha256-checked, into a
fresh cache) at the same moment. Against the same bytes, the same W destinations at once:

- raw TCP: one sender process, ``socket.sendfile`` of each file, W receiver processes with
  FETCH_STREAMS connections each, writing to disk (no framing, no checksum, no auth);
- ``cp`` (loopback only): W ``cp`` processes copying the store's files (no network, no checksum).

On loopback everything shares this machine's cores. With ``--link RATE`` the coordinator (and
the TCP sender) run in one network namespace and each worker in its own, joined by a bridge
(tests/netns.py, root only), with the coordinator's link limited to RATE by tbf both ways: the
uplink every worker's bytes share, as a coordinator's NIC is.

Rate = W x model bytes / wall time (first worker started to last worker done), GB/s = 1e9 B/s.
The source files sit in the page cache (just written), as after a first fetch; each destination
is new. Median of --runs (alternating order). Writes bench/results/ (see --out), with a model of
placing a 40 GB model on 4 workers over 10 GbE from the measured rates.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from herd.rpc.ports import free_ports  # noqa: E402 (after the path)

GB = 1e9
ME = str(Path(__file__).resolve())


# ---- children ---------------------------------------------------------------------------------

def fetch_child(args) -> None:
    """One worker: waits for "go" on stdin, fetches the model with the agent's own code."""
    from herd.config import JobConfig
    from herd.digest import FileDigest
    from herd.models.source import ModelSource
    from worker.agent.coordinator_client import CoordinatorClient
    from worker.agent.domain import RankSpec
    from worker.agent.model_cache import ModelCache
    from worker.agent.model_fetch import Preparation

    doc = json.loads(Path(args.spec).read_text())
    files = tuple(FileDigest(**f) for f in doc["files"])
    spec = RankSpec("bench", 1, 0, 1, JobConfig(model="bench"), [], doc["coordinator"], [], [],
                    model=ModelSource(digest=doc["digest"], files=files))
    cache = ModelCache(Path(args.dest) / "cache", "bench")
    from herd.rpc import pki

    client = CoordinatorClient(spec.coordinator, pki.Identity.load(Path(doc["tls"]), "worker"))
    sys.stdin.readline()
    t0, cpu0 = time.time(), time.process_time()
    prep = Preparation(spec, cache, client, Path(args.dest) / "view", "bench")
    prep.result()
    print(json.dumps({"start": t0, "end": time.time(), "cpu": time.process_time() - cpu0,
                      "received": prep.status().bytes_received}))


def tcp_sender(args) -> None:
    """Serves any file of --src by name: a client sends the name, gets the bytes (sendfile)."""
    srv = socket.create_server((args.host, int(args.port)), backlog=64)
    print("ready", flush=True)

    def serve(conn):
        with conn:
            name = conn.recv(256).decode()
            with open(Path(args.src) / name, "rb") as f:
                conn.sendfile(f)

    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def tcp_child(args) -> None:
    """One raw-TCP receiver: FETCH_STREAMS connections at once, each file written to --dest."""
    from worker.agent.model_fetch import FETCH_STREAMS

    names = args.names.split(",")
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    sys.stdin.readline()
    t0, cpu0 = time.time(), time.process_time()

    def get(name):
        with socket.create_connection((args.host, int(args.port))) as s, \
                open(dest / name, "wb") as out:
            s.sendall(name.encode())
            buf = bytearray(1 << 20)
            while n := s.recv_into(buf):
                out.write(memoryview(buf)[:n])

    with ThreadPoolExecutor(FETCH_STREAMS) as pool:
        list(pool.map(get, names))
    print(json.dumps({"start": t0, "end": time.time(), "cpu": time.process_time() - cpu0}))


# ---- where processes run ----------------------------------------------------------------------

def local(argv: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *argv], **kw)


def _together(children) -> tuple[float, float]:
    """Starts (spawn, argv) children, releases them at once; (last end - first start, CPU
    seconds of the children's own work, summed)."""
    procs = [spawn(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for spawn, argv in children]
    time.sleep(2.0)  # imports done before the clock starts
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    outs = []
    for p in procs:
        out = p.communicate(timeout=3600)[0].strip().splitlines()
        if p.returncode or not out:
            raise SystemExit(f"a child failed ({p.returncode})")
        outs.append(json.loads(out[-1]))
    return (max(o["end"] for o in outs) - min(o["start"] for o in outs),
            sum(o["cpu"] for o in outs))


def _cp(src_files: list[Path], dests: list[Path]) -> tuple[float, float]:
    for d in dests:
        d.mkdir(parents=True)
    t0 = time.time()
    before = os.times()
    procs = [subprocess.Popen(["cp", *map(str, src_files), str(d)]) for d in dests]
    for p in procs:
        p.wait()
    after = os.times()
    cpu = (after.children_user - before.children_user) + (after.children_system
                                                          - before.children_system)
    return time.time() - t0, cpu


# ---- the parent -------------------------------------------------------------------------------

def _model_folder(work: Path, shards: int, shard_mb: int) -> Path:
    model = work / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    # (the model store takes only a folder with a tokenizer: a few bytes, moved with the rest)
    (model / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {}}))
    for i in range(shards):
        with open(model / f"model-{i + 1:05d}-of-{shards:05d}.safetensors", "wb") as f:
            for _ in range(shard_mb):
                f.write(os.urandom(1 << 20))
    return model


def _store(model: Path, state: Path):
    """The model in a coordinator state dir's store, as `herd models add` leaves it."""
    from coordinator.artifacts import BlobStore
    from coordinator.models import ModelStore

    blobs = BlobStore(state / "blobs")
    return blobs, ModelStore(state / "models", blobs).import_folder(model, "bench", 0, link=False)


def _running_job(state: Path, digest: str) -> None:
    """A running job on the model, placed on worker "bench": a worker may read only the blobs of
    a job it runs (coordinator/blob_access.py), and the fetchers hold that worker's certificate.
    The job is a record only (nothing runs it), written again before each herd run: a restarted
    coordinator waits 30 s for its ranks, then restarts the job (coordinator/reconcile.py).
    GetBlob reads the job records from the store on each call."""
    from coordinator.domain import Job, JobState
    from coordinator.store import JobStore
    from herd.config import JobConfig

    store = JobStore(state / "herd.db")
    store.put_job(Job("job-bench00", "bench", JobConfig(model="bench"), [], 1, 1,
                      state=JobState.RUNNING, attempt=1, worker_ids=["bench"],
                      model_digest=digest))
    store.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--shard-mb", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--link", default=None, help="e.g. 1gbit: hosts in network namespaces")
    p.add_argument("--out", type=Path, default=None)
    for hidden in ("--role", "--spec", "--dest", "--port", "--src", "--names", "--host"):
        p.add_argument(hidden, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role:
        {"fetch": fetch_child, "tcp": tcp_child, "sender": tcp_sender}[args.role](args)
        return
    t_all, load = time.time(), os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="bench-models-"))
    net = None
    try:
        from herd.rpc import pki

        model = _model_folder(work, args.shards, args.shard_mb)
        total = sum(f.stat().st_size for f in model.iterdir())
        blobs, stored = _store(model, work / "coordinator")
        # the cluster's CA (the coordinator's --tls-dir) and a worker's identity from it
        ca = pki.Authority.create(work / "tls")
        ca.issue("worker", "bench").save(work / "tls-worker")
        worker_tls = str(work / "tls-worker")
        if args.link:
            sys.path.insert(0, str(ROOT / "tests"))
            from tests.netns import Topology

            net = Topology()
            net.bridge("lan")
            c = net.host("c")
            net.link(c, "lan", "198.18.0.1/24")
            hosts = [net.host(f"w{i + 1}") for i in range(args.workers)]
            for i, h in enumerate(hosts):
                net.link(h, "lan", f"198.18.0.{11 + i}/24")
            net.limit(c, args.link)
            at_c = lambda argv, **kw: c.python(*argv, **kw)  # noqa: E731
            at_w = [lambda argv, h=h, **kw: h.python(*argv, **kw) for h in hosts]
            host, port, tport = "198.18.0.1", 7450, 7460
        else:
            at_c, at_w = local, [local] * args.workers
            host, (port, tport) = "127.0.0.1", free_ports(2)
        env = {**os.environ, "HERD_ZEROCONF_INTERFACES": host, "HERD_LOG_LEVEL": "warning"}
        coord = at_c(["-m", "herd", "coordinator", "--host", host, "--port", str(port),
                      "--state-dir", str(work / "coordinator"), "--tls-dir",
                      str(work / "tls"), "--no-join"], env=env, cwd=ROOT)
        sender = at_c([ME, "--role", "sender", "--host", host, "--port", str(tport), "--src",
                       str(blobs.root)], stdout=subprocess.PIPE, text=True)
        try:
            assert sender.stdout.readline().strip() == "ready"
            _wait_for(coord, host, port, net, at_w[0])
            results = _measure(args, work, stored, worker_tls, f"{host}:{port}", host, tport, blobs,
                               at_w, total)
        finally:
            for proc in (sender, coord):
                proc.terminate()
                proc.wait(timeout=30)
        src = blobs.path(max(stored.files, key=lambda f: f.bytes).sha256)  # (a shard)
        t0 = time.perf_counter()
        hashlib.sha256(src.read_bytes()).hexdigest()
        sha_rate = src.stat().st_size / (time.perf_counter() - t0) / GB
        _report(args, results, total, sha_rate, load, time.time() - t_all)
    finally:
        if net is not None:
            net.close()
        shutil.rmtree(work, ignore_errors=True)


def _wait_for(coord, host: str, port: int, net, spawn) -> None:
    """Until the coordinator answers (from a worker's namespace when there are namespaces)."""
    probe = ("import socket,sys,time\nfor _ in range(600):\n s=socket.socket()\n"
             f" if s.connect_ex(('{host}',{port}))==0: sys.exit(0)\n s.close(); time.sleep(0.1)\n"
             "sys.exit(1)")
    if spawn([("-c"), probe]).wait(timeout=120) != 0 or coord.poll() is not None:
        raise SystemExit("the coordinator did not start")


def _measure(args, work, stored, worker_tls, address, host, tport, blobs, at_w, total):
    spec = work / "spec.json"
    spec.write_text(json.dumps({
        "coordinator": address, "tls": worker_tls, "digest": stored.digest,
        "files": [{"name": f.name, "sha256": f.sha256, "bytes": f.bytes} for f in stored.files]}))
    src_files = [blobs.path(f.sha256) for f in stored.files]
    names = ",".join(f.sha256 for f in stored.files)
    kinds = ["herd", "tcp"] + ([] if args.link else ["cp"])
    results: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for run in range(args.runs):
        for w in sorted({1, args.workers}):
            for kind in kinds if run % 2 == 0 else kinds[::-1]:
                dests = [work / f"dest-{kind}-{i}" for i in range(w)]
                if kind == "herd":
                    _running_job(work / "coordinator", stored.digest)
                    secs, cpu = _together([(at_w[i], [ME, "--role", "fetch", "--spec", str(spec),
                                                      "--dest", str(d)])
                                           for i, d in enumerate(dests)])
                elif kind == "tcp":
                    secs, cpu = _together([(at_w[i], [ME, "--role", "tcp", "--host", host,
                                                      "--port", str(tport), "--dest", str(d),
                                                      "--names", names])
                                           for i, d in enumerate(dests)])
                else:
                    secs, cpu = _cp(src_files, dests)
                results.setdefault((kind, w), []).append((w * total / secs / GB,
                                                          cpu / (w * total / GB)))
                for d in dests:
                    shutil.rmtree(d)
                print(f"run {run} {kind} x{w}: {results[(kind, w)][-1][0]:.3f} GB/s", flush=True)
    return results


def _cpu_lines() -> list[str]:
    keep = ("Model name", "CPU(s)", "CPU family", "Model:", "Vendor ID")
    info = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    flags = next((ln for ln in info if ln.startswith("Flags")), "")
    return [ln for ln in info if ln.startswith(keep)] + [f"sha_ni: {'sha_ni' in flags.split()}"]


def _report(args, results, total: int, sha_rate: float, load, seconds: float) -> None:
    med = {k: statistics.median(r for r, _ in v) for k, v in results.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in results.items()}
    where = (f"the coordinator and the TCP sender in one network namespace, each worker in its "
             f"own, the coordinator's link limited to {args.link} (tbf, both ways)"
             if args.link else "all on loopback")
    cmd = (f"--shards {args.shards} --shard-mb {args.shard_mb} --workers {args.workers} "
           f"--runs {args.runs}" + (f" --link {args.link}" if args.link else ""))
    kinds = ["herd", "tcp"] + ([] if args.link else ["cp"])
    lines = [
        f"# Model distribution rate, {datetime.date.today()}"
        + (f", {args.link} link" if args.link else ", loopback"), "",
        f"`.venv/bin/python bench/model_distribution.py {cmd}`, {seconds:.0f} s. A model of "
        f"{total / GB:.2f} GB ({args.shards} shards + config.json) from one `herd coordinator` "
        f"process to W worker processes at once, {where}. Rate = W x model bytes / wall time, "
        f"GB/s = 1e9 B/s, median of {args.runs} runs (every run in brackets); CPU = the "
        "receivers' own CPU seconds per GB received (cp: the cp processes').", "",
        "```", *_cpu_lines(), f"load average at start: {' '.join(f'{x:.2f}' for x in load)}",
        f"one-core sha256 of a shard at the end: {sha_rate:.2f} GB/s", "```", "",
        "| W | " + " | ".join(f"{k} GB/s" for k in kinds) + " | herd / raw TCP"
        + ("" if args.link else " | herd / cp") + " | CPU s/GB " + " / ".join(kinds) + " |",
        "|---|" + "---:|" * (len(kinds) + (2 if not args.link else 1) + 1)]
    for w in sorted({1, args.workers}):
        cells = [f"{med[(k, w)]:.3f} ({' '.join(f'{r:.2f}' for r, _ in results[(k, w)])})"
                 for k in kinds]
        ratios = [f"{med[('herd', w)] / med[('tcp', w)]:.2f}"]
        if not args.link:
            ratios.append(f"{med[('herd', w)] / med[('cp', w)]:.2f}")
        lines.append(f"| {w} | " + " | ".join(cells + ratios) + " | "
                     + " / ".join(f"{cpu[(k, w)]:.2f}" for k in kinds) + " |")
    lines += _model(med, args.workers, bool(args.link))
    tag = f"-{args.link}" if args.link else ""
    out = args.out or (ROOT / "bench" / "results"
                       / f"model-distribution-{datetime.date.today()}{tag}.md")
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}")


def _model(med, workers: int, link_mode: bool) -> list[str]:
    """Placing a 40 GB model on 4 workers over 10 GbE, from the measured rates."""
    link = 10e9 / 8 / GB  # 1.25 GB/s out of the coordinator
    layouts = (("4 data-parallel ranks (40 GB each)", 160, 40),
               ("a 4-stage pipeline (~10 GB each)", 40, 10))
    head = ["", "## 40 GB on 4 workers over 10 GbE (modelled)", ""]
    rows = ["| layout | bytes out | at line rate | at the measured rates |",
            "|---|---:|---:|---:|"]
    if link_mode:  # the link binds: what fraction of it herd's transfer uses
        eff = med[("herd", workers)] / med[("tcp", workers)]
        for layout, moved, _ in layouts:
            t = moved / (link * eff)
            rows.append(f"| {layout} | {moved} GB | {moved / link:.0f} s | {t:.0f} s "
                        f"({t / 60:.1f} min) |")
        return head + [
            f"Time = bytes out of the coordinator / (10 GbE = {link:.2f} GB/s x the fraction of a "
            f"link-bound network herd used here, {eff:.2f} of raw TCP with {workers} workers), "
            "as long as the machines' CPUs keep up with 10 GbE (this machine's do not: see the "
            "loopback file of the same day for its CPU-bound rates). A worker that already holds "
            "a file's digest moves nothing; a pipeline stage moves only its shards.", ""] + rows
    serve = med[("herd", workers)]  # what one coordinator process served to W at once
    one = med[("herd", 1)]  # what one worker process received alone
    for layout, moved, per_worker in layouts:
        t = max(moved / min(link, serve), per_worker / one)
        rows.append(f"| {layout} | {moved} GB | {moved / link:.0f} s | {t:.0f} s "
                    f"({t / 60:.1f} min) |")
    return head + [
        f"Time = max(bytes out of the coordinator / min(10 GbE = {link:.2f} GB/s, the "
        f"coordinator's measured serving rate to {workers} workers, {serve:.2f} GB/s), one "
        f"worker's bytes / one worker's measured receiving rate, {one:.2f} GB/s): this "
        "machine's CPUs as the only limit. A worker that already holds a file's digest moves "
        "nothing; a pipeline stage moves only its shards.", ""] + rows


if __name__ == "__main__":
    main()
