"""The listings: ``herd status | jobs | workers``, as tables or, with ``--json``, as JSON for
scripts (one object; lists of objects with stable snake_case keys)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter

from herd.cli.connection import (
    COORDINATOR_ENV,
    CoordinatorConnection,
    add_connection_args,
    connect_from_args,
)
from herd.cli.watch import FINAL, STATE
from herd.errors import AuthError, HerdError, PeerLostError, PlacementError
from herd.netif import hostport
from herd.usage import HelpFormatter
from protos.v1 import common_pb2, coordinator_pb2


def _gb(n: int) -> str:
    gib = n / 1024**3  # as macOS and Apple's specs count a Mac's memory
    return f"{gib:.1f} GiB" if gib >= 1 or not n else f"{gib:.2g} GiB"  # (25 MB read 0.0 GiB)


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


# --- one row each, as a dict (--json) and as table cells ---------------------------------------

def job_dict(j: common_pb2.JobStatus) -> dict:
    # A validation report's iteration is the one it ran at, before that iteration's step.
    done = [r.iteration - 1 if r.validation else r.iteration for r in j.ranks]
    # The rank that holds the loss: rank 0, or a pipeline's last stage (the one that reports it).
    rank0 = next((r for r in j.ranks if r.rank == 0 and r.train_loss), None) or max(
        (r for r in j.ranks if r.train_loss), key=lambda r: r.iteration, default=None)
    return {
        "job_id": j.job_id, "name": j.name, "state": STATE[j.state], "message": j.message,
        "workers": j.workers, "worker_ids": list(j.worker_ids), "attempt": j.attempt,
        "iters": j.iters, "iteration": max(done, default=0),
        "train_loss": rank0.train_loss if rank0 and rank0.train_loss else None,
        "val_loss": rank0.val_loss if rank0 and rank0.val_loss else None,
        "checkpoints": [c.step for c in j.checkpoints],
        # The model the job is pinned to (hub id@commit, or a folder) and its stored digest.
        "model": j.model, "model_digest": j.model_digest or None,
        "created_unix_ms": j.created_unix_ms, "updated_unix_ms": j.updated_unix_ms,
    }


def _steps(steps: list[int]) -> str:
    """The newest three steps: the column stays short however many a long job keeps."""
    if not steps:
        return "-"
    return ("...," if len(steps) > 3 else "") + ",".join(map(str, steps[-3:]))


def job_row(d: dict) -> list[str]:
    def f(x):
        return "-" if x is None else f"{x:.3f}"

    # An active job shrunk to fewer workers (cluster.elastic) shows it: running/asked.
    running = len(d["worker_ids"])
    workers = (f"{running}/{d['workers']}" if d["state"] not in FINAL_NAMES and running
               and running != d["workers"] else str(d["workers"]))
    return [d["job_id"], d["state"], workers, f"{d['iteration']}/{d['iters']}",
            f(d["train_loss"]), f(d["val_loss"]), _steps(d["checkpoints"]),
            d["model"] + (f" ({d['model_digest'][:12]})" if d["model_digest"] else ""),
            # One line per job: a message's hint (its next lines) joins it.
            "; ".join(line.strip() for line in d["message"].splitlines() if line.strip())]


FINAL_NAMES = {STATE[s] for s in FINAL}
JOB_HEADER = ["JOB", "STATE", "WORKERS", "ITER", "LOSS", "VAL", "CHECKPOINTS", "MODEL",
              "MESSAGE"]


def worker_dict(w: common_pb2.WorkerInfo) -> dict:
    return {"worker_id": w.worker_id, "host": w.host, "port": w.port,
            "memory_bytes": w.memory_bytes, "free_memory_bytes": w.free_memory_bytes,
            "chip": w.chip, "gpu_cores": w.gpu_cores, "os": w.os, "mlx_version": w.mlx_version,
            # The data interfaces, as the planner sees them (name and kind).
            "data": [{"name": i.name, "kind": i.kind} for i in w.interfaces
                     if i.data and i.kind != "loopback"],
            "running_job_id": w.running_job_id or None,
            # A Ray node's resources (cluster.backend: ray); {} for an agent.
            "resources": dict(sorted(w.resources.items()))}


def worker_row(w: dict, ray: bool = False) -> list[str]:
    """One table row; ``ray``: the listing has Ray nodes, so a RESOURCES column."""
    data = ",".join(f"{i['name']}:{i['kind']}" for i in w["data"]) or "-"
    address = f"ray:{w['host']}" if w["resources"] else hostport(w["host"], w["port"])
    row = [w["worker_id"], address, _gb(w["memory_bytes"]), _gb(w["free_memory_bytes"]),
           w["chip"] or "-", str(w["gpu_cores"] or "-"), w["mlx_version"] or "-", data,
           w["running_job_id"] or "-"]
    if ray:
        row.append(",".join(f"{k}={v:g}" for k, v in w["resources"].items()) or "-")
    return row


def workers_table(workers: list[dict]) -> str:
    ray = any(w["resources"] for w in workers)
    return table([WORKER_HEADER + (["RESOURCES"] if ray else [])]
                 + [worker_row(w, ray) for w in workers])


SHOWN_REFUSED = 20
WORKER_HEADER = ["WORKER", "ADDRESS", "MEMORY", "FREE", "CHIP", "GPU", "MLX", "DATA", "JOB"]
REFUSED = {"auth": "no certificate of this cluster for that id",
           "unreachable": "unreachable address",
           "version": "version mismatch", "duplicate": "worker id taken",
           "other": "refused"}


def _list_workers(coord: CoordinatorConnection):
    return coord.call("ListWorkers", coordinator_pb2.ListWorkersRequest())


def _workers(coord: CoordinatorConnection) -> list[dict]:
    return [worker_dict(w) for w in _list_workers(coord).workers]


def _refused(reply) -> list[dict]:
    return [{"source": r.source, "target": r.target, "kind": r.kind, "reason": r.reason}
            for r in reply.refused]


# --- the commands ----------------------------------------------------------------------------

def cmd_jobs(args, coord: CoordinatorConnection) -> int:
    reply = coord.call("ListJobs", coordinator_pb2.ListJobsRequest())
    if reply.coordinator_health:  # its database cannot be written: what it still shows is old
        print(f"herd jobs: the coordinator is degraded: {reply.coordinator_health}",
              file=sys.stderr)
    jobs = [job_dict(j) for j in reply.jobs]
    if args.json:
        print(json.dumps(jobs, indent=2))
    else:
        print(table([JOB_HEADER] + [job_row(j) for j in jobs]))
    return 0


def _wait_for_workers(args) -> list[dict]:
    """At least ``args.wait`` verified workers, waiting for the coordinator itself too (it may
    be starting); PeerLostError after ``args.timeout``."""
    deadline = time.monotonic() + args.timeout
    have: int | None = None  # verified at the last poll (None: none answered yet)
    last = None
    while time.monotonic() < deadline:
        try:
            with connect_from_args(args) as coord:
                while time.monotonic() < deadline:
                    workers = _workers(coord)
                    if len(workers) >= args.wait:
                        return workers
                    if len(workers) != have:  # (each change, not each poll)
                        names = ", ".join(w["worker_id"] for w in workers)
                        print(f"herd workers: {len(workers)} of {args.wait} verified"
                              + (f" ({names})" if names else "") + ", waiting up to "
                              f"{deadline - time.monotonic():.0f} s more", file=sys.stderr)
                    have = len(workers)
                    time.sleep(0.5)
        except (PeerLostError, AuthError) as e:
            # Not up yet (zeroconf may show other clusters' coordinators before this one's);
            # a coordinator named outright that refuses this certificate will not change its mind.
            if isinstance(e, AuthError) and (args.coordinator or os.environ.get(COORDINATOR_ENV)):
                raise
            last = e
            time.sleep(0.5)
    raise PeerLostError(f"{have or 0} of {args.wait} workers verified after {args.timeout:.0f} s"
                        + (f" ({last.message})" if last and not have else ""),
                        hint="are the coordinator and the workers running, joined to this "
                        "cluster (`herd join`)? `herd worker` logs why it is refused; if none "
                        "logs a refusal, multicast may be blocked between the machines: "
                        "`herd coordinator --worker HOST:PORT` names each worker")


def cmd_workers(args, coord: CoordinatorConnection | None) -> int:
    """Verified workers, then the adverts the coordinator refused and why (on stderr); exit 4
    when no worker is usable (a script can wait on it, or use --wait)."""
    refused: list[dict] = []
    if args.wait:
        workers = _wait_for_workers(args)
    else:
        reply = _list_workers(coord)
        workers, refused = [worker_dict(w) for w in reply.workers], _refused(reply)
    if args.json:
        print(json.dumps(workers, indent=2))
    else:
        print(workers_table(workers))
    if refused:
        print("\nrefused (not used until fixed):", file=sys.stderr)
        for r in refused[:SHOWN_REFUSED]:
            print(f"  {r['source']} at {r['target']}: {REFUSED.get(r['kind'], r['kind'])}: "
                  f"{r['reason']}", file=sys.stderr)
        if len(refused) > SHOWN_REFUSED:  # (a flood of adverts listed 3400 lines: outside run)
            kinds = Counter(REFUSED.get(r["kind"], r["kind"]) for r in refused[SHOWN_REFUSED:])
            print(f"  and {len(refused) - SHOWN_REFUSED} more: "
                  + ", ".join(f"{n} {k}" for k, n in kinds.most_common()), file=sys.stderr)
    if not workers:
        print("herd workers: no usable worker"
              + (f" ({len(refused)} refused, above)" if refused else
                 "; `herd join` and start `herd worker` on each machine. Running but not "
                 "found (multicast blocked between the machines)? start each with "
                 "`herd worker --port P` and the coordinator with `--worker HOST:P` for each"),
              file=sys.stderr)
        return PlacementError.exit_code
    return 0


def cmd_status(args, coord: CoordinatorConnection) -> int:
    reply = coord.call("ListJobs", coordinator_pb2.ListJobsRequest())
    workers, jobs = _workers(coord), [job_dict(j) for j in reply.jobs]
    active = [j for j in jobs if j["state"] not in FINAL_NAMES]
    counts: dict[str, int] = {}
    for j in jobs:
        counts[j["state"]] = counts.get(j["state"], 0) + 1
    if args.json:
        print(json.dumps({"coordinator": coord.target, "found_by": coord.found_by,
                          "health": reply.coordinator_health, "workers": workers,
                          "jobs": active, "job_counts": counts}, indent=2))
        return 0
    busy = sum(1 for w in workers if w["running_job_id"])
    print(f"coordinator  {coord.target} (from {coord.found_by})")
    if reply.coordinator_health:  # (what it shows of jobs is as of its last write)
        print(f"degraded     {reply.coordinator_health}")
    print(f"workers      {len(workers)} verified, {busy} busy, "
          f"{_gb(sum(w['memory_bytes'] for w in workers))} in all")
    print("jobs         " + (", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none"))
    if workers:
        print("\n" + workers_table(workers))
    if active:
        print("\n" + table([JOB_HEADER] + [job_row(j) for j in active]))
    return 0


DESCRIPTIONS = {
    "status": "The cluster at a glance: which coordinator answered (and how it was found), its "
              "verified workers, and the jobs not yet ended.",
    "jobs": "Every job the coordinator knows, newest first: state, iteration, losses, stored "
            "checkpoints, and why it waits or failed.",
    "workers": "The workers the coordinator has verified (they hold a certificate of this "
               "cluster for their id and answer health checks): address, memory, chip, MLX "
               "version, running job.",
}
COMMANDS = {"status": cmd_status, "jobs": cmd_jobs, "workers": cmd_workers}


def main(argv: list[str]) -> int:
    cmd = argv[0]
    p = argparse.ArgumentParser(prog=f"herd {cmd}", description=DESCRIPTIONS[cmd],
                                formatter_class=HelpFormatter)
    p.add_argument("--json", action="store_true", help="JSON for scripts instead of a table")
    if cmd == "workers":
        p.add_argument("--wait", type=int, default=0, metavar="N",
                       help="first wait until at least N workers are verified")
        p.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                       help="how long --wait waits (then exit 5)")
    add_connection_args(p)
    args = p.parse_args(argv[1:])
    try:
        if cmd == "workers" and args.wait:
            return cmd_workers(args, None)
        with connect_from_args(args) as coord:
            return COMMANDS[cmd](args, coord)
    except HerdError as e:
        print(f"herd {cmd}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
