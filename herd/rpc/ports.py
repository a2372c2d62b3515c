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


def in_use(port: int, host: str) -> bool:
    """Whether a server of this machine already holds ``host``:``port``, the exact address a
    server is about to bind (asked before anything is made for it). Only EADDRINUSE counts: an
    address this machine lacks is the bind's own error to say, later."""
    import errno

    host = host.strip("[]")
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (TIME_WAIT is not in use)
    try:
        s.bind((host, port))
        return False
    except OSError as e:
        return e.errno == errno.EADDRINUSE
    except UnicodeError:  # (a host name the resolver cannot encode: the bind says what is wrong)
        return False
    finally:
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


def kept_ports(n: int, host: str = "") -> list[int]:
    """``n`` distinct ports free now, for servers that bind them later and again (an agent's rank
    ports, chosen at start and reused by every rank it runs). Never from the ephemeral range:
    there any outgoing connection of any process may take one between two ranks, and the next
    rank's bind fails (EADDRINUSE). All bound at once, so none repeats."""
    busy = _ephemeral()
    candidates = [p for p in KEPT_PORTS if p not in busy]
    host = host.strip("[]")
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    held: list[socket.socket] = []
    try:
        for port in random.sample(candidates, min(200 + n, len(candidates))):
            if len(held) == n:
                break
            s = socket.socket(fam)
            try:
                s.bind((host, port))
            except OSError:
                s.close()
                continue
            held.append(s)
        if len(held) < n:  # the range is taken: any free ports, as before
            return free_ports(n, host)
        return [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()
