"""Forming a rank's gradient-exchange group from its environment.

``mx.distributed.init()`` is called here, once per rank process. Which transport:
- ``mlx``:  an MLX group (ring/JACCL/MPI) from the launcher's env (MLX_RANK + MLX_HOSTFILE, ...);
- ``grpc``: herd's gRPC ring from HERD_RANK/MLX_RANK + HERD_EXCHANGE_PEERS;
- ``auto``: MLX when a group of more than one forms, gRPC when peers are given otherwise.
"""

from __future__ import annotations

import os

import mlx.core as mx

from herd.config import Cluster
from herd.errors import ConfigError, PeerLostError
from worker.exchange import GradientExchange, LocalExchange, MLXExchange

MLX_LAUNCH_ENV = ("MLX_HOSTFILE", "MLX_RANK", "OMPI_COMM_WORLD_RANK", "MLX_IBV_DEVICES",
                  "MLX_JACCL_COORDINATOR")
PEERS_ENV = "HERD_EXCHANGE_PEERS"


def _grpc(cluster: Cluster) -> GradientExchange:
    from worker.exchange.grpc import GrpcExchange

    return GrpcExchange.from_env(timeout_s=cluster.exchange_timeout_s,
                                 wire_dtype=cluster.wire_dtype)


# What MLX's ring backend raises in a rank whose neighbour died (mlx PR #4060; shared/FACTS.md),
# and in a rank that could not reach a peer while forming the ring (it dials for ~31 s).
_MLX_LOST_PEER = "connection to a peer was lost"
_MLX_NO_PEER = "[ring] Couldn't connect"


def lost_peer(err: RuntimeError) -> PeerLostError | None:
    """The PeerLostError a RuntimeError from an MLX collective means, or None if it is another
    error. A surviving rank often reports before the killed one; reported as a plain RuntimeError
    (exit 1) its job would fail for good instead of restarting from its last checkpoint. A ring
    that cannot form (the link between two workers is down) is worth another attempt too."""
    if _MLX_LOST_PEER in str(err):
        return PeerLostError(f"lost a peer of the MLX group: {err}",
                             hint="the rank process died or its machine dropped off the network")
    if _MLX_NO_PEER in str(err):
        return PeerLostError(f"could not form the MLX ring: {err}",
                             hint="a peer is down, or the link between the workers is cut")
    return None


def _jaccl() -> GradientExchange:
    """The JACCL group the coordinator planned (herd/jaccl.py env). UNTESTED ON HARDWARE: no Mac
    with RDMA over Thunderbolt has run it; a peer lost mid all_sum may hang JACCL (mlx #4475
    reports the like for the ring), which the coordinator's progress watchdog must catch."""
    if not mx.distributed.is_available("jaccl"):
        raise ConfigError(
            "the coordinator chose JACCL (RDMA over Thunderbolt) but this MLX has no JACCL "
            "backend", hint="JACCL needs macOS 26.2+ with RDMA enabled and mlx >= 0.30 built "
            "with it; or remove the RDMA devices from this worker's --data")
    return MLXExchange(mx.distributed.init(strict=True, backend="jaccl"))


def open_exchange(cluster: Cluster) -> GradientExchange:
    peers = [p for p in os.environ.get(PEERS_ENV, "").split(",") if p]
    launched = any(k in os.environ for k in MLX_LAUNCH_ENV)
    if cluster.exchange == "grpc":
        if len(peers) == 1:  # a group of one (a job shrunk to one worker): nothing to exchange
            return LocalExchange()
        if len(peers) < 2:
            raise ConfigError(
                f"cluster.exchange is grpc but {PEERS_ENV} lists {len(peers)} peers",
                hint="run through the herd service, or set HERD_EXCHANGE_PEERS=host:port,... "
                "and HERD_RANK",
            )
        return _grpc(cluster)
    if "MLX_IBV_DEVICES" in os.environ:
        return _jaccl()
    if launched:
        try:
            group = mx.distributed.init(strict=cluster.exchange == "mlx")
        except RuntimeError:
            if cluster.exchange == "auto" and len(peers) > 1:
                return _grpc(cluster)
            raise
        if group.size() > 1:
            return MLXExchange(group)
    if cluster.exchange == "auto" and len(peers) > 1:
        return _grpc(cluster)
    if cluster.exchange == "mlx" and launched:
        raise ConfigError("cluster.exchange is mlx but no MLX group of more than one rank formed")
    return LocalExchange()
