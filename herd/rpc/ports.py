"""Free TCP ports, for the ranks of a job on one machine (agents, launchers, tests, benchmarks)."""

from __future__ import annotations

import random
import socket
from pathlib import Path

# The coordinator's port when none is given (`herd coordinator`, and `--coordinator HOST`).
DEFAULT_COORDINATOR_PORT = 7450


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports free right now on ``host`` (IPv4 or IPv6; "" = every IPv4 address):
    all bound at once, so none repeats, then released for the caller to bind. (Another process
    may take one in between; callers that cannot retry choose ports once and keep them.)"""
    host = host.strip("[]")
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks = [socket.socket(fam) for _ in range(n)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# Below every default ephemeral range (Linux 32768-60999, macOS 49152-65535) and above the
# well-known and most registered service ports.
KEPT_PORTS = range(20000, 32768)


def _ephemeral() -> range:
    """The range the OS hands out to outgoing connections (Linux: read; else macOS's default)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return range(low, high + 1)
    except (OSError, ValueError):
        return range(49152, 65536)


def kept_port(host: str = "") -> int:
    """A port free now, for a server that binds it later and again (an agent's rank ports, chosen
    at start and reused by every rank it runs). Never from the ephemeral range: there any
    outgoing connection of any process may take it between two ranks, and the next rank's bind
    fails (EADDRINUSE)."""
    busy = _ephemeral()
    candidates = [p for p in KEPT_PORTS if p not in busy]
    fam = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    for port in random.sample(candidates, min(200, len(candidates))):
        with socket.socket(fam) as s:
            try:
                s.bind((host.strip("[]"), port))
            except OSError:
                continue
            return port
    return free_ports(1, host)[0]  # every candidate taken: any free port, as before
