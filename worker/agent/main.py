"""``herd worker``: the agent daemon, one per machine.

It probes the machine (machine.py), serves WorkerService over authenticated gRPC (service.py),
advertises ``_herd-worker._tcp.local.`` (TXT: id, port, protocol version, memory, chip, mlx
version; no secrets) and runs at most one job's rank at a time (rank_process.py, relay.py).
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import threading
import uuid
from pathlib import Path

from herd import log, netif
from herd.errors import HerdError
from herd.rpc import discovery
from herd.rpc.auth import default_home, load_secret
from herd.rpc.channel import signed_server
from herd.rpc.ports import free_ports
from worker.agent.machine import probe
from worker.agent.service import Worker, WorkerServicer, add_to_server, advert_txt

logger = log.get(__name__)


def free_port(host: str = "") -> int:
    """A port free right now on every address (a rank binds it on whichever data address the
    coordinator picks). Rank ports are chosen once at agent start and reused: a worker runs one
    rank at a time, and the coordinator must know every rank's port before any starts."""
    return free_ports(1, host)[0]


def parse_bytes(text: str) -> int:
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    return int(float(num) * units[unit])


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="herd worker", description="run a worker agent")
    p.add_argument("--state-dir", type=Path, default=None, help="default $HERD_HOME/worker")
    p.add_argument("--host", default=None,
                   help="control address: serve WorkerService and advertise here (default: this "
                   "machine's LAN address, Ethernet before Wi-Fi; a warning if only loopback)")
    p.add_argument("--data", action="append", default=[], metavar="IFACE[=KIND]",
                   help="a data interface (name or address) for gradients, e.g. en5 or "
                   "10.0.0.2; repeatable; default: every interface, the coordinator picks the "
                   "fastest shared one. =KIND states its kind (thunderbolt, ethernet, wifi, "
                   "loopback, other) where the OS cannot tell")
    p.add_argument("--port", type=int, default=0, help="WorkerService port (0 = any free)")
    p.add_argument("--ring-port", type=int, default=0, help="MLX ring port for ranks (0 = any)")
    p.add_argument("--exchange-port", type=int, default=0, help="gRPC exchange port (0 = any)")
    p.add_argument("--id", default=None, help="worker id (default: hostname + random suffix)")
    p.add_argument("--memory", default=None, help="pose with this much memory, e.g. 64GB (tests)")
    p.add_argument("--chip", default=None, help="pose as this chip (tests)")
    p.add_argument("--secret-file", type=Path, default=None)
    args = p.parse_args(argv[1:])
    try:
        secret = load_secret(args.secret_file)
    except HerdError as e:
        print(f"herd worker: {e}", flush=True)
        return e.exit_code
    try:
        interfaces = netif.select_data(netif.probe_interfaces(), args.data)
    except ValueError as e:
        print(f"herd worker: {e}", flush=True)
        return 2
    host = (args.host or "").strip("[]")
    if not host:
        choice = netif.choose_control(interfaces)
        host = choice.address
        if choice.warning:
            print(f"herd worker: warning: {choice.warning}", file=sys.stderr, flush=True)
            logger.warning("control_address_fallback", address=host, reason=choice.warning)
    state_dir = args.state_dir or default_home() / "worker"
    state_dir.mkdir(parents=True, exist_ok=True)
    worker_id = args.id or f"{socket.gethostname().split('.')[0]}-{uuid.uuid4().hex[:6]}"
    machine = probe(parse_bytes(args.memory) if args.memory else None, args.chip)

    server = signed_server(secret, max_workers=16)
    port = server.add_insecure_port(netif.hostport(host, args.port))
    if port == 0:
        print(f"herd worker: cannot listen on {netif.hostport(host, args.port)}", flush=True)
        return 1
    worker = Worker(worker_id, host, port, args.ring_port or free_port(),
                    args.exchange_port or free_port(), machine, state_dir, secret, interfaces)
    add_to_server(WorkerServicer(worker), server)
    server.start()
    zc = discovery.make_zeroconf()
    advert = discovery.Advertiser(zc, discovery.WORKER_TYPE, worker_id, host, port,
                                  advert_txt(worker.info()))
    logger.info("worker_started", worker_id=worker_id, address=netif.hostport(host, port),
                data=[f"{i.name}={i.kind}" for i in interfaces if i.data],
                memory_bytes=machine.memory_bytes, chip=machine.chip, state_dir=str(state_dir))

    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    logger.info("worker_stopping", worker_id=worker_id)
    advert.close()
    worker.stop_all()
    server.stop(grace=2).wait()
    zc.close()
    return 0
