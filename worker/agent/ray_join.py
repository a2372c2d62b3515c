"""``herd worker --ray ADDRESS``: this machine joins a Ray cluster as a herd worker node.

Instead of serving WorkerService, the worker becomes a Ray node (``ray start --block``, in the
foreground: Ctrl-C or SIGTERM leaves the cluster) that offers what herd's Ray backend places ranks
by (coordinator/ray_nodes.py): the ``herd_worker`` slot (one herd rank at a time) and
``herd_memory_gb`` (this machine's memory, as an agent reports it), with labels for the OS, chip
and macOS GPU wiring limit. ADDRESS ``head`` starts a new cluster's head here instead.

macOS: Ray refuses multi-node clusters on macOS unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1, which
this sets (and Apple GPUs are no Ray resource type: herd_memory_gb stands for unified memory).
Written against ``ray start``'s documented flags; on a Mac, not exercised in CI.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sys
from pathlib import Path

from herd.digest import GIB
from herd.errors import ConfigError, PeerLostError
from worker.agent.machine import Machine

HEAD = "head"


def _label(text: str) -> str:
    """A Ray label value: letters, digits, ``-_.``, at most 63, starting and ending alphanumeric."""
    value = re.sub(r"[^A-Za-z0-9_.]+", "-", text).strip("-_.")[:63].strip("-_.")
    return value or "unknown"


def resources(machine: Machine) -> dict[str, float]:
    """Ray takes a node's resource above 1 only as a whole number (an outside run: 23.54 GiB of
    a Linux box's MemTotal was refused, and the node never joined): whole GiB, rounded down.
    (The placement group bundles may ask for fractions: coordinator/ray_nodes.py.)"""
    return {"herd_worker": 1.0, "herd_memory_gb": float(max(1, machine.memory_bytes // GIB))}


def labels(machine: Machine) -> dict[str, str]:
    os_name = "macos" if machine.os.startswith("macOS") else "linux"
    return {"herd-os": os_name, "herd-chip": _label(machine.chip),
            "herd-wired-limit-mb": str(machine.wired_limit_mb)}


def ray_env(platform: str = sys.platform) -> dict[str, str]:
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    if platform == "darwin":
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "1"
    return env


def ray_start_command(machine: Machine, address: str, node_ip: str | None = None,
                      extra: list[str] = (), ray: str = "ray") -> list[str]:
    """The ``ray start`` that joins this machine (or starts the head) as a herd worker node."""
    cmd = [ray, "start", "--block", "--resources", json.dumps(resources(machine)),
           "--labels", ",".join(f"{k}={v}" for k, v in labels(machine).items())]
    cmd += ["--head", "--include-dashboard=false"] if address == HEAD else ["--address", address]
    if node_ip:
        cmd += ["--node-ip-address", node_ip]
    return cmd + list(extra)


def ray_binary() -> str:
    """The ``ray`` script of this Python's environment (herd's extra), else one on PATH."""
    here = Path(sys.executable).parent / "ray"
    found = str(here) if here.exists() else shutil.which("ray")
    if not found:
        raise ConfigError("herd worker --ray needs Ray on this machine",
                          hint="pip install 'herd[ray]'")
    return found


def check_head(address: str, timeout_s: float = 5.0) -> None:
    """A plain TCP connect to the head's GCS port before ``ray start``, which, given an address
    where nothing listens, retries for minutes printing only its own connect errors (an outside
    run). The coordinator checks its --ray the same way (coordinator/ray_nodes.py)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--ray {address!r}: give the Ray head's HOST:PORT (its GCS port, "
                          "6379 unless `ray start --port` said otherwise), or `head`",
                          hint="`ray status` on the head prints its address")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        raise PeerLostError(f"no Ray head answers at {address}: {e.strerror or e}",
                            hint="start it first (`herd worker --ray head` there, docs/ray.md), "
                            "or check the host and port (`ray status` on the head)") from None


def join(machine: Machine, address: str, node_ip: str | None, extra: list[str]) -> int:
    """Replaces this process with ``ray start --block`` (signals go straight to it)."""
    if address != HEAD:
        check_head(address)
    cmd = ray_start_command(machine, address, node_ip, extra, ray_binary())
    print("herd worker: " + " ".join(cmd), flush=True)
    os.execve(cmd[0], cmd, ray_env())
    return 0  # not reached
