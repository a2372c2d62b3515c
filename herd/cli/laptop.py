"""The laptop CLI: ``herd init | submit | jobs | watch | cancel | workers | pull``.

Exit codes a script can rely on: 0 success; a HerdError's ``exit_code`` on a refused or failed
call (2 config, 3 dataset, 4 placement, 5 unreachable, 6 auth, 7 not found); ``herd watch``
returns 10 when the job failed and 11 when it was cancelled.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from herd import log
from herd.cli.connection import CoordinatorConnection, connect
from herd.cli.watch import STATE, watch
from herd.config import JobConfig, load_config
from herd.digest import sha256_file
from herd.errors import DatasetError, HerdError, PlacementError
from herd.netif import hostport
from herd.rpc.auth import default_home, load_secret, write_secret
from protos.v1 import common_pb2, coordinator_pb2

logger = log.get(__name__)
EXIT_JOB_FAILED = 10
EXIT_JOB_CANCELLED = 11
DATA_FILES = ("train.jsonl", "valid.jsonl", "test.jsonl")


def _gb(n: int) -> str:
    return f"{n / 1024**3:.1f} GB"


def _connect(args) -> CoordinatorConnection:
    return connect(args.coordinator, load_secret(args.secret_file))


# --- init ------------------------------------------------------------------------------------

def cmd_init(args) -> int:
    home = args.home or default_home()
    path = home / "secret"
    if path.exists() and not args.force:
        print(f"cluster secret already at {path} (use --force to replace it)")
        return 0
    write_secret(path)
    for sub in ("coordinator", "worker"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    print(f"wrote the cluster secret to {path}; copy it to every machine of the cluster "
          f"(same path, mode 600) or set HERD_SECRET")
    return 0


# --- submit ----------------------------------------------------------------------------------

def check_locally(cfg: JobConfig) -> None:
    """The dataset check (herd/dataset.py) before anything leaves the laptop."""
    from herd import dataset

    tokenizer = dataset.load_tokenizer_for(cfg.model)
    report = dataset.check_job_dataset(cfg, tokenizer)
    for w in report.warnings:
        print(f"warning: {w}", file=sys.stderr)


def job_spec(cfg: JobConfig, name: str) -> tuple[common_pb2.JobSpec, list[tuple[Path, str]]]:
    data = Path(cfg.data)
    if not data.is_dir():
        raise DatasetError(f"dataset {data} is not a local folder",
                           hint="herd ships a local folder with train.jsonl (and valid.jsonl)")
    files = [(data / n, sha256_file(data / n)) for n in DATA_FILES if (data / n).is_file()]
    doc = cfg.model_dump(mode="json", exclude_unset=True)
    if Path(cfg.model).expanduser().exists():  # a local path: the same path must exist on workers
        doc["model"] = str(Path(cfg.model).expanduser().resolve())
    spec = common_pb2.JobSpec(name=name, config_yaml=yaml.safe_dump(doc, sort_keys=False))
    for path, sha in files:
        spec.dataset.add(name=path.name, sha256=sha, bytes=path.stat().st_size)
    return spec, files


def cmd_submit(args) -> int:
    cfg = load_config(args.config)
    if not args.no_check:
        check_locally(cfg)
    spec, files = job_spec(cfg, args.name or Path(args.config).stem)
    with _connect(args) as coord:
        for path, sha in files:  # content-addressed: re-uploading the same bytes is a no-op
            coord.put_blob(path, sha)
        job_id = coord.call("SubmitJob", coordinator_pb2.SubmitJobRequest(spec=spec)).job_id
    print(job_id)
    if args.watch:
        args.job = job_id
        return cmd_watch(args)
    return 0


# --- jobs, workers, cancel -------------------------------------------------------------------

def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def cmd_jobs(args) -> int:
    with _connect(args) as coord:
        jobs = coord.call("ListJobs", coordinator_pb2.ListJobsRequest()).jobs
    rows = [["JOB", "STATE", "WORKERS", "ITER", "LOSS", "CHECKPOINTS", "MESSAGE"]]
    for j in jobs:
        it = max((r.iteration for r in j.ranks), default=0)
        loss = next((f"{r.train_loss:.3f}" for r in j.ranks if r.rank == 0 and r.train_loss), "-")
        rows.append([j.job_id, STATE[j.state], str(j.workers), f"{it}/{j.iters}", loss,
                     ",".join(str(c.step) for c in j.checkpoints) or "-", j.message])
    print(_table(rows))
    return 0


REFUSED = {"auth": "wrong cluster secret", "unreachable": "unreachable address",
           "version": "version mismatch", "other": "refused"}


def _data_links(w) -> str:
    """The worker's data interfaces, as the planner sees them: en5:thunderbolt,en0:ethernet."""
    return ",".join(f"{i.name}:{i.kind}" for i in w.interfaces if i.data and
                    i.kind != "loopback") or "-"


def cmd_workers(args) -> int:
    """Verified workers, then the adverts the coordinator refused and why; exit 4 when no
    worker is usable (a script can wait on it)."""
    with _connect(args) as coord:
        reply = coord.call("ListWorkers", coordinator_pb2.ListWorkersRequest())
    rows = [["WORKER", "ADDRESS", "MEMORY", "FREE", "CHIP", "GPU", "MLX", "DATA", "JOB"]]
    for w in reply.workers:
        rows.append([w.worker_id, hostport(w.host, w.port), _gb(w.memory_bytes),
                     _gb(w.free_memory_bytes), w.chip, str(w.gpu_cores or "-"), w.mlx_version,
                     _data_links(w), w.running_job_id or "-"])
    print(_table(rows))
    if reply.refused:
        print("\nrefused (not used until fixed):", file=sys.stderr)
        for r in reply.refused:
            print(f"  {r.source} at {r.target}: {REFUSED.get(r.kind, r.kind)}: {r.reason}",
                  file=sys.stderr)
    if not reply.workers:
        print("herd workers: no usable worker"
              + (f" ({len(reply.refused)} refused, above)" if reply.refused else
                 "; start `herd worker` on each machine with the cluster secret"),
              file=sys.stderr)
        return PlacementError.exit_code
    return 0


def cmd_cancel(args) -> int:
    with _connect(args) as coord:
        state = coord.call("CancelJob", coordinator_pb2.CancelJobRequest(job_id=args.job),
                           timeout=30.0).state
    print(f"{args.job}: {STATE[state]}")
    return 0


# --- pull ------------------------------------------------------------------------------------

def cmd_pull(args) -> int:
    with _connect(args) as coord:
        header = coord.pull(args.job, args.step, args.output)
    size = sum(f.bytes for f in header.files)
    print(f"pulled step {header.step} of {args.job} ({size} bytes) into {args.output}")
    return 0


# --- watch -----------------------------------------------------------------------------------

def cmd_watch(args) -> int:
    with _connect(args) as coord:
        state, message = watch(coord, args.job, plain=args.plain or not sys.stdout.isatty())
    if state == common_pb2.JOB_STATE_SUCCEEDED:
        return 0
    print(f"{args.job}: {STATE[state]}: {message}", file=sys.stderr)
    return EXIT_JOB_CANCELLED if state == common_pb2.JOB_STATE_CANCELLED else EXIT_JOB_FAILED


# --- dispatch --------------------------------------------------------------------------------

def _parser(cmd: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"herd {cmd}")
    if cmd == "init":
        p.add_argument("--home", type=Path, default=None, help="default $HERD_HOME or ~/.herd")
        p.add_argument("--force", action="store_true", help="replace an existing secret")
        return p
    p.add_argument("--coordinator", metavar="HOST:PORT", default=None,
                   help="skip zeroconf discovery (also $HERD_COORDINATOR)")
    p.add_argument("--secret-file", type=Path, default=None, help="default $HERD_HOME/secret")
    if cmd == "submit":
        p.add_argument("config", help="job YAML (an mlx_lm.lora config plus cluster:)")
        p.add_argument("--name", default=None, help="job name (default: the config's file name)")
        p.add_argument("--no-check", action="store_true", help="skip the local dataset check")
        p.add_argument("--watch", action="store_true", help="follow the job after submitting")
        p.add_argument("--plain", action="store_true", help="plain lines, no progress bar")
    elif cmd in ("watch", "cancel", "pull"):
        p.add_argument("job")
        if cmd == "watch":
            p.add_argument("--plain", action="store_true", help="plain lines, no progress bar")
        if cmd == "pull":
            p.add_argument("--step", type=int, default=0, help="checkpoint step (default: latest)")
            p.add_argument("-o", "--output", type=Path, required=True, help="folder to write")
    return p


COMMANDS = {"init": cmd_init, "submit": cmd_submit, "jobs": cmd_jobs, "watch": cmd_watch,
            "cancel": cmd_cancel, "workers": cmd_workers, "pull": cmd_pull}


def main(argv: list[str]) -> int:
    cmd = argv[0]
    args = _parser(cmd).parse_args(argv[1:])
    try:
        return COMMANDS[cmd](args)
    except HerdError as e:
        print(f"herd {cmd}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130

