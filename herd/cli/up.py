"""``herd up --workers N [--detach]`` and ``herd down``: a whole cluster on loopback.

One coordinator and N worker agents, each its own process with its own state dir under
--state-dir, zeroconf limited to 127.0.0.1. They use the cluster CA in $HERD_HOME/tls (made as
``herd init`` makes it, if there is none): each worker gets its own certificate in its state dir,
as ``herd join`` would give it. A local cluster belongs to the user who starts it, so its workers
take models from anywhere that user can read (``--model-root /``) unless told otherwise. The
coordinator uses exactly the workers it started (their addresses are given to it; it looks for
no others), so other agents of the same cluster CA on this machine are never adopted; its
workers advertise nothing (`herd worker --no-advertise`), so no other coordinator adopts them. The
coordinator's address is printed and written to STATE_DIR/coordinator.address; Ctrl-C (or
SIGTERM, or ``herd down``) stops all. A state dir holds one ``herd up`` at a time (STATE_DIR/lock).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from herd import log
from herd.errors import AuthError, HerdError, NotFoundError
from herd.parent_death import die_with_parent
from herd.rpc import discovery, pki
from herd.rpc.ports import free_ports
from herd.state_lock import StateLock, held, private_folder, read_holder
from herd.usage import HelpFormatter, at_least, port_number, port_or_off

logger = log.get(__name__)
HOST = "127.0.0.1"
WHO = "herd up"


def _authority(folder: Path) -> pki.Authority:
    """The CA in ``folder``, made with this machine's coordinator and client certificates when
    there is none (what ``herd init`` does)."""
    if pki.Authority.exists(folder):
        return pki.Authority.load(folder)
    ca = pki.Authority.create(folder)
    for role in ("coordinator", "client"):
        ca.issue(role, pki.host_label()).save(folder)
    print(f"herd up: made a cluster CA in {folder}", flush=True)
    return ca


def worker_id(ca: pki.Authority, n: int) -> str:
    """`herd up`'s n-th worker: ``worker-N-TAG``, TAG from this cluster's CA, so two clusters on
    one machine (two HERD_HOMEs, each advertising on loopback) never announce the same id; the
    same state folder keeps its ids across restarts. (Its folder stays ``worker-N``.)"""
    return f"worker-{n}-{ca.fingerprint[:4]}"


def _worker_tls(ca: pki.Authority, folder: Path, worker_id: str) -> Path:
    """The worker's certificate in its state dir: kept while it is this CA's, else made anew."""
    try:
        ident = pki.Identity.load(folder, "worker")
        if ident.name == worker_id and ident.ca_pem == ca.ca_pem:
            return folder
    except AuthError:
        pass
    ca.issue("worker", worker_id).save(folder)
    return folder


def _die_with_parent() -> None:
    """The child gets SIGTERM if `herd up` dies, even by SIGKILL (no orphaned cluster). Safe:
    children are spawned from the main thread, which lives as long as we do."""
    die_with_parent(signal.SIGTERM)


def _port_in_use(host: str, port: int) -> str:
    """Why ``herd up`` cannot serve its coordinator on ``port`` ("" when it can): checked before
    anything starts, since a coordinator already there (`herd coordinator` of the Quickstart,
    another `herd up`) would answer for the new cluster, which would stop itself unseen."""
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (a port in TIME_WAIT is free)
        try:
            s.bind((host, port))
        except OSError as e:
            return (f"herd up: {host}:{port} is in use ({e.strerror}): another coordinator? "
                    "`herd down` stops a herd up; or pass --port N (and --http-port)")
    return ""


def _wait_port(proc: subprocess.Popen, host: str, port: int, timeout_s: float) -> bool:
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex((host, port)) == 0:
                return True
        time.sleep(0.1)
    return False


def _dashboard_url(coord: subprocess.Popen, url_file: Path, timeout_s: float = 10.0) -> str:
    """The dashboard's URL once the coordinator has written it ("" when it serves none)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and coord.poll() is None:
        if url_file.exists():
            return url_file.read_text().strip()
        time.sleep(0.1)
    return ""


def _verified(address: str, identity: pki.Identity) -> tuple[int, list[str]]:
    """The workers the coordinator verified, and why it refused others (`herd workers`)."""
    from herd.cli.connection import CoordinatorConnection
    from protos.v1 import coordinator_pb2

    try:
        with CoordinatorConnection(address, identity) as c:
            reply = c.call("ListWorkers", coordinator_pb2.ListWorkersRequest(), timeout=2.0)
            return len(reply.workers), [f"{r.source or r.target}: {r.reason}"
                                        for r in reply.refused]
    except HerdError:
        return 0, []


def _state_dir(args) -> Path:
    return args.state_dir or pki.default_home() / "local"


def detach(argv: list[str], args) -> int:
    """Starts ``herd up`` again in the background (its own session, its output in up.log), waits
    until its coordinator answers with every worker verified, and returns."""
    state = private_folder(_state_dir(args))
    if held(state):
        pid, _ = read_holder(state)
        print(f"herd up: {state} is in use by {WHO} (pid {pid}); `herd down` stops it",
              file=sys.stderr)
        return 1
    if taken := _port_in_use(HOST, args.port):
        print(taken, file=sys.stderr)
        return 1
    try:  # before the child starts: one CA, made once
        client = pki.load_or_issue(_authority(pki.default_dir()).folder, "client")
    except AuthError as e:
        print(f"herd up: {e}", file=sys.stderr)
        return e.exit_code
    cmd = [sys.executable, "-m", "herd", "up"] + [a for a in argv[1:] if a not in
                                                  ("-d", "--detach")]
    with open(state / "up.log", "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    address = f"{HOST}:{args.port}"
    deadline, refused = time.monotonic() + args.timeout, []
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = (state / "up.log").read_text(errors="replace").strip().splitlines()[-5:]
            print("herd up: the background cluster stopped at once:\n  " + "\n  ".join(tail),
                  file=sys.stderr)
            return proc.returncode or 1
        verified, refused = _verified(address, client)
        if verified >= args.workers:
            print(f"herd up: coordinator at {address}, {args.workers} workers, in the background "
                  f"(pid {proc.pid}; logs in {state})\n"
                  f"  export HERD_COORDINATOR={address}   # or pass --coordinator {address}\n"
                  f"  herd down{'' if args.state_dir is None else f' --state-dir {state}'}"
                  "   # stops it", flush=True)
            url_file = state / "coordinator" / "http.url"
            if url_file.exists():
                print(f"  dashboard: {url_file.read_text().strip()}   (`herd api-token` prints "
                      "the token for the job API)", flush=True)
            return 0
        time.sleep(0.3)
    print(f"herd up: not ready after {args.timeout:.0f} s; it keeps starting in the background "
          f"(pid {proc.pid}, logs in {state}); `herd down` stops it"
          # (a revoked worker's id kept it from ever being ready, with no word why: outside run)
          + "".join(f"\n  refused {r}" for r in refused), file=sys.stderr)
    return 5


# `herd up` restarts a process that died, unless this many restarts fall within the window.
MAX_RESTARTS, RESTART_WINDOW_S = 5, 60.0


def run(args) -> int:
    tls = pki.default_dir()
    state = _state_dir(args)
    if taken := _port_in_use(HOST, args.port):
        print(taken, file=sys.stderr)
        return 1
    try:
        ca = _authority(tls)
        lock = StateLock.acquire(state, WHO)
    except HerdError as e:
        print(f"herd up: {e}", file=sys.stderr)
        return e.exit_code
    env = dict(os.environ)
    env[discovery.INTERFACES_ENV] = HOST
    # Ranks on one box share its cores: give each rank's BLAS its share, not all of them.
    env.setdefault("OPENBLAS_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.workers)))
    py = [sys.executable, "-m", "herd"]
    procs: dict[str, subprocess.Popen] = {}
    cmds: dict[str, list[str]] = {}

    def spawn(name: str, cmd: list[str]) -> subprocess.Popen:
        out = open(state / f"{name}.log", "ab")
        proc = subprocess.Popen(py + cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        out.close()
        procs[name], cmds[name] = proc, cmd
        return proc

    def stop_all() -> None:
        for proc in reversed(procs.values()):
            if proc.poll() is None:
                proc.terminate()
        for name, proc in procs.items():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                logger.warning("killed_unresponsive", process=name)

    # The workers' ports are chosen here and given to the coordinator: it uses those workers,
    # and (unless --adopt) looks for no others.
    ports = free_ports(args.workers, HOST) if args.workers else []
    coord_cmd = ["coordinator", "--host", HOST, "--port", str(args.port),
                 "--state-dir", str(state / "coordinator"), "--tls-dir", str(tls),
                 "--join-port", "0",
                 "--placement-timeout", str(args.placement_timeout),
                 "--keep-checkpoints", str(args.keep_checkpoints)]
    coord_cmd += (["--restart-backoff", str(args.restart_backoff)]
                  if args.restart_backoff is not None else [])
    coord_cmd += [f"--worker={HOST}:{p}" for p in ports]
    coord_cmd += (["--http-port", str(args.http_port)] if args.http_port is not None else []) + (
        ["--dashboard-open"] if args.dashboard_open else []) + (
        ["--tensorboard", str(args.tensorboard)] if args.tensorboard else [])
    coord = spawn("coordinator", coord_cmd + ([] if args.adopt else ["--no-discovery"]))
    if not _wait_port(coord, HOST, args.port, 30.0):
        stop_all()
        lock.release()
        print(f"herd up: the coordinator did not start; see {state / 'coordinator.log'}",
              file=sys.stderr)
        return 1
    for i, port in enumerate(ports):
        name, folder = worker_id(ca, i + 1), state / f"worker-{i + 1}"
        # (--no-advertise: another coordinator of this cluster CA on the machine, e.g. the
        # Quickstart's, would adopt them and run its jobs there: an outside run)
        cmd = ["worker", "--no-advertise", "--host", HOST, "--port", str(port), "--id", name,
               "--state-dir", str(folder), "--keep-attempts", str(args.keep_attempts),
               "--tls-dir", str(_worker_tls(ca, folder / "tls", name))]
        for root in args.model_root or ["/"]:
            cmd += ["--model-root", root]
        cmd += ["--allow-remote-code"] if args.allow_remote_code else []
        spawn(folder.name, cmd + (["--memory", args.memory] if args.memory else []))
    address = f"{HOST}:{args.port}"
    (state / "coordinator.address").write_text(address + "\n")
    print(f"herd up: coordinator at {address}, {args.workers} workers, logs in {state}\n"
          f"  export HERD_COORDINATOR={address}   # or pass --coordinator {address}", flush=True)
    if url := _dashboard_url(coord, state / "coordinator" / "http.url"):
        print(f"  dashboard: {url}   (`herd api-token` prints the token for the job API)",
              flush=True)

    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    code, restarts = 0, []
    while not done.wait(0.5):
        # A process that died is started again on its own state folder, as launchd or systemd
        # would (deploy/): the coordinator re-adopts the ranks that trained on, a worker's job
        # resumes from its last checkpoint. One that keeps dying stops the cluster.
        for name, proc in list(procs.items()):
            if proc.poll() is None:
                continue
            now = time.monotonic()
            restarts = [t for t in restarts if now - t < RESTART_WINDOW_S] + [now]
            if len(restarts) > MAX_RESTARTS:
                print(f"herd up: {name} exited ({proc.returncode}), {len(restarts)} restarts "
                      f"in {RESTART_WINDOW_S:.0f} s; stopping (see {state / name}.log)",
                      file=sys.stderr, flush=True)
                code = 1
                done.set()
                break
            print(f"herd up: {name} exited ({proc.returncode}); starting it again (its log: "
                  f"{state / name}.log)", file=sys.stderr, flush=True)
            spawn(name, cmds[name])
    stop_all()
    lock.release()
    return code


def down(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="herd down", formatter_class=HelpFormatter,
        description="Stop a `herd up` cluster (one started with --detach, or in another "
        "terminal): its coordinator and workers. Exit 7 when none runs on that state folder.")
    p.add_argument("--state-dir", type=Path, default=None,
                   help="the cluster's folder, as given to herd up (default: $HERD_HOME/local)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                   help="how long to wait for it to stop")
    args = p.parse_args(argv[1:])
    state = _state_dir(args)
    pid, what = read_holder(state)
    if not held(state) or pid is None or what != WHO:
        e = NotFoundError(f"no `herd up` runs on {state}", hint="nothing to stop; `herd up "
                          "--detach --state-dir DIR` needs `herd down --state-dir DIR`")
        print(f"herd down: {e}", file=sys.stderr)
        return e.exit_code
    unfinished = _unfinished_jobs(state / "coordinator" / "herd.db")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + args.timeout
    while held(state):
        if time.monotonic() > deadline:
            print(f"herd down: herd up (pid {pid}) is still stopping after {args.timeout:.0f} s",
                  file=sys.stderr)
            return 1
        time.sleep(0.2)
    print(f"herd down: stopped the cluster of {state} (pid {pid})")
    if unfinished:
        again = "herd up" + ("" if args.state_dir is None else f" --state-dir {state}")
        print(f"herd down: {len(unfinished)} unfinished job(s) stopped with it: "
              f"{', '.join(unfinished)}; they go on (running ones from their last checkpoint) "
              f"when `{again}` starts it again", file=sys.stderr)
    return 0


def _unfinished_jobs(db: Path) -> list[str]:
    """The jobs of the cluster's coordinator that have not ended, read from its job database
    (read-only, beside the running coordinator); [] when it cannot be read."""
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            # (coordinator/domain.py JobState's final values, as its store writes them)
            rows = conn.execute("SELECT job_id, state FROM jobs WHERE state NOT IN "
                                "('succeeded', 'failed', 'cancelled') ORDER BY created_ms")
            return [f"{job_id} ({state})" for job_id, state in rows]
    except sqlite3.Error:
        return []


DESCRIPTION = """\
Start a whole cluster on this machine, on loopback: a coordinator and N worker agents, each its
own process and state folder under --state-dir, one cluster CA ($HERD_HOME/tls, made if missing,
as `herd init` makes it), each worker with its own certificate. It uses only the workers it
starts (--adopt: also others of the same cluster CA found by zeroconf). In the foreground
Ctrl-C stops everything; --detach returns once every worker is verified, and `herd down` stops
it."""


def main(argv: list[str]) -> int:
    if argv[0] == "down":
        return down(argv)
    p = argparse.ArgumentParser(prog="herd up", description=DESCRIPTION,
                                formatter_class=HelpFormatter)
    p.add_argument("--workers", type=at_least(1), default=2, help="worker agents to start")
    p.add_argument("--state-dir", type=Path, default=None,
                   help="logs and state of every process (default: $HERD_HOME/local)")
    p.add_argument("--port", type=port_number, default=7450, help="coordinator port")
    p.add_argument("-d", "--detach", action="store_true",
                   help="run in the background; return once every worker is verified")
    p.add_argument("--timeout", type=at_least(0, float), default=120.0, metavar="SECONDS",
                   help="with --detach: how long to wait for the workers (then exit 5)")
    p.add_argument("--adopt", action="store_true",
                   help="also use workers it did not start, found by zeroconf (same cluster CA)")
    p.add_argument("--memory", default=None,
                   help="each worker reports this much memory instead of the machine's, e.g. "
                   "64GB")
    p.add_argument("--placement-timeout", type=at_least(0, float), default=600.0, metavar="SECONDS",
                   help="fail a job that cannot be placed for this long because too few workers "
                   "are verified (one queued behind other jobs waits for them)")
    p.add_argument("--restart-backoff", type=at_least(0, float), default=None, metavar="S",
                   help="a failed attempt restarts after S seconds, doubling with each failure "
                   "in 10 minutes (the coordinator's --restart-backoff; default: its own, 5 s)")
    p.add_argument("--model-root", action="append", default=None, metavar="FOLDER",
                   help="folders the workers take models from (repeatable; default: /)")
    p.add_argument("--allow-remote-code", action="store_true",
                   help="let jobs set trust_remote_code (passed to every worker)")
    p.add_argument("--keep-checkpoints", type=at_least(0), default=0, metavar="N",
                   help="the coordinator keeps each job's N newest checkpoints (0 = all)")
    p.add_argument("--keep-attempts", type=at_least(0), default=10, metavar="N",
                   help="each worker keeps its N newest job attempt folders (0 = all)")
    p.add_argument("--http-port", type=port_or_off, default=None,
                   help="the coordinator's dashboard, /metrics and job API (default 7480)")
    p.add_argument("--dashboard-open", action="store_true",
                   help="read access without the API token (already so on loopback)")
    p.add_argument("--tensorboard", type=Path, default=None, metavar="DIR",
                   help="also write TensorBoard event files in DIR/<job>")
    args = p.parse_args(argv[1:])
    return detach(argv, args) if args.detach else run(args)
