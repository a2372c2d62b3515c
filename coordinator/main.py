"""``herd coordinator``: the control plane process.

Serves CoordinatorService over mutual TLS with the cluster CA (it runs where the CA is: it signs
joining machines' certificates and every rank's), keeps the registry of verified workers, runs
the scheduler loop, stores jobs in SQLite and adapters on disk under --state-dir, and advertises
itself as ``_herd._tcp.local.`` so the CLI finds it. JoinService runs on its own port
(coordinator/join.py). On --http-port (default 7480) it serves the dashboard, /metrics and the
job API (coordinator/web/).
"""

from __future__ import annotations

import argparse
import importlib.util
import secrets
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from coordinator import housekeeping
from coordinator.artifacts import AdapterStore, BlobStore
from coordinator.join import serve_join
from coordinator.launcher import GrpcLauncher
from coordinator.models import ModelCatalog, ModelStore
from coordinator.recovery import RestartPolicy, control_loop, wait_until_writable
from coordinator.registry import Registry
from coordinator.scheduler import Scheduler
from coordinator.service import RULES, CoordinatorServicer, add_to_server
from coordinator.store import DATABASE, JobStore
from coordinator.web.auth import WebAuth, is_loopback
from coordinator.web.hub import MetricsHub
from coordinator.web.server import DEFAULT_HTTP_PORT, WebContext, WebServer
from herd import PROTOCOL_VERSION, log, netif
from herd.errors import HerdError
from herd.rpc import api_token as api_tokens
from herd.rpc import discovery, pki
from herd.rpc.auth import Revocations
from herd.rpc.channel import bind, secure_server
from herd.rpc.join import make_token
from herd.rpc.ports import DEFAULT_COORDINATOR_PORT
from herd.state_lock import StateLock
from herd.usage import HelpFormatter, at_least, port_number, port_or_off

logger = log.get(__name__)
DEFAULT_PORT = DEFAULT_COORDINATOR_PORT
JOIN_PORT_OFFSET = 2  # the join port, by default: the service port + 2 (7451: a worker)
HTTP_URL_FILE = "http.url"
JOIN_ADDRESS_FILE = "join.address"


class Coordinator:
    """All the coordinator's parts, wired; ``start`` / ``stop`` for tests and ``main``."""

    def __init__(self, state_dir: Path, authority: pki.Authority, host: str, port: int,
                 static_workers: list[str] = (), placement_timeout_s: float = 600.0,
                 advertise: bool = True, discover: bool = True, keep_checkpoints: int = 0,
                 join_port: int | None = 0, http_port: int | None = None,
                 http_host: str | None = None, dashboard_open: bool = False,
                 tensorboard_dir: Path | None = None, http_required: bool = True,
                 rank_actor: type | None = None,
                 restart_backoff_s: float = RestartPolicy.base_s, elastic_grace_s: float = 60.0,
                 unreachable_grace_s: float = 60.0):
        # One coordinator per state folder: two would schedule from one database, admit the same
        # workers and stop each other's ranks (an outside run: a hand-started one beside the
        # service's). FolderInUseError names the holder.
        self._state_lock = StateLock.acquire(state_dir, "herd coordinator")
        self.state_dir = state_dir
        self.authority = authority
        self.identity = pki.load_or_issue(authority.folder, "coordinator")
        self.revoked = Revocations(authority.folder)
        self.store = JobStore(state_dir / DATABASE)
        self.registry = Registry(self.identity,
                                 on_lost=lambda *a: self.scheduler.on_worker_lost(*a),
                                 static_targets=list(static_workers), revoked=self.revoked)
        self.server = secure_server(self.identity, RULES, max_workers=32, revoked=self.revoked)
        self.host = host
        self.port = bind(self.server, self.identity, netif.hostport(host, port))
        self._join_port = join_port  # None: no join port (a test, or joins done elsewhere)
        self.join_server = None
        self.join_address = ""
        # cluster.backend: ray, when Ray is installed and the CLI gave the rank actor's class.
        self.ray = None
        if rank_actor is not None and importlib.util.find_spec("ray") is not None:
            from coordinator.ray_backend import RayBackend

            self.ray = RayBackend(rank_actor, lambda: self.address,
                                  lambda *a: self.scheduler.on_worker_lost(*a),
                                  lambda *a: self.scheduler.on_rank_lost(*a),
                                  authority=authority)
        self.blobs = blobs = BlobStore(state_dir / "blobs")  # datasets, the model store's files
        self.adapters = adapters = AdapterStore(state_dir / "adapters")
        self.keep_checkpoints = keep_checkpoints
        self.models = ModelCatalog(ModelStore(state_dir / "models", blobs))
        self.scheduler = Scheduler(self.store, self.registry.workers,
                                   GrpcLauncher(self.registry, lambda: self.address, authority),
                                   placement_timeout_s=placement_timeout_s,
                                   backends={"ray": self.ray} if self.ray else None,
                                   models=self.models,
                                   restart_policy=RestartPolicy(base_s=restart_backoff_s),
                                   checkpoints=adapters,
                                   elastic_grace_s=elastic_grace_s,
                                   unreachable_grace_s=unreachable_grace_s)
        # The HTTP side (None: off): the metrics stream, and the server that shows it.
        self.hub = MetricsHub(self.store, self.scheduler.wait_for_events)
        add_to_server(CoordinatorServicer(self.scheduler, self.registry, blobs, adapters,
                                          self.models, keep_checkpoints=keep_checkpoints,
                                          on_deleted=self.hub.forget),
                      self.server)
        self.tensorboard = None
        if tensorboard_dir is not None:
            from coordinator.web.tensorboard import TensorBoardWriter

            self.tensorboard = TensorBoardWriter(tensorboard_dir)
            self.hub.subscribe(self.tensorboard)
        self.web = None
        self.http_required = http_required
        (state_dir / HTTP_URL_FILE).unlink(missing_ok=True)
        if http_port is not None:
            http_host = http_host or host
            auth = WebAuth(authority.api_secret(),
                           anonymous_read=dashboard_open or is_loopback(http_host),
                           bind_host=http_host,
                           generation=lambda: api_tokens.generation(authority.folder))
            self.web = WebServer(WebContext(self.store, self.scheduler, self.hub,
                                            self.scheduler.workers, blobs, adapters, auth,
                                            self.models, keep_checkpoints),
                                 http_host, http_port)
        self._advertise = advertise
        self._discover = discover  # False: only the static workers (`herd up` adopts no others)
        self._stop = threading.Event()
        self._zc = None
        self._advert = None

    @property
    def address(self) -> str:
        return netif.hostport(self.host, self.port)

    def _start_web(self) -> None:
        try:
            self.web.start()
        except HerdError as e:
            if self.http_required:
                raise
            # The default port is taken (another coordinator on this box?): the control plane
            # matters more than its dashboard.
            logger.warning("http_not_started", error=e.message)
            print(f"herd coordinator: no dashboard: {e.message}", flush=True)
            self.web = None
            return
        # Where `herd up` (and a user) finds the dashboard.
        (self.state_dir / HTTP_URL_FILE).write_text(self.web.url + "\n")

    def start(self) -> None:
        if self.web is not None:
            self._start_web()
        self.scheduler.recover()
        self.server.start()
        if self._join_port is not None:
            wanted = netif.hostport(self.host, self._join_port)
            self.join_server, port = serve_join(self.authority, wanted)
            if port:
                self.join_address = netif.hostport(self.host, port)
                # Where `herd token` on this machine finds it (`herd up` picks a free port).
                (self.state_dir / JOIN_ADDRESS_FILE).write_text(self.join_address + "\n")
            else:
                logger.warning("join_port_unavailable", address=wanted)
        self._zc = discovery.make_zeroconf()
        if self._discover:
            self.registry.browse(self._zc)
        self.registry.start()
        threading.Thread(target=control_loop, args=(self.scheduler, self._stop), daemon=True,
                         name="scheduler").start()
        threading.Thread(target=self.hub.run, args=(self._stop,), daemon=True,
                         name="metrics-hub").start()
        threading.Thread(target=self._housekeeping, daemon=True, name="housekeeping").start()
        if self._advertise:
            # A unique instance (and mDNS host) name: two coordinators on machines with the same
            # host name must not publish conflicting address records for one name.
            self._advert = discovery.Advertiser(
                self._zc, discovery.COORDINATOR_TYPE,
                f"herd-{socket.gethostname()}-{self.port}-{secrets.token_hex(3)}",
                self.host, self.port,
                {"port": str(self.port), "protocol": str(PROTOCOL_VERSION),
                 "join": self.join_address.rsplit(":", 1)[-1] if self.join_address else ""})
        logger.info("coordinator_started", address=self.address, state_dir=str(self.state_dir))

    def _housekeeping(self, every_s: float = 3600.0) -> None:
        """Unused uploads and removed jobs' adapters swept, and checkpoints beyond
        --keep-checkpoints pruned, at start and then hourly (coordinator/housekeeping.py)."""
        while True:
            try:
                housekeeping.prune_checkpoints(self.store, self.adapters, self.keep_checkpoints)
                housekeeping.sweep_blobs(self.store, self.models.store, self.blobs, time.time())
                housekeeping.sweep_adapters(self.store, self.adapters, time.time())
            except Exception:  # (a full disk, a store being closed): next time
                logger.exception("housekeeping_failed")
            if self._stop.wait(every_s):
                return

    def stop(self) -> None:
        self._stop.set()
        self.scheduler.stopping.set()  # (before the calls it makes are cut)
        if self.web is not None:
            self.web.stop()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self._advert:
            self._advert.close()
        self.registry.close()
        if self.join_server:
            self.join_server.stop(grace=0)
        if self.ray:
            self.ray.close()
        self.server.stop(grace=2).wait()
        if self._zc:
            self._zc.close()
        self.store.close()
        (self.state_dir / JOIN_ADDRESS_FILE).unlink(missing_ok=True)
        self._state_lock.release()


DESCRIPTION = """\
Run the coordinator: the control plane of a cluster (one per cluster, on any Mac or Linux box).

It finds workers by zeroconf (or --worker), admits those whose certificate the cluster CA signed
for their id (mutual TLS), places
jobs on them, relays their progress and keeps every job, event, log and checkpoint in its state
folder (SQLite + files), so a restarted coordinator still lists them. It advertises itself by
zeroconf; the CLI finds it there, or through --coordinator HOST[:PORT] / $HERD_COORDINATOR."""


def _http_port(arg: int | None) -> int | None:
    if arg is None:
        return DEFAULT_HTTP_PORT
    return None if arg < 0 else arg


def main(argv: list[str], rank_actor: type | None = None) -> int:
    """``rank_actor``: the Ray rank actor's class (the CLI passes the worker plane's)."""
    p = argparse.ArgumentParser(prog="herd coordinator", description=DESCRIPTION,
                                formatter_class=HelpFormatter)
    p.add_argument("--state-dir", type=Path, default=None,
                   help="jobs, checkpoints and logs (default: $HERD_HOME/coordinator)")
    p.add_argument("--host", default=None,
                   help="address to serve and advertise (default: the first address in "
                   "$HERD_ZEROCONF_INTERFACES, else this machine's LAN address, Ethernet before "
                   "Wi-Fi; a warning if only loopback)")
    p.add_argument("--port", type=port_number, default=DEFAULT_PORT, help="0 = any free port")
    p.add_argument("--worker", action="append", default=[], metavar="HOST:PORT",
                   help="a worker to use without zeroconf (repeatable); still verified")
    p.add_argument("--no-discovery", action="store_true",
                   help="use only the --worker workers, never ones found by zeroconf")
    p.add_argument("--placement-timeout", type=at_least(0, float), default=600.0, metavar="SECONDS",
                   help="fail a job that cannot be placed for this long because too few workers "
                   "are verified (one queued behind other jobs waits for them)")
    p.add_argument("--restart-backoff", type=at_least(0, float), default=RestartPolicy.base_s,
                   metavar="S",
                   help="wait before restarting a failed attempt; doubles with each failure in "
                   f"{RestartPolicy.flap_window_s / 60:.0f} min, up to {RestartPolicy.cap_s:.0f}s")
    p.add_argument("--elastic-grace", type=at_least(0, float), default=60.0, metavar="S",
                   help="a job that lost a worker this long carries on with the workers left "
                   "(same global batch; a data x pipeline job by whole replicas) and grows back "
                   "at a checkpoint; not a single pipeline, nor a job whose cluster.parallelism "
                   "pins data; 0: wait")
    p.add_argument("--unreachable-grace", type=at_least(0, float), default=60.0, metavar="S",
                   help="a worker that stops answering while its ranks may train on (this "
                   "machine's link broke?) is waited for this long before its attempt restarts; "
                   "a rank that loses it fails sooner; 0: restart at once")
    p.add_argument("--keep-checkpoints", type=at_least(0), default=0, metavar="N",
                   help="keep each job's N newest checkpoints and delete older ones (0 = all); "
                   "`herd rm JOB` deletes a finished job whole")
    p.add_argument("--join-port", type=port_number, default=None,
                   help=f"port for `herd join` (default: --port + {JOIN_PORT_OFFSET}; 0 = any)")
    p.add_argument("--no-join", action="store_true", help="serve no join port")
    p.add_argument("--tls-dir", type=Path, default=None,
                   help="the cluster CA and this coordinator's certificate (default: "
                   "$HERD_HOME/tls, made by `herd init`)")
    p.add_argument("--ray", metavar="ADDRESS", default=None,
                   help="connect to this Ray cluster at start ('auto': the local one) so `herd "
                   "workers` lists its nodes; else the first cluster.backend: ray job connects")
    p.add_argument("--http-port", type=port_or_off, default=None,
                   help=f"dashboard, /metrics and job API (default {DEFAULT_HTTP_PORT}, skipped "
                   "with a warning when busy; 0 = any; -1 = off)")
    p.add_argument("--http-host", default=None, help="address to serve HTTP on (default: --host)")
    p.add_argument("--dashboard-open", action="store_true",
                   help="let anyone who reaches the HTTP port read the dashboard and /metrics "
                   "without the API token (always so on loopback), at an IP address or this "
                   "machine's name (not another DNS name: DNS rebinding); the job API still "
                   "wants it")
    p.add_argument("--tensorboard", type=Path, default=None, metavar="DIR",
                   help="also write each job's metrics as TensorBoard event files in DIR/<job>")
    args = p.parse_args(argv[1:])
    host = (args.host or discovery.interfaces_host() or "").strip("[]")
    if not host:
        choice = netif.choose_control()
        host = choice.address
        if choice.warning:
            print(f"herd coordinator: warning: {choice.warning}", file=sys.stderr, flush=True)
            logger.warning("control_address_fallback", address=host, reason=choice.warning)
    join_port = None if args.no_join else (
        args.join_port if args.join_port is not None
        else (args.port + JOIN_PORT_OFFSET if args.port else 0))
    if join_port and join_port == args.port:  # (one bind failed, and a token named it)
        p.error(f"--join-port {join_port} is --port: the join port needs its own")
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    state_dir = args.state_dir or pki.default_home() / "coordinator"
    if not wait_until_writable(state_dir / DATABASE, done):
        return 0
    try:
        authority = pki.Authority.load(args.tls_dir or pki.default_dir())
        coord = Coordinator(state_dir, authority,
                            host, args.port, args.worker, args.placement_timeout,
                            discover=not args.no_discovery,
                            keep_checkpoints=max(0, args.keep_checkpoints),
                            join_port=join_port,
                            http_port=_http_port(args.http_port),
                            http_required=args.http_port is not None,
                            http_host=args.http_host, dashboard_open=args.dashboard_open,
                            tensorboard_dir=args.tensorboard, rank_actor=rank_actor,
                            restart_backoff_s=args.restart_backoff,
                            elastic_grace_s=args.elastic_grace,
                            unreachable_grace_s=args.unreachable_grace)
    except HerdError as e:
        print(f"herd coordinator: {e}", flush=True)
        return e.exit_code
    if coord.port == 0:
        print(f"herd coordinator: cannot listen on {netif.hostport(host, args.port)}", flush=True)
        return 1
    try:
        coord.start()
        if args.join_port and join_port and not coord.join_address:  # asked for: not a warning
            raise HerdError("the join port cannot listen on "
                            f"{netif.hostport(host, args.join_port)}",
                            hint="choose another --join-port")
    except HerdError as e:  # the HTTP or join port it was asked for is taken
        print(f"herd coordinator: {e}", flush=True)
        coord.stop()
        return e.exit_code
    if args.ray:
        try:
            if coord.ray is None:
                raise HerdError("--ray needs Ray where the coordinator runs",
                                hint="pip install 'herd[ray]'")
            coord.ray.connect_to(args.ray)
        except HerdError as e:
            print(f"herd coordinator: {e}", flush=True)
            coord.stop()
            return e.exit_code
    print(f"herd coordinator listening on {coord.address}", flush=True)
    if coord.join_address:
        token = make_token(authority, coord.join_address, "worker")
        print(f"to add a Mac (valid 15 minutes; `herd token` makes more):\n"
              f"  herd join {token.encode()}", flush=True)
    if coord.web is not None:
        print(f"herd coordinator: dashboard at {coord.web.url}", flush=True)
    # Wake up now and then: a signal the OS hands to another thread does not interrupt a wait
    # without a timeout, so the handler would only run when something else woke this thread.
    while not done.wait(1.0):
        pass
    logger.info("coordinator_stopping")
    coord.stop()
    return 0
