"""``herd worker``: the agent daemon, one per machine.

It probes the machine (machine.py), serves WorkerService over mutual TLS to the coordinator only
(service.py), advertises ``_herd-worker._tcp.local.`` (TXT: id, port, protocol version, memory,
chip, mlx version; no secrets) and runs at most one job's rank at a time (rank_process.py,
relay.py). Its id is the name in its certificate (``herd join`` made it); what jobs may ask of it
(code from a model, where models come from) is its owner's call (policy.py).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import sys
import threading
import time
from pathlib import Path

from herd import log, netif
from herd.errors import ConfigError, HerdError, PeerLostError
from herd.rpc import discovery, pki
from herd.rpc.channel import bind, secure_server
from herd.rpc.ports import in_use, kept_ports
from herd.usage import HelpFormatter, at_least, port_number
from worker.agent import ray_join, state
from worker.agent.machine import probe
from worker.agent.model_cache import ModelCache
from worker.agent.orphans import stop_orphans
from worker.agent.policy import (
    MODEL_ROOTS_ENV,
    REMOTE_CODE_ENV,
    Policy,
    default_model_roots,
)
from worker.agent.service import RULES, Worker, WorkerServicer, add_to_server, advert_txt

logger = log.get(__name__)


def parse_bytes(text: str) -> int:
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    return int(float(num) * units[unit])


DESCRIPTION = """\
Run a worker agent on this machine (one per Mac; it loads no model itself).

It advertises itself by zeroconf, answers the coordinator's authenticated calls, and runs one
job's rank at a time as its own process (`python -m worker.rank`), relaying its progress, its
output and its checkpoints to the coordinator.

Several agents on one machine each get their own state folder and id by default: the first free
of $HERD_HOME/worker, worker-2, worker-3, ...; a folder in use by another agent is refused."""


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="herd worker", description=DESCRIPTION,
                                formatter_class=HelpFormatter)
    p.add_argument("--state-dir", type=Path, default=None,
                   help="this agent's folder (default: the first free of $HERD_HOME/worker, "
                   "$HERD_HOME/worker-2, ...)")
    p.add_argument("--host", default=None,
                   help="control address: serve WorkerService and advertise here (default: the "
                   "first address in $HERD_ZEROCONF_INTERFACES, else this machine's LAN address, "
                   "Ethernet before Wi-Fi; a warning if only loopback)")
    p.add_argument("--data", action="append", default=[], metavar="IFACE[=KIND]",
                   help="a data interface (name or address) for gradients, e.g. en5 or "
                   "10.0.0.2; repeatable; default: every interface, the coordinator picks the "
                   "fastest shared one. =KIND states its kind (thunderbolt, ethernet, wifi, "
                   "loopback, other) where the OS cannot tell")
    p.add_argument("--port", type=port_number, default=0,
                   help="WorkerService port (0 = the one this state folder used last, when free; "
                   "else any free)")
    p.add_argument("--ring-port", type=port_number, default=0,
                   help="MLX ring port for ranks (0 = a free one in 20000-32767, outside the "
                   "OS's ephemeral range: no outgoing connection can take it between two jobs)")
    p.add_argument("--exchange-port", type=port_number, default=0,
                   help="gRPC exchange port for ranks (0 = as --ring-port)")
    p.add_argument("--id", default=None,
                   help="worker id: the name in this worker's certificate (default: that name; "
                   "on the CA's machine a certificate is made for the id kept in the state "
                   "folder, hostname + a random suffix)")
    p.add_argument("--no-advertise", action="store_true",
                   help="no zeroconf advert: only a coordinator started with --worker "
                   "HOST:PORT uses this worker (herd up's workers; a LAN without multicast)")
    p.add_argument("--keep-attempts", type=at_least(0), default=10, metavar="N",
                   help="keep the N newest job attempt folders (rank logs, checkpoints, data "
                   "links) and delete older ones; 0 = keep all")
    p.add_argument("--memory", default=None,
                   help="report this much memory instead of the machine's, e.g. 64GB (to try "
                   "placement and planning on a small machine)")
    p.add_argument("--chip", default=None, help="report this chip name instead of the machine's")
    p.add_argument("--model-cache", type=Path, default=None,
                   help="where fetched model files are kept (default: STATE_DIR/models)")
    p.add_argument("--model-cache-max", default=None,
                   help="bound the model cache, e.g. 500GB (least recently used files go first)")
    p.add_argument("--tls-dir", type=Path, default=None,
                   help="this worker's certificate and the cluster CA (default: $HERD_HOME/tls, "
                   "written by `herd join`)")
    p.add_argument("--model-root", type=Path, action="append", default=None, metavar="FOLDER",
                   help="a folder jobs may load models from (repeatable; default "
                   "$HERD_HOME/models and the Hugging Face cache); hub ids are always allowed")
    p.add_argument("--allow-remote-code", action="store_true",
                   help="let jobs set trust_remote_code: true, which runs Python shipped with a "
                   "model inside the rank (only if you trust every job submitter)")
    p.add_argument("--ray", metavar="ADDRESS", default=None,
                   help="join the Ray cluster at ADDRESS (or 'head': start one here) as a herd "
                   "node for cluster.backend: ray, instead of serving; arguments after -- go to "
                   "`ray start` (docs/ray.md)")
    args, extra = p.parse_known_args(argv[1:])
    if extra and not (args.ray and extra[0] == "--"):
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.ray:  # its rank actors get their credentials from the coordinator, per actor
            machine = probe(parse_bytes(args.memory) if args.memory else None, args.chip)
            # ...and this owner's policy through `ray start`'s environment (flags given here
            # override it; unset, the actors use the default model roots and run no code)
            if args.model_root:
                os.environ[MODEL_ROOTS_ENV] = os.pathsep.join(map(str, args.model_root))
            if args.allow_remote_code:
                os.environ[REMOTE_CODE_ENV] = "1"
            return ray_join.join(machine, args.ray, args.host, extra[1:])
        # (the address it will serve on when given or pinned; else chosen below, bind says)
        host = (args.host or discovery.interfaces_host() or "").strip("[]")
        if args.port and host and in_use(args.port, host):
            # (before a state folder is taken or a certificate issued: each failed start made
            # a worker name no one could have again, and a folder the next agent skipped)
            raise HerdError(f"port {args.port} is in use on {host}",
                            hint="another `herd worker` may hold it (`herd worker --port 0` "
                            "takes a free one)")
        lock = state.claim(args.state_dir, pki.default_home())
        # The worker id is the name its certificate holds: the coordinator admits it by that. On
        # the CA's own machine each state folder gets its own (its kept id), so several agents
        # there are several workers; elsewhere the certificate `herd join` wrote names it.
        tls = args.tls_dir or pki.default_dir()
        name = args.id or (state.worker_id(lock.folder, None)
                           if pki.Authority.exists(tls) else None)
        identity = pki.load_or_issue(tls, "worker", name)
        if name is None and args.tls_dir is None and args.state_dir is None and (
                lock.folder.name != "worker"):
            # Another agent serves this machine's one joined identity from ~/.herd/worker: a
            # second one under the same id would make the coordinator flip between the two.
            raise ConfigError(
                f"this machine joined the cluster as worker {identity.name} (its certificate "
                f"in {tls}), which the agent on {lock.folder.parent / 'worker'} serves; a "
                "second agent here needs a member name of its own",
                hint="herd join TOKEN --id NAME (a worker token), then herd worker --id NAME")
    except HerdError as e:
        print(f"herd worker: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    try:
        interfaces = netif.select_data(netif.probe_interfaces(), args.data)
    except ValueError as e:
        print(f"herd worker: {e}", flush=True)
        return 2
    if not host:
        choice = netif.choose_control(interfaces)
        host = choice.address
        if choice.warning:
            print(f"herd worker: warning: {choice.warning}", file=sys.stderr, flush=True)
            logger.warning("control_address_fallback", address=host, reason=choice.warning)
    state_dir = lock.folder
    stop_orphans(state_dir)  # ranks a crashed agent left on this state folder, before serving
    worker_id = identity.name
    machine = probe(parse_bytes(args.memory) if args.memory else None, args.chip)
    policy = Policy(args.allow_remote_code, tuple(args.model_root or default_model_roots()))

    server = secure_server(identity, RULES, max_workers=16, max_calls_per_peer=12)
    # --port 0: the port this state folder served on last time when it is free, else any.
    port = (args.port == 0 and (kept := state.kept_port(state_dir))
            and bind(server, identity, netif.hostport(host, kept)))
    port = port or bind(server, identity, netif.hostport(host, args.port))
    if port == 0:
        print(f"herd worker: cannot listen on {netif.hostport(host, args.port)}", flush=True)
        return 1
    state.keep_port(state_dir, port)
    cache = ModelCache(args.model_cache or state_dir / "models", worker_id,
                       parse_bytes(args.model_cache_max) if args.model_cache_max else 0)
    # Rank ports are chosen once here and reused: a worker runs one rank at a time, and the
    # coordinator must know every rank's port before any starts. Free on every address (a rank
    # binds whichever data address the coordinator picks).
    ring_port, exchange_port = kept_ports(2)
    worker = Worker(worker_id, host, port, args.ring_port or ring_port,
                    args.exchange_port or exchange_port, machine, state_dir, identity, interfaces,
                    policy, cache)
    worker.keep_attempts = max(0, args.keep_attempts)
    add_to_server(WorkerServicer(worker), server)
    server.start()
    # (--no-advertise: found only by a coordinator that names it; another coordinator of the
    # same cluster CA on this LAN never sees it: `herd up`'s own workers)
    zc = None if args.no_advertise else discovery.make_zeroconf()
    advert = zc and discovery.Advertiser(zc, discovery.WORKER_TYPE, worker_id, host, port,
                                         advert_txt(worker.info()))
    logger.info("worker_started", worker_id=worker_id, address=netif.hostport(host, port),
                data=[f"{i.name}={i.kind}" for i in interfaces if i.data],
                memory_bytes=machine.memory_bytes, chip=machine.chip, state_dir=str(state_dir),
                allow_remote_code=policy.allow_remote_code,
                model_roots=[str(r) for r in policy.model_roots])
    print(f"herd worker {worker_id} listening on {netif.hostport(host, port)}, state in "
          f"{state_dir}", flush=True)

    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    # Wake up now and then: a signal the OS hands to another thread does not interrupt a wait
    # without a timeout, so the handler would only run when something else woke this thread.
    gone, code = AddressWatch(host), 0
    while not done.wait(1.0):
        # (a rank that runs is left to finish: it may train on over a data cable while the
        # control address is away, e.g. Wi-Fi dropped; the agent stops once it has ended)
        if gone.check() and not (worker.rank and worker.rank.running()):
            print(f"herd worker: this machine no longer has the address {host} it serves and "
                  "advertises (its network changed: a new DHCP lease, another Wi-Fi); stopping "
                  "so that it starts again on the new one (launchd and systemd restart it; by "
                  "hand: run `herd worker` again)", file=sys.stderr, flush=True)
            logger.error("worker_address_gone", worker_id=worker_id, address=host)
            code = PeerLostError.exit_code
            break
    logger.info("worker_stopping", worker_id=worker_id)
    if advert:
        advert.close()
    worker.stop_all()
    server.stop(grace=2).wait()
    if zc:
        zc.close()
    lock.release()
    return code


class AddressWatch:
    """Whether the address the agent serves on left this machine: its server is bound to it and
    its advert names it, so a renumbered Mac was refused at its old address until restarted, its
    own log silent (an outside run). Checked every ``every_s``; gone after two checks in a row
    (an interface being reconfigured may miss it for a moment). Loopback never leaves."""

    def __init__(self, host: str, every_s: float = 5.0, clock=time.monotonic):
        self.host, self.every_s, self._clock = host, every_s, clock
        self._next, self._misses = clock() + every_s, 0
        try:
            self._watched = not ipaddress.ip_address(host.split("%")[0]).is_loopback
        except ValueError:  # --host NAME: the name may follow the machine anywhere
            self._watched = False

    def check(self) -> bool:
        if not self._watched or self._clock() < self._next:
            return False
        self._next = self._clock() + self.every_s
        here = netif.local_network(self.host.split("%")[0]) is not None
        self._misses = 0 if here else self._misses + 1
        return self._misses >= 2
