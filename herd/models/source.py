"""Where a rank's worker gets the model, and how far it got: the two planes' shared words for
it (protos/v1/common.proto ModelSource and FetchProgress, converted at each plane's edge)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from herd.digest import FileDigest, human_bytes


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


def describe_fetch(f) -> str:
    """A worker getting its rank's model, with exact byte counts (scripts read them), from a
    FetchProgress (this one or the proto's)."""
    head = (f"{'fetched' if f.done else 'fetch'} rank {f.rank} ({f.worker_id}) from {f.source}: "
            f"{f.files} files, {f.bytes_needed} bytes needed, {f.bytes_cached} cached, "
            f"{f.bytes_received} received")
    return head + (f" at {human_bytes(f.bytes_per_second)}/s" if f.bytes_per_second else "")


def fetch_line(fetching: Iterable) -> str:
    """The fetch phase in one line, summed over the workers (it does not grow with them), from
    each rank's latest FetchProgress (this one or the proto's): `herd watch`, the dashboard."""
    fs = list(fetching)
    need = sum(max(0, f.bytes_needed - f.bytes_cached) for f in fs)
    rate = sum(f.bytes_per_second for f in fs if not f.done)
    return (f"fetching the model: {sum(f.done for f in fs)}/{len(fs)} workers done, "
            f"{human_bytes(sum(f.bytes_received for f in fs))} of {human_bytes(need)}"
            + (f" at {human_bytes(rate)}/s" if rate else ""))
