"""herd's own processes on a network-namespace Topology (tests/netns.py): a coordinator, worker
agents and CLI commands, each in its host's namespace, with its own HERD_HOME."""

from __future__ import annotations

import secrets
import subprocess
import time
from pathlib import Path

from tests.netns import Host, Topology


class HerdNet:
    """herd's processes on a Topology's hosts: each host its own HERD_HOME and state under
    ``root/<host>``, all sharing one cluster secret (HERD_SECRET) and the machine's filesystem
    (so a job's model and data paths are the same on every host, as herd requires). Process
    output goes to ``root/<host>/<role>.log``."""

    COORDINATOR_PORT = 7450                       # each namespace has its own ports

    def __init__(self, net: Topology, root, extra_env: dict | None = None):
        self.net, self.root = net, Path(root)
        self.secret = secrets.token_hex(32)
        self.extra_env = {"HERD_LOG_LEVEL": "info", "OPENBLAS_NUM_THREADS": "1",
                          **(extra_env or {})}

    def env(self, host: Host) -> dict[str, str]:
        home = self.root / host.name / "home"
        home.mkdir(parents=True, exist_ok=True)
        return {"HERD_HOME": str(home), "HERD_SECRET": self.secret, **self.extra_env}

    def _spawn(self, host: Host, role: str, args: list[str]) -> subprocess.Popen:
        log = open(self.root / host.name / f"{role}.log", "ab")
        try:
            return host.python("-m", "herd", *args, env=self.env(host), stdout=log,
                               stderr=subprocess.STDOUT)
        finally:
            log.close()

    def coordinator(self, host: Host, *args: str, address: str | None = None,
                    port: int = COORDINATOR_PORT) -> subprocess.Popen:
        """``herd coordinator --host <address> --port <port>`` on ``host``."""
        self.env(host)
        return self._spawn(host, "coordinator", [
            "coordinator", "--host", address or host.address(), "--port", str(port),
            "--state-dir", str(self.root / host.name / "coordinator"), *args])

    def worker(self, host: Host, *args: str, address: str | None = None,
               worker_id: str | None = None) -> subprocess.Popen:
        """``herd worker --host <address> --id <host name>`` on ``host``."""
        self.env(host)
        return self._spawn(host, "worker", [
            "worker", "--host", address or host.address(), "--id", worker_id or host.name,
            "--state-dir", str(self.root / host.name / "worker"), *args])

    def herd(self, host: Host, *args: str, check: bool = True,
             timeout: float = 240) -> subprocess.CompletedProcess:
        """A CLI command on ``host`` (finding the coordinator by zeroconf unless ``args`` name
        ``--coordinator``)."""
        return host.run_python("-m", "herd", *args, env=self.env(host), check=check,
                               timeout=timeout)

    def wait_workers(self, host: Host, n: int, timeout_s: float = 120,
                     args: tuple[str, ...] = ()) -> list[list[str]]:
        """Rows of ``herd workers`` once it lists ``n`` workers (generous deadline: the machine
        may be loaded)."""
        deadline = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < deadline:
            last = self.herd(host, "workers", *args, check=False, timeout=60)
            rows = [ln.split() for ln in last.stdout.strip().splitlines()[1:]]
            if last.returncode == 0 and len(rows) == n:
                return rows
            time.sleep(0.5)
        raise AssertionError(f"`herd workers` on {host.name} never listed {n} workers; last:\n"
                             f"{last.stdout if last else ''}{last.stderr[-2000:] if last else ''}")

    def log(self, host: Host, role: str) -> str:
        path = self.root / host.name / f"{role}.log"
        return path.read_text(errors="replace") if path.exists() else ""
