"""Ray's view of a cluster, in herd's terms: which Ray nodes are herd workers, what they offer, and
where the coordinator connects. Pure functions over what ``ray.nodes()`` returns, except
``resolve_address``/``check_reachable``, which look at this machine and the network.

A Ray node is a herd worker when it offers the ``herd_worker`` resource (1: one herd rank at a
time, as an agent runs one). ``herd_memory_gb`` is the memory herd may plan with there (total
unified memory on a Mac, as an agent reports it; the planner applies macOS's GPU wiring limit
from the ``herd-os`` and ``herd-wired-limit-mb`` labels). ``herd worker --ray`` adds all of them
when it joins a node; a node joined with plain ``ray start`` needs ``--resources`` (docs/ray.md).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from coordinator.domain import WorkerRecord
from herd import ray_auth
from herd.digest import GIB
from herd.errors import PlacementError

HERD_WORKER = "herd_worker"
HERD_MEMORY = "herd_memory_gb"
OS_LABEL, CHIP_LABEL, WIRED_LABEL = "herd-os", "herd-chip", "herd-wired-limit-mb"


def worker_id(node_id: str) -> str:
    """A Ray node as herd names it: short enough for a table, unique in any real cluster."""
    return f"ray-{node_id[:8]}"


def node_record(node: dict, running_job_id: str = "") -> WorkerRecord | None:
    """One entry of ``ray.nodes()`` as a worker, or None when it is dead or no herd worker.
    Ports are 0: each rank's actor reserves its own when the job is placed."""
    resources = node.get("Resources") or {}
    if not node.get("Alive") or resources.get(HERD_WORKER, 0) < 1:
        return None
    labels = node.get("Labels") or {}
    memory = int(resources.get(HERD_MEMORY, 0) * GIB)
    os_name = {"macos": "macOS", "linux": "Linux"}.get(labels.get(OS_LABEL, ""), "")
    wired = labels.get(WIRED_LABEL, "0")
    return WorkerRecord(
        worker_id=worker_id(node["NodeID"]), host=node["NodeManagerAddress"], port=0,
        ring_port=0, exchange_port=0, memory_bytes=memory, free_memory_bytes=memory,
        chip=labels.get(CHIP_LABEL, "").replace("-", " "), os=os_name,
        wired_limit_mb=int(wired) if wired.isdigit() else 0, running_job_id=running_job_id,
        resources={k: float(v) for k, v in resources.items()
                   if not k.startswith("node:") and k not in ("memory", "object_store_memory")})


def bundle(bytes_needed: int) -> dict[str, float]:
    """One rank's reservation: the node's herd slot, and the planner's memory need (rounded up
    to Ray's 1e-4 resource precision; left out when unknown)."""
    b = {HERD_WORKER: 1.0}
    if bytes_needed > 0:
        b[HERD_MEMORY] = -(-bytes_needed * 10_000 // GIB) / 10_000
    return b


def resolve_address(address: str) -> str:
    """``cluster.ray_address`` as the host:port ray.init will dial: ``auto`` is RAY_ADDRESS, else
    the address ``ray start`` recorded on this machine. PlacementError when there is none."""
    from ray._private.services import canonicalize_bootstrap_address

    try:
        # Ray's own resolution (private, but the same function ray.init calls), so the address
        # in an error is the one Ray would have tried.
        resolved = canonicalize_bootstrap_address(None if address == "auto" else address)
    except Exception as e:  # a malformed address, or a name that does not resolve
        raise PlacementError(f"cluster.ray_address {address!r} is not a Ray address: {e}",
                             hint="use host:port of the Ray head (`ray status` there shows it)"
                             ) from None
    if not resolved:
        raise PlacementError(
            "cluster.ray_address is auto and no Ray cluster was found (RAY_ADDRESS is unset and "
            "Ray's default temporary folder names no `ray start` on the coordinator's machine)",
            hint="start one (`ray start --head`, docs/ray.md), or set cluster.ray_address: "
                 "HOST:PORT or RAY_ADDRESS (a head started with --temp-dir is found only so)")
    return resolved


def check_reachable(address: str, timeout_s: float = 3.0) -> None:
    """A plain TCP connect to the Ray head's GCS port. Written by hand because ray.init, given an
    address where nothing listens, retries for minutes instead of failing."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as e:
        raise PlacementError(
            f"cannot reach the Ray cluster at {address}: {e}",
            hint="is its head running (`ray status` there)? set cluster.ray_address to its "
                 "host:port") from None


def check_session_writable(root: str | None = None) -> None:
    """Ray's driver writes its log into this node's session folder, and Ray's C++ logger aborts
    the whole process when it cannot (an outside run: a coordinator under the shipped systemd
    unit, whose /tmp is read-only, died on its first Ray job, its other jobs with it). Refused
    here instead, naming the folder. A head started with another --temp-dir is not checked."""
    logs = Path(root or os.environ.get("RAY_TMPDIR") or "/tmp") / "ray" / "session_latest" / "logs"
    if logs.is_dir() and not os.access(logs, os.W_OK):
        raise PlacementError(
            f"the coordinator cannot write Ray's session folder {logs.resolve()}, where Ray "
            "writes its driver's log (and aborts the process when it cannot)",
            hint="run the coordinator as the user that ran `ray start`, with that folder "
            "writable (deploy/systemd: ReadWritePaths= holds /tmp/ray)")


def connect_refusal(address: str, error: Exception) -> PlacementError:
    """ray.init's failure, with what it hides: token authentication (Ray 2.60 turns it on where
    ~/.ray/auth_token exists) fails as a bare "Failed to connect"."""
    auth = os.environ.get(ray_auth.MODE) or ray_auth.token_file().exists()
    return PlacementError(
        f"cannot connect to the Ray cluster at {address}: {error}",
        hint="run the coordinator on a node of that Ray cluster (docs/ray.md)" + (
            f"; Ray's token authentication ({ray_auth.describe()}) must match the cluster's: "
            "the head's ~/.ray/auth_token copied to every node and here with "
            "RAY_AUTH_MODE=token, or RAY_AUTH_MODE=disabled everywhere"
            if auth or "auth" in str(error).lower() else ""))
