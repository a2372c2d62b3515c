"""MLX's JACCL backend (RDMA over Thunderbolt 5, macOS 26.2+): the hostfile and the environment
``mlx.launch --backend jaccl`` would produce, built from what the workers reported.

mlx 0.32's launcher (mlx/_distributed_utils/launch.py ``launch_jaccl``) gives every rank
``MLX_RANK``, ``MLX_JACCL_COORDINATOR=<rank 0's first ip>:<port>`` and ``MLX_IBV_DEVICES``, the
path of a file holding ``json.dumps([host.rdma for host in hosts])``: per rank, the RDMA device
towards every other rank, ``null`` towards itself. Its hostfile (``common.Hostfile``) is
``{"backend": "jaccl", "envs": [...], "hosts": [{"ssh": name, "ips": [ip], "rdma": [...]}]}``.
tests/test_network.py checks both against the installed mlx's own parser and launcher.

UNTESTED ON HARDWARE: no Mac with RDMA has run this; the format is checked, the transport is not.
"""

from __future__ import annotations

import json

from herd.errors import ConfigError


def check_devices(rdma: list[list[str | None]]) -> None:
    """The checks mlx's launcher makes before it starts anything, with herd's error."""
    n = len(rdma)
    for i, row in enumerate(rdma):
        if len(row) != n:
            raise ConfigError(f"JACCL devices: rank {i} lists {len(row)} peers, not {n}")
        if row[i] is not None:
            raise ConfigError(f"JACCL devices: rank {i}'s device towards itself must be null")
        missing = [j for j in range(n) if j != i and not row[j]]
        if missing:
            raise ConfigError(f"JACCL devices: rank {i} has no RDMA device towards rank "
                              f"{missing[0]}")


def hostfile(names: list[str], ips: list[str], rdma: list[list[str | None]],
             envs: list[str] = ()) -> dict:
    """mlx's hostfile for these hosts (what ``mlx.distributed_config --backend jaccl`` writes)."""
    check_devices(rdma)
    return {"backend": "jaccl", "envs": list(envs),
            "hosts": [{"ssh": n, "ips": [ip], "rdma": row} for n, ip, row in zip(names, ips, rdma)]}


def devices_json(rdma: list[list[str | None]]) -> str:
    """The MLX_IBV_DEVICES file's content."""
    check_devices(rdma)
    return json.dumps(rdma)


def env(rank: int, devices_file: str, coordinator: str) -> dict[str, str]:
    """What one rank's environment gets (``coordinator``: rank 0's ``ip:port``)."""
    return {"MLX_RANK": str(rank), "MLX_IBV_DEVICES": devices_file,
            "MLX_JACCL_COORDINATOR": coordinator}
