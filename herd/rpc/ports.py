"""Free TCP ports, for the ranks of a job on one machine (agents, launchers, tests, benchmarks)."""

from __future__ import annotations

import socket

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
