"""The laptop's connection to the coordinator: finding it, and moving files in chunks.

The coordinator is ``--coordinator HOST:PORT``, else $HERD_COORDINATOR, else found by zeroconf:
every ``_herd._tcp.local.`` advert is tried with an authenticated call and the first that accepts
the cluster secret wins (an advert alone is never trusted).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator



from herd import log
from herd.rpc import discovery
from herd.rpc.auth import secure_channel
from herd.rpc.files import receive_files
from herd.rpc.status import TRANSFER_DEADLINE_S, UNARY_DEADLINE_S, rpc_errors
from herd.errors import HerdError, PeerLostError
from protos.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc

logger = log.get(__name__)
CHUNK_BYTES = 1024 * 1024
COORDINATOR_ENV = "HERD_COORDINATOR"


class Coordinator:
    """A signed channel to one coordinator; every call has a deadline."""

    def __init__(self, target: str, secret: str):
        self.target = target
        self.channel = secure_channel(target, secret)
        self.stub = coordinator_pb2_grpc.CoordinatorServiceStub(self.channel)

    def call(self, method: str, request, timeout: float = UNARY_DEADLINE_S):
        with rpc_errors(self.target):
            return getattr(self.stub, method)(request, timeout=timeout)

    def close(self) -> None:
        self.channel.close()

    # --- files -----------------------------------------------------------------------------

    def put_blob(self, path: Path, sha: str) -> None:
        def parts() -> Iterator[coordinator_pb2.PutBlobRequest]:
            yield coordinator_pb2.PutBlobRequest(sha256=sha)
            with open(path, "rb") as f:
                while block := f.read(CHUNK_BYTES):
                    yield coordinator_pb2.PutBlobRequest(data=block)

        with rpc_errors(self.target):
            self.stub.PutBlob(parts(), timeout=TRANSFER_DEADLINE_S)

    def pull(self, job_id: str, step: int, out: Path) -> common_pb2.CheckpointInfo:
        """Writes the checkpoint's files into ``out``, each sha256-checked, each replaced
        atomically."""
        out.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(dir=out, prefix=".pull-"))
        try:
            with rpc_errors(self.target):
                stream = self.stub.GetAdapter(
                    coordinator_pb2.GetAdapterRequest(job_id=job_id, step=step),
                    timeout=TRANSFER_DEADLINE_S)
                header = receive_files(stream, scratch, "checkpoint", hint="pull again")
            for d in header.files:
                os.chmod(scratch / d.name, 0o644)  # an adapter is an ordinary file
                os.replace(scratch / d.name, out / d.name)
            return header
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def _accepts(target: str, secret: str) -> bool:
    c = Coordinator(target, secret)
    try:
        c.call("ListWorkers", coordinator_pb2.ListWorkersRequest(), timeout=2.0)
        return True
    except HerdError as e:
        logger.debug("coordinator_candidate_refused", target=target, error=e.message)
        return False
    finally:
        c.close()


def find_coordinator(explicit: str | None, secret: str, wait_s: float = 4.0) -> str:
    """The first advertised coordinator that accepts the secret; others (another cluster, a
    stale record) are skipped."""
    if explicit or (explicit := os.environ.get(COORDINATOR_ENV)):
        return explicit
    zc = discovery.make_zeroconf()
    tried: set[str] = set()
    try:
        browser = discovery.Browser(zc, discovery.COORDINATOR_TYPE)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            for advert in browser.snapshot():
                if advert.target not in tried:
                    tried.add(advert.target)
                    if _accepts(advert.target, secret):
                        return advert.target
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
