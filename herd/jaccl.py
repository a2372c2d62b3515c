"""MLX's JACCL backend (RDMA over Thunderbolt 5, macOS 26.2+): the hostfile and the environment
``mlx.launch --backend jaccl`` would produce, built from what the workers reported.

mlx 0.32's launcher (mlx/_distributed_utils/launch.py ``launch_jaccl``) gives every rank
``MLX_RANK``, ``MLX_JACCL_COORDINATOR=<rank 0's first ip>:<port>`` and ``MLX_IBV_DEVICES``, the
path of a file holding ``json.dumps([host.rdma for host in hosts])``: per rank, the RDMA device
towards every other rank, ``null`` towards itself. Its hostfile (``common.Hostfile``) is
``{"backend": "jaccl", "envs": [...], "hosts": [{"ssh": name, "ips": [ip], "rdma": [...]}]}``.
tests/test_network.py checks both against the installed mlx's own parser and launcher.

A **JACCL ring** (``--backend jaccl-ring``, ``MLX_JACCL_RING=1``) is the same with devices only
towards each rank's two neighbours (``null`` towards the others): Macs cabled in a cycle rather
than every pair (what ``mlx.distributed_config`` writes for a Thunderbolt ring with RDMA).

UNTESTED ON HARDWARE: no Mac with RDMA has run this; the format is checked, the transport is not.
"""

from __future__ import annotations

import json

from herd.errors import ConfigError


def is_ring(rdma: list[list[str | None]]) -> bool:
    """A JACCL ring: some rank has no device towards a rank that is not its neighbour."""
    n = len(rdma)
    return any(not rdma[i][j] for i in range(n) for j in range(n)
               if j not in (i, (i - 1) % n, (i + 1) % n))


def check_devices(rdma: list[list[str | None]]) -> None:
    """The checks mlx's launcher makes before it starts anything, with herd's error (a ring
    needs devices towards each rank's neighbours only)."""
    n, ring = len(rdma), is_ring(rdma)
    for i, row in enumerate(rdma):
        if len(row) != n:
            raise ConfigError(f"JACCL devices: rank {i} lists {len(row)} peers, not {n}")
        if row[i] is not None:
            raise ConfigError(f"JACCL devices: rank {i}'s device towards itself must be null")
        peers = ((i - 1) % n, (i + 1) % n) if ring else range(n)
        missing = [j for j in peers if j != i and not row[j]]
        if missing:
            raise ConfigError(f"JACCL devices: rank {i} has no RDMA device towards rank "
                              f"{missing[0]}")


def hostfile(names: list[str], ips: list[str], rdma: list[list[str | None]],
             envs: list[str] = ()) -> dict:
    """mlx's hostfile for these hosts (what ``mlx.distributed_config --backend jaccl`` writes)."""
    check_devices(rdma)
    return {"backend": "jaccl-ring" if is_ring(rdma) else "jaccl", "envs": list(envs),
            "hosts": [{"ssh": n, "ips": [ip], "rdma": row} for n, ip, row in zip(names, ips, rdma)]}


def devices_json(rdma: list[list[str | None]]) -> str:
    """The MLX_IBV_DEVICES file's content."""
    check_devices(rdma)
    return json.dumps(rdma)


def env(rank: int, devices_file: str, coordinator: str, ring: bool = False) -> dict[str, str]:
    """What one rank's environment gets (``coordinator``: rank 0's ``ip:port``)."""
    return {"MLX_RANK": str(rank), "MLX_IBV_DEVICES": devices_file,
            "MLX_JACCL_COORDINATOR": coordinator, **({"MLX_JACCL_RING": "1"} if ring else {})}
