"""``herd coordinator``: the control plane process.

Serves CoordinatorService with the cluster secret, keeps the registry of verified workers,
runs the scheduler loop, stores jobs in SQLite and adapters on disk under --state-dir, and
advertises itself as ``_herd._tcp.local.`` so the CLI finds it.
"""

from __future__ import annotations

import argparse
import secrets
import signal
import socket
import sys
import threading
from pathlib import Path

from coordinator.artifacts import AdapterStore, BlobStore
from coordinator.launcher import GrpcLauncher
from coordinator.registry import Registry
from coordinator.scheduler import Scheduler
from coordinator.service import CoordinatorServicer, add_to_server
from coordinator.store import JobStore
from herd import PROTOCOL_VERSION, log, netif
from herd.errors import HerdError
from herd.rpc import discovery
from herd.rpc.auth import default_home, load_secret
from herd.rpc.channel import signed_server

logger = log.get(__name__)
DEFAULT_PORT = 7450


class Coordinator:
    """All the coordinator's parts, wired; ``start`` / ``stop`` for tests and ``main``."""

    def __init__(self, state_dir: Path, secret: str, host: str, port: int,
                 static_workers: list[str] = (), placement_timeout_s: float = 600.0,
                 advertise: bool = True):
        self.state_dir = state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        self.store = JobStore(state_dir / "herd.db")
        self.registry = Registry(secret, on_lost=lambda wid: self.scheduler.on_worker_lost(wid),
                                 static_targets=list(static_workers))
        self.server = signed_server(secret, max_workers=32)
        self.host = host
        self.port = self.server.add_insecure_port(netif.hostport(host, port))
        self.scheduler = Scheduler(self.store, self.registry.workers,
                                   GrpcLauncher(self.registry, lambda: self.address),
                                   placement_timeout_s=placement_timeout_s)
        add_to_server(CoordinatorServicer(self.scheduler, self.registry,
                                          BlobStore(state_dir / "blobs"),
                                          AdapterStore(state_dir / "adapters")), self.server)
        self._advertise = advertise
        self._stop = threading.Event()
        self._zc = None
        self._advert = None

    @property
    def address(self) -> str:
        return netif.hostport(self.host, self.port)

    def start(self) -> None:
        self.scheduler.recover()
        self.server.start()
        self._zc = discovery.make_zeroconf()
        self.registry.browse(self._zc)
        self.registry.start()
        threading.Thread(target=self.scheduler.run, args=(self._stop,), daemon=True,
                         name="scheduler").start()
        if self._advertise:
            # A unique instance (and mDNS host) name: two coordinators on machines with the same
            # host name must not publish conflicting address records for one name.
            self._advert = discovery.Advertiser(
                self._zc, discovery.COORDINATOR_TYPE,
                f"herd-{socket.gethostname()}-{self.port}-{secrets.token_hex(3)}",
                self.host, self.port,
                {"port": str(self.port), "protocol": str(PROTOCOL_VERSION)})
        logger.info("coordinator_started", address=self.address, state_dir=str(self.state_dir))

    def stop(self) -> None:
        self._stop.set()
        if self._advert:
            self._advert.close()
        self.registry.close()
        self.server.stop(grace=2).wait()
        if self._zc:
            self._zc.close()
        self.store.close()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="herd coordinator", description="run the coordinator")
    p.add_argument("--state-dir", type=Path, default=None, help="default $HERD_HOME/coordinator")
    p.add_argument("--host", default=None,
                   help="address to serve and advertise (default: this machine's LAN address, "
                   "Ethernet before Wi-Fi; a warning if only loopback)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"default {DEFAULT_PORT}; 0 = any")
    p.add_argument("--worker", action="append", default=[], metavar="HOST:PORT",
                   help="a worker to use without zeroconf (repeatable); still verified")
    p.add_argument("--placement-timeout", type=float, default=600.0,
                   help="fail a job that cannot be placed for this many seconds")
    p.add_argument("--secret-file", type=Path, default=None)
    args = p.parse_args(argv[1:])
    host = (args.host or "").strip("[]")
    if not host:
        choice = netif.choose_control()
        host = choice.address
        if choice.warning:
            print(f"herd coordinator: warning: {choice.warning}", file=sys.stderr, flush=True)
            logger.warning("control_address_fallback", address=host, reason=choice.warning)
    try:
        secret = load_secret(args.secret_file)
        coord = Coordinator(args.state_dir or default_home() / "coordinator", secret,
                            host, args.port, args.worker, args.placement_timeout)
    except HerdError as e:
        print(f"herd coordinator: {e}", flush=True)
        return e.exit_code
    if coord.port == 0:
        print(f"herd coordinator: cannot listen on {netif.hostport(host, args.port)}", flush=True)
        return 1
    coord.start()
    print(f"herd coordinator listening on {coord.address}", flush=True)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    logger.info("coordinator_stopping")
    coord.stop()
    return 0
