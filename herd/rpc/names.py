"""Names that come off the wire, checked before any of them becomes part of a path.

A job id, a step number or a file name sent by a peer is data, never a path: no separators, no
absolute paths, no ``..``, no leading dot, and for files only the extensions their kind has.
Every write then resolves its target and checks that it stays inside its folder (``inside``), so
a symlink planted in a folder cannot redirect it either.
"""

from __future__ import annotations

import re
from pathlib import Path

from herd.errors import DatasetError, ProtocolError

# What the coordinator makes (coordinator/service.py job_name + a random suffix), and no more.
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_FILE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_SHA = re.compile(r"^[0-9a-f]{64}$")
# A hub repo id as the hub spells one: org/name, or a bare legacy name (a model or a dataset).
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?$")
MAX_STEP = 10**9

# The files each kind of transfer may carry: datasets are data, checkpoints are safetensors and
# JSON (mlx-lm loads nothing else from them); a pulled adapter also carries its report
# (coordinator/reports.py: metrics.jsonl and loss.png). Never code, never a pickle.
EXTENSIONS = {
    "dataset": (".jsonl",),
    "checkpoint": (".safetensors", ".json"),
    "adapter": (".safetensors", ".json", ".jsonl", ".png"),
    # A stored model's files (herd/models/ref.py MODEL_PATTERNS): weights, configs, tokenizers.
    "model": (".safetensors", ".json", ".jsonl", ".model", ".tiktoken", ".txt", ".jinja"),
}
MAX_DEPTH = 4  # folders a model file may sit in (a hub repo's tokenizer/ or original/ ...)


def is_job_id(job_id: str) -> bool:
    return isinstance(job_id, str) and bool(_JOB_ID.match(job_id))


def check_job_id(job_id: str) -> str:
    if not is_job_id(job_id):
        raise ProtocolError(f"refusing job id {job_id[:80]!r}",
                            hint="job ids are letters, digits, '-' and '_' (at most 64)")
    return job_id


def check_sha(sha: str) -> str:
    if not _SHA.match(sha or ""):
        raise DatasetError(f"not a sha256: {sha[:80]!r}")
    return sha


def check_name(name: str, kind: str | None = None) -> str:
    """A peer-supplied file name: one plain name inside one folder, with an extension its kind
    allows (``kind`` None: any extension)."""
    if not _FILE.match(name or "") or ".." in name:
        raise DatasetError(f"refusing file name {name[:80]!r}", hint="plain file names only")
    if kind is not None and not name.endswith(EXTENSIONS[kind]):
        raise DatasetError(f"refusing {kind} file {name!r}",
                           hint=f"a {kind} carries only {', '.join(EXTENSIONS[kind])} files")
    return name


def check_path(name: str, kind: str | None = None) -> str:
    """A peer-supplied relative path (a model file in a folder of its repo): '/'-separated parts,
    each a plain name by ``check_name``, the last with an extension its kind allows. Joined to a
    folder only through ``inside``."""
    parts = (name or "").split("/")
    if len(parts) > MAX_DEPTH:
        raise DatasetError(f"refusing file name {name[:80]!r}",
                           hint=f"at most {MAX_DEPTH - 1} folders deep")
    for part in parts[:-1]:
        check_name(part)
    check_name(parts[-1], kind)
    return name


def check_step(step: int, iters: int | None = None) -> int:
    """A checkpoint step: positive, and within the job's iterations when they are known."""
    if not isinstance(step, int) or not 0 < step <= (iters if iters is not None else MAX_STEP):
        within = f"1..{iters}" if iters is not None else "positive"
        raise ProtocolError(f"refusing checkpoint step {step}", hint=f"steps are {within}")
    return step


def inside(folder: Path, *parts: str) -> Path:
    """``folder/parts...``, resolved, refused when it is not inside ``folder`` (resolved)."""
    base = folder.resolve()
    target = base.joinpath(*parts).resolve()
    if target == base or not target.is_relative_to(base):
        raise ProtocolError(f"refusing to write {'/'.join(parts)[:120]!r} outside {folder}")
    return target
