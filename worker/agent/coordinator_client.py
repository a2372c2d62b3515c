"""The agent's calls to the coordinator: fetching datasets and checkpoints, reporting a rank,
uploading its checkpoints. Each call has a deadline; every file moves through herd/rpc/files.py."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator

from herd.digest import file_digest
from herd.errors import ChecksumError
from herd.rpc import pki
from herd.rpc.channel import TRANSFER_DEADLINE_S, UNARY_DEADLINE_S, secure_channel
from herd.rpc.files import (
    check_name,
    receive_checkpoint_files,
    receive_checkpoint_folder,
    receive_file,
    send_files,
)
from herd.rpc.status import rpc_errors
from herd.stage_cut import StagePiece
from protos.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc
from worker.agent import convert

_AGAIN = "the agent fetches it again on the next attempt"
# A rank's checkpoint is complete once it has one (worker/rank/checkpoint.py).
MANIFEST = "manifest.json"


class CoordinatorClient:
    """Calls to the coordinator at ``target``, over TLS to the name only its certificate holds
    (a StartRank naming another address cannot make the agent talk to anyone else)."""

    def __init__(self, target: str, identity: pki.Identity):
        self.target = target
        self._channel = secure_channel(target, identity, pki.dns_name("coordinator"))
        self._stub = coordinator_pb2_grpc.CoordinatorServiceStub(self._channel)

    def fetch_blob(self, sha: str, dest: Path) -> None:
        with rpc_errors(self.target):
            stream = self._stub.GetBlob(coordinator_pb2.GetBlobRequest(sha256=sha),
                                        timeout=TRANSFER_DEADLINE_S)
            receive_file((chunk.data for chunk in stream), sha, dest, f"blob {sha[:12]}",
                         hint=_AGAIN)

    def blob_chunks(self, sha: str, offset: int = 0) -> Iterator[bytes]:
        """A blob's bytes from ``offset`` on, as they arrive. Waits for a restarting coordinator
        (wait_for_ready) within the deadline; a resumed transfer passes the bytes it holds."""
        with rpc_errors(self.target):
            stream = self._stub.GetBlob(coordinator_pb2.GetBlobRequest(sha256=sha, offset=offset),
                                        timeout=TRANSFER_DEADLINE_S, wait_for_ready=True)
            for chunk in stream:
                yield chunk.data

    def read_blob(self, sha: str, size: int) -> bytes:
        """A small blob in memory, checked against its sha256."""
        data = b"".join(self.blob_chunks(sha))
        if len(data) != size or hashlib.sha256(data).hexdigest() != sha:
            raise ChecksumError(f"blob {sha[:12]} arrived corrupted", hint=_AGAIN)
        return data

    def pull_checkpoint(self, job_id: str, step: int, folder: Path) -> None:
        """The stored checkpoint ``step`` into ``folder``, every file checked."""
        with rpc_errors(self.target):
            stream = self._stub.GetAdapter(
                coordinator_pb2.GetAdapterRequest(job_id=job_id, step=step),
                timeout=TRANSFER_DEADLINE_S)
            receive_checkpoint_files(stream, folder, f"checkpoint {step}", hint=_AGAIN)

    def pull_stage_piece(self, job_id: str, step: int, stage: int, folder: Path) -> StagePiece:
        """Stage ``stage``'s own piece of checkpoint ``step`` as ``folder``, every file checked,
        the folder renamed into place whole. Returns the piece's stage and blocks."""
        request = coordinator_pb2.GetAdapterRequest(job_id=job_id, step=step,
                                                    stage=common_pb2.StagePiece(index=stage))
        with rpc_errors(self.target):
            header = receive_checkpoint_folder(
                self._stub.GetAdapter(request, timeout=TRANSFER_DEADLINE_S), folder,
                f"checkpoint {step} stage {stage}", hint=_AGAIN)
        if not header.HasField("stage"):
            raise ChecksumError(f"the coordinator sent no stage piece of checkpoint {step}")
        return convert.stage_from_pb(header.stage)

    def report(self, request: coordinator_pb2.ReportRankRequest) -> bool:
        """Sends one report; True when the coordinator says the rank must stop."""
        with rpc_errors(self.target):
            return self._stub.ReportRank(request, timeout=UNARY_DEADLINE_S).stop

    def put_checkpoint(self, job_id: str, attempt: int, step: int, folder: Path,
                       stage: StagePiece | None = None) -> None:
        """Uploads a complete checkpoint folder: the files its manifest lists, and the manifest.
        The coordinator stores it idempotently per (job, step[, stage])."""
        manifest = json.loads((folder / MANIFEST).read_text())
        names = sorted(manifest["files"]) + [MANIFEST]
        files = [file_digest(folder / check_name(name)) for name in names]

        def parts() -> Iterator[coordinator_pb2.PutCheckpointRequest]:
            yield coordinator_pb2.PutCheckpointRequest(
                header=convert.checkpoint_header(job_id, attempt, step, files, stage))
            for name, block in send_files(folder, files):
                yield coordinator_pb2.PutCheckpointRequest(
                    chunk=common_pb2.FileChunk(name=name, data=block))

        with rpc_errors(self.target):
            self._stub.PutCheckpoint(parts(), timeout=TRANSFER_DEADLINE_S)

    def close(self) -> None:
        self._channel.close()
