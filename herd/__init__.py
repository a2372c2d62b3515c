"""herd: LoRA/QLoRA fine-tuning across a cluster of Apple Silicon Macs.

This package is the shared vocabulary of the control plane (``coordinator/``) and the data plane
(``worker/``): the job-config schema, errors, logging, digests, the dataset check, stage cuts and
adapter merging; ``herd/rpc/`` is the gRPC plumbing both use (auth, channels, the error <-> status
map, file transfer, discovery). Neither imports a plane. ``herd/cli/`` is the ``herd`` command, the
composition root: the only package that names both planes.
"""

import os

__version__ = "0.1.0"
PROTOCOL_VERSION = 2  # 2: mutual TLS with a cluster CA (1 was an HMAC of a shared secret)

# grpcio logs every failed TLS handshake at INFO on stderr: a stranger on the LAN (another
# cluster's adverts, a port scan) would fill every log. herd logs what it refuses itself. Read once,
# when grpc loads: ``python -m herd`` imports this first.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
