"""What travels with a pulled adapter besides its weights: ``metrics.jsonl`` (every progress and
validation report of the job up to the checkpoint's step) and ``loss.png`` (its loss curve, drawn
with matplotlib's Agg backend), so a user can look instead of read.

Built from the job's stored events when the adapter is pulled, never stored in the checkpoint
itself: the checkpoint's files (and their manifest) stay what the rank wrote.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from typing import Iterator

from coordinator.artifacts import AdapterStore
from coordinator.domain import Checkpoint, EventKind, FileDigest, JobEvent
from coordinator.store import JobStore
from herd.rpc.files import CHUNK_BYTES

METRICS = "metrics.jsonl"
LOSS_PNG = "loss.png"


def all_events(store: JobStore, job_id: str) -> list[JobEvent]:
    out: list[JobEvent] = []
    while batch := store.events(job_id, out[-1].seq if out else 0):
        out += batch
    return out


def metric_records(events: list[JobEvent], up_to_step: int) -> list[dict]:
    """One record per report, as the rank's own metrics lines are keyed (``"event"``: train or
    val), plus the job's state changes and checkpoints; ``up_to_step`` 0 = all, else what was
    recorded up to that step (its checkpoint, or its last report): no later state change."""
    records, last_val = [], {}
    cutoff = float("inf")
    if up_to_step:
        saved = [e.time_ms for e in events if e.kind is EventKind.CHECKPOINT
                 and e.step == up_to_step]
        reported = [e.time_ms for e in events if e.kind is EventKind.PROGRESS
                    and e.progress is not None and e.progress.iteration <= up_to_step]
        cutoff = saved[0] if saved else max(reported, default=cutoff)
    for e in events:
        base = {"time_unix_ms": e.time_ms}
        if e.kind is EventKind.PROGRESS and e.progress is not None:
            p = e.progress
            if up_to_step and p.iteration > up_to_step:
                continue
            # A validation report (flagged; or, from an older relay, a new val loss).
            if p.validation or (p.val_loss and p.val_loss != last_val.get(p.rank)):
                last_val[p.rank] = p.val_loss
                records.append({"event": "val", **base, "rank": p.rank,
                                "worker_id": p.worker_id, "iteration": p.iteration,
                                "val_loss": p.val_loss})
                continue
            fields = dataclasses.asdict(p)
            fields.pop("val_loss")
            # (null, not 0.0, from a pipeline stage that holds no loss)
            fields["train_loss"] = fields["train_loss"] or None
            records.append({"event": "train", **base, **fields})
        elif e.kind is EventKind.STATE and e.state is not None and e.time_ms <= cutoff:
            records.append({"event": "state", **base, "state": e.state.value,
                            "message": e.message})
        elif e.kind is EventKind.CHECKPOINT and (not up_to_step or e.step <= up_to_step):
            records.append({"event": "checkpoint", **base, "step": e.step})
    return _once_per_iteration(records)


def _once_per_iteration(records: list[dict]) -> list[dict]:
    """One train and one validation record per rank and iteration. A resumed attempt redoes the
    iterations after its checkpoint, and its first window is short (from the checkpoint to the
    next report): the attempt that was cut off reported the full window, and an exact resume
    redoes it to the bit, so the record over more iterations stays (the latest on a tie). Both
    were kept, and the curve showed a bump that never happened (an outside run)."""
    best: dict[tuple, int] = {}
    for i, r in enumerate(records):
        if r["event"] not in ("train", "val"):
            continue
        key = (r["event"], r["rank"], r["iteration"])
        kept = best.get(key)
        if kept is None or (r.get("window_iterations", 0)
                            >= records[kept].get("window_iterations", 0)):
            best[key] = i
    keep = set(best.values())
    return [r for i, r in enumerate(records) if r["event"] not in ("train", "val") or i in keep]


def loss_png(records: list[dict], title: str) -> bytes:
    """The first rank's training loss (the global mean: every rank reports the same) and the
    validation losses, by iteration; a report redone after a restart replaces the earlier one."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # (the first rank that reports each: a pipeline's stages before the last hold no loss)
    first = min((r["rank"] for r in records if r["event"] == "train" and r["train_loss"]),
                default=0)
    first_val = min((r["rank"] for r in records if r["event"] == "val"), default=0)
    train = {r["iteration"]: r["train_loss"] for r in records
             if r["event"] == "train" and r["rank"] == first and r["train_loss"]}
    val = {r["iteration"]: r["val_loss"] for r in records
           if r["event"] == "val" and r["rank"] == first_val}
    # A Figure of its own, not pyplot: no global state, safe in a server thread.
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        ax.plot(sorted(train), [train[i] for i in sorted(train)], label="train loss",
                color="#2563eb")
    if val:
        ax.plot(sorted(val), [val[i] for i in sorted(val)], "o-", label="validation loss",
                color="#dc2626")
    if not (train or val):
        ax.text(0.5, 0.5, "no loss reported yet", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend()
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png")
    return out.getvalue()


def report_files(store: JobStore, job_id: str, step: int) -> list[tuple[str, bytes]]:
    """``metrics.jsonl`` and ``loss.png`` for the adapter of ``job_id`` at ``step``."""
    records = metric_records(all_events(store, job_id), step)
    lines = "".join(json.dumps(r) + "\n" for r in records).encode()
    return [(METRICS, lines), (LOSS_PNG, loss_png(records, f"{job_id} (step {step})"))]


def adapter_with_report(store: JobStore, adapters: AdapterStore,
                        c: Checkpoint) -> tuple[list[FileDigest], Iterator[tuple[str, bytes]]]:
    """A stored checkpoint's files followed by its report files: the list (with sizes and
    sha256, for the receiver to check) and their ``(name, bytes)`` chunks in that order."""
    have = {f.name for f in c.files}
    extra = [(n, data) for n, data in report_files(store, c.job_id, c.step) if n not in have]
    files = list(c.files) + [FileDigest(n, hashlib.sha256(data).hexdigest(), len(data))
                             for n, data in extra]

    def chunks() -> Iterator[tuple[str, bytes]]:
        yield from adapters.files(c)
        for name, data in extra:
            for i in range(0, max(len(data), 1), CHUNK_BYTES):
                yield name, data[i:i + CHUNK_BYTES]

    return files, chunks()
