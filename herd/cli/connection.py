"""The laptop's connection to the coordinator: finding it, calling it, moving files.

The coordinator is ``--coordinator HOST:PORT``, else $HERD_COORDINATOR, else found by zeroconf:
every ``_herd._tcp.local.`` advert is tried with an authenticated call and the first that accepts
the cluster secret wins (an advert alone is never trusted).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterator

from herd import log
from herd.errors import HerdError, PeerLostError
from herd.rpc import discovery
from herd.rpc.channel import TRANSFER_DEADLINE_S, UNARY_DEADLINE_S, signed_channel
from herd.rpc.files import read_chunks, receive_checkpoint_files
from herd.rpc.status import rpc_errors
from protos.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc

logger = log.get(__name__)
COORDINATOR_ENV = "HERD_COORDINATOR"


class CoordinatorConnection:
    """A signed channel to one coordinator; every call has a deadline. A context manager: the
    channel closes on the way out."""

    def __init__(self, target: str, secret: str):
        self.target = target
        self.channel = signed_channel(target, secret)
        self.stub = coordinator_pb2_grpc.CoordinatorServiceStub(self.channel)

    def call(self, method: str, request, timeout: float = UNARY_DEADLINE_S):
        with rpc_errors(self.target):
            return getattr(self.stub, method)(request, timeout=timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> CoordinatorConnection:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- files -----------------------------------------------------------------------------

    def put_blob(self, path: Path, sha: str) -> None:
        def parts() -> Iterator[coordinator_pb2.PutBlobRequest]:
            yield coordinator_pb2.PutBlobRequest(sha256=sha)
            for block in read_chunks(path):
                yield coordinator_pb2.PutBlobRequest(data=block)

        with rpc_errors(self.target):
            self.stub.PutBlob(parts(), timeout=TRANSFER_DEADLINE_S)

    def pull(self, job_id: str, step: int, out: Path) -> common_pb2.CheckpointInfo:
        """Writes the checkpoint's files into ``out``, each sha256-checked, each replaced
        atomically."""
        with rpc_errors(self.target):
            stream = self.stub.GetAdapter(
                coordinator_pb2.GetAdapterRequest(job_id=job_id, step=step),
                timeout=TRANSFER_DEADLINE_S)
            return receive_checkpoint_files(stream, out, "checkpoint", hint="pull again")


def _accepts(target: str, secret: str) -> bool:
    with CoordinatorConnection(target, secret) as c:
        try:
            c.call("ListWorkers", coordinator_pb2.ListWorkersRequest(), timeout=2.0)
            return True
        except HerdError as e:
            logger.debug("coordinator_candidate_refused", target=target, error=e.message)
            return False


RETRY_S = 1.0  # a target that did not accept is tried again after this (it may be starting)


def find_coordinator(explicit: str | None, secret: str, wait_s: float = 4.0) -> str:
    """The first advertised coordinator that accepts the secret; others (another cluster, a
    stale record) are skipped. Every address of every advert is tried, and tried again after
    RETRY_S until ``wait_s`` is over: a record may carry a stale or unreachable address next to
    the good one, and zeroconf expires stale records on its own."""
    if explicit or (explicit := os.environ.get(COORDINATOR_ENV)):
        return explicit
    zc = discovery.make_zeroconf()
    tried: dict[str, float] = {}  # target -> when it last refused
    try:
        browser = discovery.Browser(zc, discovery.COORDINATOR_TYPE)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            for advert in browser.snapshot():
                for target in advert.targets:
                    if time.monotonic() - tried.get(target, -RETRY_S) < RETRY_S:
                        continue
                    if _accepts(target, secret):
                        return target
                    tried[target] = time.monotonic()
            time.sleep(0.05)
        browser.close()
    finally:
        zc.close()
    raise PeerLostError(
        "no coordinator found by zeroconf"
        + (f" that accepts this cluster secret (saw {', '.join(sorted(tried))})" if tried else ""),
        hint="start `herd coordinator` (or `herd up`), or pass --coordinator HOST:PORT "
        f"(or set {COORDINATOR_ENV})",
    )


def connect(explicit: str | None, secret: str) -> CoordinatorConnection:
    """The coordinator ``explicit`` names, or the one discovery finds."""
    return CoordinatorConnection(find_coordinator(explicit, secret), secret)
