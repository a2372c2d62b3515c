"""What the coordinator forgets, and what it checks and warns about at submit: an ended job `herd
rm` removes (its record here; the servicer removes its files), the checkpoints beyond
`--keep-checkpoints`, the room a job's checkpoints need, and the warning for a job the cluster
cannot place now. Kept out of the scheduler: none of it moves a job between states."""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path
from typing import Callable

from coordinator.artifacts import PARTIAL_SUFFIX, require_free
from coordinator.domain import Job
from coordinator.placement import checkpoint_bytes, checkpoints_held
from coordinator.store import JobStore
from herd import log
from herd.errors import HerdError

logger = log.get(__name__)


def wait_warning(job: Job, verified: int, placement_timeout_s: float,
                 elsewhere: dict[str, int] | None = None) -> str:
    """Said at submit when fewer workers are verified than the job needs ("" otherwise).
    ``elsewhere``: the other backends' workers, by backend (a job that forgot `backend: ray`
    waited for agents beside two Ray nodes, "0 verified": an outside run)."""
    if verified >= job.workers_needed:
        return ""
    others = {b: n for b, n in (elsewhere or {}).items()
              if n and b != job.config.cluster.backend}
    return (f"{job.job_id} needs {job.workers_needed} workers and {verified} "
            f"{'is' if verified == 1 else 'are'} verified for cluster.backend "
            f"{job.config.cluster.backend}: it waits for more for up to "
            f"{placement_timeout_s:.0f} s (herd coordinator --placement-timeout), then fails"
            + "".join(f"; {n} verified worker(s) are {b} workers: for them set cluster.backend: "
                      f"{b}" for b, n in others.items()))


def delete_ended_job(store: JobStore, job_id: str) -> Job:
    """Forgets a job that has ended and returns it. An ended job's state never changes again,
    so this needs no scheduler lock; a late report for it finds no job."""
    job = store.get_job(job_id)
    if not job.state.final:
        raise HerdError(f"job {job_id} is {job.state.value}; only a job that has ended "
                        "can be removed", hint=f"`herd cancel {job_id}` first")
    store.delete_job(job_id)
    logger.info("job_deleted", job_id=job_id)
    return job


def expired_checkpoints(store: JobStore, job_id: str, keep: int) -> list[int]:
    """Forgets all but the newest ``keep`` checkpoints of a job (0: keeps all; the newest, the
    one a restart resumes from, is always kept) and returns their steps: the caller deletes
    their files."""
    if keep <= 0:
        return []
    expired = [c.step for c in store.checkpoints(job_id)][:-keep]
    for step in expired:
        store.delete_checkpoint(job_id, step)
    return expired


def prune_checkpoints(store: JobStore, adapters, keep: int) -> int:
    """``--keep-checkpoints`` applied to every job's stored checkpoints, not only to those saved
    from then on (an operator who set it to free space freed nothing: an outside run). Returns
    how many were removed."""
    removed = 0
    for job in store.list_jobs():
        for step in expired_checkpoints(store, job.job_id, keep):
            adapters.remove_step(job.job_id, step)
            removed += 1
    if removed:
        logger.info("checkpoints_pruned", checkpoints=removed, keep=keep)
    return removed


ORPHAN_GRACE_S = 24 * 3600  # an upload waits this long for the job that uses it
# A temporary file of an upload (".upload-*" from the job API, ".<sha>.part-*" from PutBlob) not
# written to for this long was left by a crash or a bug: a live upload writes every few seconds.
# (A broken PutBlob's ".<sha>.part-upload", which its uploader resumes, waits ORPHAN_GRACE_S.)
TEMP_GRACE_S = 3600


def _stale_temp(name: str) -> bool:
    return name.startswith(".upload-") or (name.startswith(".") and ".part-" in name)


def blobs_in_use(store: JobStore, models) -> set[str]:
    """The blobs a job (its dataset, its shipped adapter) or a stored model (a ModelStore)
    holds: blobs are shared, so only the others may go."""
    return ({sha for j in store.list_jobs() for sha in j.blobs()}
            | {f.sha256 for m in models.list() for f in m.files})


SUBMIT_GRACE_S = 600  # a blob MissingBlobs vouched for this recently may be a submit's in flight


def remove_unused(shas: set[str], store: JobStore, models, blobs) -> None:
    """A removed job's blobs that no other job or stored model holds, except those a submit may
    be about to use (MissingBlobs said "held" and touched them: it ran beside `herd rm` of a job
    of the same dataset, whose ranks then found no blob and failed: a review); the hourly sweep
    takes those later, if still unused."""
    for sha in shas - blobs_in_use(store, models):
        with contextlib.suppress(FileNotFoundError):
            if time.time() - (blobs.root / sha).stat().st_mtime >= SUBMIT_GRACE_S:
                blobs.remove(sha)


def sweep_adapters(store: JobStore, adapters, now_s: float, grace_s: float = 3600) -> int:
    """Removes the adapter folders of jobs the store no longer holds (a checkpoint's pieces that
    arrived after `herd rm` of their job), once ``grace_s`` old. Returns how many."""
    known = {j.job_id for j in store.list_jobs()}
    gone = [p for p in adapters.root.iterdir() if p.is_dir() and not p.name.startswith(".")
            and p.name not in known and now_s - p.stat().st_mtime >= grace_s]
    for folder in gone:
        shutil.rmtree(folder, ignore_errors=True)
        logger.info("orphan_adapters_removed", job_id=folder.name)
    return len(gone)


def sweep_blobs(store: JobStore, models, blobs, now_s: float,
                grace_s: float = ORPHAN_GRACE_S) -> tuple[int, int]:
    """Removes the blobs no job and no stored model holds, once older than ``grace_s``: a
    dataset uploaded to the job API and never used, or shipped by a submit that was then
    refused, stayed for ever (an outside run); and the temporary files of uploads that ended
    without removing theirs, once ``TEMP_GRACE_S`` old. Returns (files, bytes) removed."""
    used = blobs_in_use(store, models)
    count = freed = 0
    for path in blobs.root.iterdir():
        name = path.name
        temp = _stale_temp(name)
        if not temp and (len(name) != 64 or name in used):
            continue  # (links being made are dot-files too: never a blob's name)
        try:
            st = path.lstat()
            # (what arrived of a broken upload waits a day for the uploader to resume it)
            kept = grace_s if not temp or name.endswith(PARTIAL_SUFFIX) else TEMP_GRACE_S
            if not path.is_file() or now_s - st.st_mtime < kept:
                continue
            if temp:
                path.unlink()
                freed += st.st_size
            else:
                freed += blobs.remove(name)
        except FileNotFoundError:
            continue  # (an upload finishing as we look)
        count += 1
    if count:
        logger.info("orphan_blobs_removed", files=count, bytes=freed)
    return count, freed


def require_checkpoint_room(folder: Path, job: Job, keep: int, store: JobStore | None = None,
                            config_of: Callable[[Job], dict | None] = lambda j: None) -> None:
    """StorageError at submit unless the disk holding ``folder`` has room for the checkpoints
    the coordinator will hold of the job at once (it counted two: a job was taken, then failed
    part-way on its own checkpoints, every one kept by default: an outside run), beside those
    the unfinished jobs in ``store`` have still to write (two jobs each passed alone, then the
    second filled the disk). ``config_of``: a job's model config.json (ModelCatalog.config)."""
    n = checkpoints_held(job.config, keep)
    pending = 0
    for other in store.list_jobs() if store is not None else ():
        if not other.state.final and other.job_id != job.job_id:
            left = checkpoints_held(other.config, keep) - len(store.checkpoints(other.job_id))
            pending += max(0, left) * checkpoint_bytes(other.config, config_of(other))
    require_free(folder, n * checkpoint_bytes(job.config, config_of(job)) + pending,
                 f"the job's {n} checkpoint{'s' if n > 1 else ''}" + (
                     "" if keep else " (the coordinator keeps them all)") + (
                     f", beside {pending / 1e6:.1f} MB the unfinished jobs will still write"
                     if pending else ""),
                 hint="free space there, save less often (save_every), keep fewer "
                 "(herd coordinator --keep-checkpoints N)")
