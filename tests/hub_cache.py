"""A local Hugging Face hub cache in the layout huggingface_hub writes when it downloads a model
(nothing can be downloaded here): ``hub/models--org--name/`` with ``blobs/`` named by each file's
etag (the sha256 of an LFS file such as a weights shard, the git blob sha1 of a small one),
``snapshots/<commit>/`` of relative symlinks to them, and ``refs/<branch>`` holding the commit.
``write_hub_cache`` checks its work with the library's own ``scan_cache_dir``."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def _etag(name: str, data: bytes) -> str:
    if name.endswith(".safetensors"):  # an LFS file: its etag is its sha256
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # a git blob


def write_hub_cache(hf_home: Path, repo_id: str, folder: Path, names: list[str] | None = None,
                    branch: str = "main") -> str:
    """Caches ``folder``'s files (or only ``names``) as revision ``branch`` of ``repo_id``;
    returns the commit."""
    from huggingface_hub import scan_cache_dir

    files = sorted(p for p in folder.iterdir() if p.is_file())
    commit = hashlib.sha1(repo_id.encode() + b"".join(
        hashlib.sha256(p.read_bytes()).digest() for p in files)).hexdigest()
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for d in (repo / "blobs", repo / "refs", snapshot):
        d.mkdir(parents=True, exist_ok=True)
    for p in files:
        if names is not None and p.name not in names:
            continue
        data = p.read_bytes()
        etag = _etag(p.name, data)
        (repo / "blobs" / etag).write_bytes(data)
        link = snapshot / p.name
        link.unlink(missing_ok=True)
        os.symlink(f"../../blobs/{etag}", link)
    (repo / "refs" / branch).write_text(commit)
    cached = {r.repo_id: r for r in scan_cache_dir(hf_home / "hub").repos}
    revisions = {r.commit_hash: r for r in cached[repo_id].revisions}
    assert branch in revisions[commit].refs
    want = names if names is not None else [p.name for p in files]
    assert sorted(f.file_name for f in revisions[commit].files) == sorted(want)
    return commit
