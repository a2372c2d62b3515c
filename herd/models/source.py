"""Where a rank's worker gets the model, and how far it got: the two planes' shared words for
it (protos/v1/common.proto ModelSource and FetchProgress, converted at each plane's edge)."""

from __future__ import annotations

from dataclasses import dataclass

from herd.digest import FileDigest


@dataclass
class FetchProgress:
    """A worker getting one rank's model, before the ring forms (WorkerService.PrepareRank)."""

    rank: int
    worker_id: str = ""
    source: str = ""  # "store", "hub" or "local"
    files: int = 0
    bytes_needed: int = 0
    bytes_cached: int = 0  # needed and already held by the worker (sha256-checked)
    bytes_received: int = 0
    bytes_per_second: float = 0.0
    done: bool = False


@dataclass(frozen=True)
class ModelSource:
    """Where a job's workers get its model: the coordinator's store (``digest``, with the whole
    manifest, of which each worker takes what its rank needs), the hub at a commit, or neither (a
    folder every worker holds at the job's path)."""

    digest: str = ""
    files: tuple[FileDigest, ...] = ()
    hub_repo: str = ""
    hub_revision: str = ""
