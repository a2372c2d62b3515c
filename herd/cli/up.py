"""``herd up --workers N``: a whole cluster on loopback in one command.

One coordinator and N worker agents, each its own process with its own state dir under
--state-dir, all sharing one cluster secret, zeroconf limited to 127.0.0.1. The coordinator's
address is printed and written to STATE_DIR/coordinator.address; Ctrl-C (or SIGTERM) stops all.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from herd import log
from herd.errors import AuthError
from herd.rpc import discovery
from herd.rpc.auth import SECRET_ENV, default_home, load_secret, write_secret

logger = log.get(__name__)
HOST = "127.0.0.1"


def _secret(home: Path) -> str:
    try:
        return load_secret(home / "secret")
    except AuthError:
        secret = write_secret(home / "secret")
        print(f"herd up: wrote a new cluster secret to {home / 'secret'}", flush=True)
        return secret


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM if `herd up` dies, even by SIGKILL (no orphaned cluster).
    Safe here because children are spawned from the main thread, which lives as long as we do."""
    if sys.platform != "linux":
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


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


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="herd up", description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--state-dir", type=Path, default=None, help="default $HERD_HOME/local")
    p.add_argument("--port", type=int, default=7450, help="coordinator port")
    p.add_argument("--memory", default=None, help="each worker poses with this much memory")
    p.add_argument("--placement-timeout", type=float, default=600.0)
    args = p.parse_args(argv[1:])
    home = default_home()
    state = args.state_dir or home / "local"
    state.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env[SECRET_ENV] = _secret(home)
    env[discovery.INTERFACES_ENV] = HOST
    # Ranks on one box share its cores: give each rank's BLAS its share, not all of them.
    env.setdefault("OPENBLAS_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.workers)))
    py = [sys.executable, "-m", "herd"]
    procs: list[tuple[str, subprocess.Popen]] = []

    def spawn(name: str, cmd: list[str]) -> subprocess.Popen:
        out = open(state / f"{name}.log", "ab")
        proc = subprocess.Popen(py + cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        out.close()
        procs.append((name, proc))
        return proc

    def stop_all() -> None:
        for _, proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
        for name, proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                logger.warning("killed_unresponsive", process=name)

    coord = spawn("coordinator", ["coordinator", "--host", HOST, "--port", str(args.port),
                                  "--state-dir", str(state / "coordinator"),
                                  "--placement-timeout", str(args.placement_timeout)])
    if not _wait_port(coord, HOST, args.port, 30.0):
        stop_all()
        print(f"herd up: the coordinator did not start; see {state / 'coordinator.log'}",
              file=sys.stderr)
        return 1
    for i in range(args.workers):
        cmd = ["worker", "--host", HOST, "--id", f"worker-{i + 1}",
               "--state-dir", str(state / f"worker-{i + 1}")]
        spawn(f"worker-{i + 1}", cmd + (["--memory", args.memory] if args.memory else []))
    address = f"{HOST}:{args.port}"
    (state / "coordinator.address").write_text(address + "\n")
    print(f"herd up: coordinator at {address}, {args.workers} workers, logs in {state}\n"
          f"  export HERD_COORDINATOR={address}   # or pass --coordinator {address}", flush=True)

    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    code = 0
    while not done.wait(0.5):
        if coord.poll() is not None:
            print(f"herd up: the coordinator exited ({coord.returncode}); stopping",
                  file=sys.stderr)
            code = 1
            break
    stop_all()
    return code
