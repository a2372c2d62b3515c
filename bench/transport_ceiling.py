"""What one stream of bytes costs on each transport herd could move model files over, on loopback.

    .venv/bin/python bench/transport_ceiling.py                 # 1 GiB per run, median of 3
    .venv/bin/python bench/transport_ceiling.py --mb 2048 --reps 5

The model-distribution bench (bench/model_distribution.py) compares herd's whole fetch (gRPC
GetBlob over mutual TLS, sha256 of every byte, the write into the cache) with a raw TCP
``sendfile``. This one takes the fetch apart, without disks: a sender process streams --mb of
random bytes held in memory to this process, which discards or hashes them, over

- ``tcp``: a plain socket (``sendall`` of 1 MiB slices, ``recv_into`` a 1 MiB buffer);
- ``tls``: the same socket wrapped by Python's ``ssl`` with the cluster CA's certificates,
  verified both ways (TLS 1.3; what a bulk path outside gRPC would use);
- ``grpc`` / ``grpc-tls``: a server stream of herd's ``FileChunk`` messages (1 MiB, as
  herd/rpc/files.py CHUNK_BYTES), insecure / through herd's own secure channel and server
  (herd/rpc/channel.py), as GetBlob streams them;

each plain and with ``+sha256`` (the receiver hashes every byte, as every herd transfer does).
Rate = bytes / wall time of the stream (connection made beforehand); CPU = each side's own
process CPU seconds per GB. GB = 1e9 bytes. Writes bench/results/transport-ceiling-DATE.md.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ME = str(Path(__file__).resolve())
BLOCK = 1024 * 1024
GB = 1e9
MODES = ["tcp", "tcp+sha256", "tls", "tls+sha256", "grpc", "grpc+sha256", "grpc-tls",
         "grpc-tls+sha256"]


def _ssl_context(tls: Path, role: str, server: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(tls / f"{role}.pem", tls / f"{role}.key")
    ctx.load_verify_locations(tls / "ca.pem")
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = False  # the peer's certificate is checked against the CA
    return ctx


def _identity(tls: Path, role: str):
    from herd.rpc import pki

    return pki.Identity.load(tls, role, stem=role)


# ---- the sender (a child process) --------------------------------------------------------------

def sender(args) -> None:
    data = memoryview(os.urandom(BLOCK))
    blocks = args.mb
    if args.mode.startswith("grpc"):
        import grpc

        from herd.rpc.channel import SERVER_OPTIONS
        from protos.v1 import common_pb2

        def stream(request, context):
            cpu = time.process_time()
            for _ in range(blocks):
                yield common_pb2.FileChunk(data=bytes(data))
            print(json.dumps({"cpu": time.process_time() - cpu}), flush=True)

        handler = grpc.method_handlers_generic_handler("Bench", {
            "Get": grpc.unary_stream_rpc_method_handler(
                stream, response_serializer=common_pb2.FileChunk.SerializeToString)})
        server = grpc.server(futures.ThreadPoolExecutor(2), handlers=[handler],
                             options=SERVER_OPTIONS)
        if args.mode.startswith("grpc-tls"):
            port = server.add_secure_port("127.0.0.1:0", _identity(Path(args.tls), "coordinator")
                                          .server_credentials())
        else:
            port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        print(port, flush=True)
        server.wait_for_termination()
        return
    listener = socket.create_server(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)
    conn, _ = listener.accept()
    if args.mode.startswith("tls"):
        conn = _ssl_context(Path(args.tls), "coordinator", True).wrap_socket(conn,
                                                                             server_side=True)
    conn.recv(1)  # go
    cpu = time.process_time()
    for _ in range(blocks):
        conn.sendall(data)
    conn.close()
    print(json.dumps({"cpu": time.process_time() - cpu}), flush=True)


# ---- the receiver (this process) ---------------------------------------------------------------

def receive(mode: str, mb: int, tls: Path) -> dict:
    hashing = mode.endswith("+sha256")
    child = subprocess.Popen([sys.executable, ME, "--role", "sender", "--mode", mode, "--mb",
                              str(mb), "--tls", str(tls)], stdout=subprocess.PIPE, text=True,
                             cwd=ROOT)
    try:
        port = int(child.stdout.readline())
        h = hashlib.sha256()
        n = 0
        if mode.startswith("grpc"):
            import grpc

            from herd.rpc.channel import CHANNEL_OPTIONS, secure_channel
            from protos.v1 import common_pb2

            channel = (secure_channel(f"127.0.0.1:{port}", _identity(tls, "worker"),
                                      _identity(tls, "coordinator").dns)
                       if mode.startswith("grpc-tls") else
                       grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS))
            grpc.channel_ready_future(channel).result(timeout=30)
            get = channel.unary_stream("/Bench/Get",
                                       response_deserializer=common_pb2.FileChunk.FromString)
            t0, cpu = time.perf_counter(), time.process_time()
            for chunk in get(b""):
                data = chunk.data
                n += len(data)
                if hashing:
                    h.update(data)
            wall, cpu = time.perf_counter() - t0, time.process_time() - cpu
            channel.close()
        else:
            sock = socket.create_connection(("127.0.0.1", port))
            if mode.startswith("tls"):
                sock = _ssl_context(tls, "worker", False).wrap_socket(sock)
            buf = bytearray(BLOCK)
            view = memoryview(buf)
            t0, cpu = time.perf_counter(), time.process_time()
            sock.sendall(b"g")
            while k := sock.recv_into(buf):
                n += k
                if hashing:
                    h.update(view[:k])
            wall, cpu = time.perf_counter() - t0, time.process_time() - cpu
            sock.close()
        sent = json.loads(child.stdout.readline())
    finally:
        child.terminate()
        child.wait(timeout=30)
    assert n == mb * BLOCK, (mode, n)
    gb = n / GB
    return {"rate": gb / wall, "recv_cpu": cpu / gb, "send_cpu": sent["cpu"] / gb}


def _machine() -> str:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    keep = [ln for ln in lscpu if ln.split(":")[0] in ("CPU(s)", "Model name", "Vendor ID")]
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    return "\n".join(keep + [f"aes: {' aes ' in flags}, sha_ni: {'sha_ni' in flags}",
                             f"python {sys.version.split()[0]}, {ssl.OPENSSL_VERSION}"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, default=1024, help="MiB per run")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--out", type=Path, default=None)
    for hidden in ("--role", "--mode", "--tls"):
        p.add_argument(hidden, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role == "sender":
        sender(args)
        return
    from herd.rpc import pki

    t_all, load = time.time(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-transport-") as work:
        tls = Path(work)
        ca = pki.Authority.create(tls / "ca")
        for role, name in (("coordinator", "bench"), ("worker", "bench")):
            ca.issue(role, name).save(tls, stem=role)
        modes = args.modes.split(",")
        runs = {m: [] for m in modes}
        for rep in range(args.reps):  # interleaved: a load change hits every mode alike
            for mode in (modes if rep % 2 == 0 else modes[::-1]):
                runs[mode].append(receive(mode, args.mb, tls))
                print(mode, {k: round(v, 3) for k, v in runs[mode][-1].items()}, flush=True)
    med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in runs.items()}
    base = med.get("tcp", {}).get("rate")
    rows = ["| transport | GB/s (each run) | / tcp | receiver CPU s/GB | sender CPU s/GB |",
            "|---|---:|---:|---:|---:|"]
    for m in modes:
        each = " ".join(f"{r['rate']:.2f}" for r in runs[m])
        ratio = f"{med[m]['rate'] / base:.2f}" if base else "-"
        rows.append(f"| {m} | {med[m]['rate']:.2f} ({each}) | {ratio} | "
                    f"{med[m]['recv_cpu']:.2f} | {med[m]['send_cpu']:.2f} |")
    day = datetime.date.today().isoformat()
    out = args.out or ROOT / "bench" / "results" / f"transport-ceiling-{day}.md"
    text = (f"# One stream on loopback, by transport ({day})\n\n"
            f"`.venv/bin/python bench/transport_ceiling.py --mb {args.mb} --reps {args.reps}`, "
            f"{time.time() - t_all:.0f} s; {args.mb} MiB per run from memory to memory, median "
            f"of {args.reps}; load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}.\n\n"
            f"```\n{_machine()}\n```\n\n" + "\n".join(rows) + "\n")
    out.write_text(text)
    print(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
