"""herd's own processes on a network-namespace Topology (tests/netns.py): a coordinator, worker
agents and CLI commands, each in its host's namespace, with its own HERD_HOME."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from herd.rpc import pki
from tests.netns import Host, Topology


class HerdNet:
    """herd's processes on a Topology's hosts: each host its own HERD_HOME and state under
    ``root/<host>``, sharing the machine's filesystem (so a job's model and data paths are the
    same on every host, as herd requires). The coordinator's host holds the cluster CA (as after
    ``herd init``); a worker gets its certificate by ``herd join`` over the network (``join``)
    or straight from the CA, and the CLI a client certificate. Process output goes to
    ``root/<host>/<role>.log``."""

    COORDINATOR_PORT = 7450                       # each namespace has its own ports
    JOIN_PORT = COORDINATOR_PORT + 2

    def __init__(self, net: Topology, root, extra_env: dict | None = None):
        self.net, self.root = net, Path(root)
        self.ca: pki.Authority | None = None
        self.coordinator_host: Host | None = None
        self.extra_env = {"HERD_LOG_LEVEL": "info", "OPENBLAS_NUM_THREADS": "1",
                          **(extra_env or {})}

    def home(self, host: Host) -> Path:
        home = self.root / host.name / "home"
        home.mkdir(parents=True, exist_ok=True)
        return home

    def env(self, host: Host) -> dict[str, str]:
        return {"HERD_HOME": str(self.home(host)), **self.extra_env}

    def _issue(self, host: Host, role: str, name: str) -> None:
        tls = self.home(host) / "tls"
        if self.ca is None:
            raise AssertionError("start the coordinator first: it holds the cluster CA")
        if not (tls / f"{role}.pem").exists():
            self.ca.issue(role, name).save(tls)

    def _spawn(self, host: Host, role: str, args: list[str]) -> subprocess.Popen:
        log = open(self.root / host.name / f"{role}.log", "ab")
        try:
            return host.python("-m", "herd", *args, env=self.env(host), stdout=log,
                               stderr=subprocess.STDOUT)
        finally:
            log.close()

    def coordinator(self, host: Host, *args: str, address: str | None = None,
                    port: int = COORDINATOR_PORT) -> subprocess.Popen:
        """``herd coordinator --host <address> --port <port>`` on ``host`` (the cluster CA made
        in its HERD_HOME first, as ``herd init`` makes it)."""
        tls = self.home(host) / "tls"
        self.ca = pki.Authority.load(tls) if pki.Authority.exists(tls) else \
            pki.Authority.create(tls)
        self.coordinator_host = host
        return self._spawn(host, "coordinator", [
            "coordinator", "--host", address or host.address(), "--port", str(port),
            "--state-dir", str(self.root / host.name / "coordinator"), *args])

    def worker(self, host: Host, *args: str, address: str | None = None,
               worker_id: str | None = None, join: bool = False) -> subprocess.Popen:
        """``herd worker --host <address> --id <host name>`` on ``host``, its certificate made
        by ``herd join`` with a token from the coordinator's host (``join``) or by the CA. Its
        models may come from anywhere on the shared filesystem (``--model-root /``)."""
        worker_id = worker_id or host.name
        if join:
            c = self.coordinator_host
            token = self.herd(c, "token", "--join", f"{c.address()}:{self.JOIN_PORT}")
            deadline = time.monotonic() + 60  # the coordinator may still be starting
            while (joined := self.herd(host, "join", token.stdout.strip(), "--id", worker_id,
                                       check=False)).returncode == 5:  # unreachable: not yet
                assert time.monotonic() < deadline, joined.stderr[-2000:]
                time.sleep(0.5)
            assert joined.returncode == 0, joined.stderr[-2000:]
        else:
            self._issue(host, "worker", worker_id)
        return self._spawn(host, "worker", [
            "worker", "--host", address or host.address(), "--id", worker_id,
            "--state-dir", str(self.root / host.name / "worker"), "--model-root", "/", *args])

    def herd(self, host: Host, *args: str, check: bool = True,
             timeout: float = 240) -> subprocess.CompletedProcess:
        """A CLI command on ``host`` (finding the coordinator by zeroconf unless ``args`` name
        ``--coordinator``), with a client certificate there."""
        if args[0] not in ("init", "join", "token", "revoke") and host is not \
                self.coordinator_host:
            self._issue(host, "client", host.name)
        return host.run_python("-m", "herd", *args, env=self.env(host), check=check,
                               timeout=timeout)

    def wait_workers(self, host: Host, n: int, timeout_s: float = 120, args: tuple[str, ...] = (),
                     ok_codes: tuple[int, ...] = ()) -> list[list[str]]:
        """Rows of ``herd workers`` once it lists ``n`` workers (generous deadline: the machine
        may be loaded). ``herd workers`` exits 4 when it lists none: pass ``ok_codes=(4,)`` to
        wait for a coordinator that answers with no worker yet."""
        deadline = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < deadline:
            last = self.herd(host, "workers", *args, check=False, timeout=60)
            rows = [ln.split() for ln in last.stdout.strip().splitlines()[1:]]
            if last.returncode in (0, *ok_codes) and len(rows) == n:
                return rows
            time.sleep(0.5)
        raise AssertionError(f"`herd workers` on {host.name} never listed {n} workers; last:\n"
                             f"{last.stdout if last else ''}{last.stderr[-2000:] if last else ''}")

    def log(self, host: Host, role: str) -> str:
        path = self.root / host.name / f"{role}.log"
        return path.read_text(errors="replace") if path.exists() else ""
