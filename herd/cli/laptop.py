"""The laptop's job commands: ``herd submit | watch | cancel | pull | rm`` (``herd init``,
``join``, ``token`` and ``revoke``: herd/cli/trust.py; ``jobs`` and ``workers``: listing.py).

Exit codes a script can rely on: 0 success; a HerdError's ``exit_code`` on a refused or failed
call (2 config, 3 dataset, 4 placement, 5 unreachable, 6 auth, 7 not found, 8 disk full or
failing); ``herd watch``
returns 10 when the job failed and 11 when it was cancelled.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from herd import log
from herd.cli.connection import CoordinatorConnection, add_connection_args, connect_from_args
from herd.cli.watch import FINAL, STATE, watch
from herd.config import JobConfig, load_config
from herd.digest import sha256_file
from herd.errors import ConfigError, DatasetError, HerdError, NotFoundError, PeerLostError
from herd.model_config import resolve_model_config, resume_weights_file
from herd.models import ref as refs
from herd.models.manifest import folder_manifest, model_files
from herd.rpc.channel import UNARY_DEADLINE_S
from herd.usage import HelpFormatter
from protos.v1 import common_pb2, coordinator_pb2

logger = log.get(__name__)
EXIT_JOB_FAILED = 10
EXIT_JOB_CANCELLED = 11
DATA_FILES = ("train.jsonl", "valid.jsonl", "test.jsonl")
RESUME_ADAPTER = "resume_adapters.safetensors"  # the shipped resume_adapter_file, on workers




# --- submit ----------------------------------------------------------------------------------

def check_locally(cfg: JobConfig) -> None:
    """The dataset check (herd/dataset.py) before anything leaves the laptop."""
    from herd import dataset
    from herd.model_config import check_job_files, check_model_folder, missing_here

    check_job_files(cfg)
    check_model_folder(cfg.model)
    tokenizer = dataset.load_tokenizer_for(cfg.model)
    report = dataset.check_job_dataset(cfg, tokenizer)
    for w in report.warnings + [missing_here(cfg.model)]:
        if w:
            print(f"warning: {w}", file=sys.stderr)
    if cfg.trust_remote_code:
        print("warning: trust_remote_code: true runs Python shipped with the model on every "
              "worker; workers refuse it unless started with --allow-remote-code",
              file=sys.stderr)


def pin_folder(cfg: JobConfig, coord: CoordinatorConnection) -> tuple[str, str]:
    """(the job's model folder as an absolute path, the stored model's digest or ""): a folder
    the coordinator's model store holds goes by its digest (hashed only when a stored model has
    the same file names and sizes); any other folder must exist at that path on every worker."""
    folder = refs.parse(cfg.model).path.resolve()
    if not folder.is_dir():
        return str(folder), ""
    try:
        listing = {(p.name, p.stat().st_size) for p in model_files(folder)}
    except ConfigError:
        return str(folder), ""  # not a model folder: the workers' own check will say so
    stored = coord.call("ListModels", coordinator_pb2.ListModelsRequest()).models
    same = {m.digest for m in stored if {(f.name, f.bytes) for f in m.files} == listing}
    if same and (digest := folder_manifest(folder).digest) in same:
        return str(folder), digest
    if cfg.cluster.model_source != "coordinator":
        print(f"note: {folder} is not in the coordinator's model store: every worker needs it "
              f"at that path (`herd models add {cfg.model}` to have workers fetch it)",
              file=sys.stderr)
    return str(folder), ""


def job_spec(cfg: JobConfig, name: str, model: str | None = None,
             model_digest: str = "") -> tuple[common_pb2.JobSpec, list[tuple[Path, str]]]:
    from herd.dataset import reads_hub_dataset

    cfg.check_trains_on_a_cluster()
    data = Path(cfg.data)
    files = []
    if not reads_hub_dataset(cfg):  # a hub dataset: each rank loads it through `datasets`
        if not data.is_dir():
            raise DatasetError(f"dataset {cfg.data} is not a local folder (looked for "
                               f"{data.resolve()})",
                               hint="herd ships a local folder with train.jsonl (and "
                               "valid.jsonl), or names a Hugging Face dataset (hf_dataset); "
                               "relative paths resolve from the current folder, as in mlx_lm.lora")
        files = [(data / n, sha256_file(data / n)) for n in DATA_FILES if (data / n).is_file()]
    doc = cfg.model_dump(mode="json", exclude_unset=True)
    if model is not None:  # pinned (pin_model)
        doc["model"] = model
    elif Path(cfg.model).expanduser().exists():  # the same path must exist on workers
        doc["model"] = str(Path(cfg.model).expanduser().resolve())
    # The adapter to resume from goes with the job (no worker need hold it); the config keeps
    # the laptop's path, which each rank replaces with its fetched copy.
    resume = (resume_weights_file(cfg) if cfg.resume_adapter_file
              and Path(cfg.resume_adapter_file).expanduser().exists() else None)
    if resume is not None:
        doc["resume_adapter_file"] = str(resume.resolve())
    spec = common_pb2.JobSpec(name=name, config_yaml=yaml.safe_dump(doc, sort_keys=False),
                              model_digest=model_digest)
    for path, sha in files:
        spec.dataset.add(name=path.name, sha256=sha, bytes=path.stat().st_size)
    if resume is not None:
        files.append((resume, sha256_file(resume)))
        spec.resume_adapter.CopyFrom(common_pb2.FileDigest(
            name=RESUME_ADAPTER, sha256=files[-1][1], bytes=resume.stat().st_size))
    return spec, files


SUBMIT_CHECK_BYTES_PER_S = 5e6
SUBMIT_PLAN_S = 30.0


def cmd_submit(args) -> int:
    cfg = load_config(args.config, {"model": args.model, "data": args.data})
    ref = refs.parse(cfg.model)
    # A hub id pinned to its commit from config.json alone (never weights): a wrong id or
    # revision fails here, first, before the coordinator is asked anything.
    try:
        hub = None if ref.is_local else refs.resolve(ref)
    except ConfigError as e:
        if "/" not in cfg.model:  # (a store's --name read as a hub id: an outside run)
            e.hint = (e.hint + "; " if e.hint else "") + (
                f"a name given by `herd models add --name` ({cfg.model}?) is the store's own: "
                "a job names the model's folder or hub id, and the stored copy is used")
        raise
    from herd.dataset import reads_hub_dataset
    from herd.hf_dataset import check_cluster_source

    if reads_hub_dataset(cfg):  # what the coordinator refuses for any cluster job: said before
        check_cluster_source(cfg, shipped=False)  # loading it here (a file loader, a path)
    if not args.no_check:
        check_locally(cfg)
    with connect_from_args(args) as coord:
        model, digest = (hub.pinned, "") if hub else pin_folder(cfg, coord)
        spec, files = job_spec(cfg, args.name or Path(args.config).stem, model, digest)
        spec.resume_from = args.resume_from or ""
        spec.model_config_json = _model_config_json(cfg, hub)
        # Content-addressed: only the files the coordinator lacks go, each from where a broken
        # upload of it stopped.
        missing = coord.missing([sha for _, sha in files])
        for path, sha in files:
            if sha in missing:
                coord.put_blob(path, sha, held=missing.pop(sha))
        # The coordinator reads the uploaded records (coordinator/jobs.py) and plans the job, or
        # the fixes that would make it fit, before it answers: the deadline grows with the
        # dataset, at a parse rate well below one core's, plus the planning on a loaded machine.
        data_bytes = sum(d.bytes for d in spec.dataset)
        reply = coord.call("SubmitJob", coordinator_pb2.SubmitJobRequest(spec=spec),
                           timeout=UNARY_DEADLINE_S + SUBMIT_PLAN_S
                           + data_bytes / SUBMIT_CHECK_BYTES_PER_S)
        # Which bytes a hub id trains on: the copy the coordinator fetched, or the hub's.
        stored = hub and coord.call("GetJob", coordinator_pb2.GetJobRequest(
            job_id=reply.job_id)).job.model_digest
    job_id = reply.job_id
    print(job_id, flush=True)  # stdout holds the id alone: JOB=$(herd submit job.yaml)
    if hub:
        print(f"model {hub.pinned}: " + (f"the coordinator's copy {stored[:12]}, which it "
                                         "fetched from the hub" if stored else
                                         "the workers fetch it from the hub"), file=sys.stderr)
    elif digest:  # (README: "herd submit says which copy"; it said nothing for a folder)
        print(f"model {model}: the coordinator's stored copy {digest[:12]}, which the workers "
              "fetch from it", file=sys.stderr)
    if reply.warning:
        print(f"warning: {reply.warning}", file=sys.stderr)
    if args.watch:
        args.job = job_id
        return cmd_watch(args)
    print(f"submitted {job_id} to {coord.target}; next:\n"
          f"  herd watch {job_id}                 # follow it to the end\n"
          f"  herd logs {job_id} -f               # its rank's output\n"
          f"  herd pull {job_id} -o adapters/     # its adapter, once a checkpoint is stored",
          file=sys.stderr)
    return 0


def _model_config_json(cfg: JobConfig, hub) -> str:
    """The model's config.json as read here, sent with the job: the coordinator plans with it
    when it cannot read the model itself (a hub model cached only here, a gated one whose token
    is only here, a folder only the workers and this machine hold), so a job that cannot fit is
    refused at submit, as `herd plan` says. "" when it is not readable here either."""
    if hub is not None:
        return json.dumps(hub.config)
    try:
        return json.dumps(resolve_model_config(cfg.model))
    except (HerdError, ValueError):  # (a config.json that is not JSON: the workers say so)
        return ""


# --- cancel, rm ------------------------------------------------------------------------------

def cmd_cancel(args) -> int:
    with connect_from_args(args) as coord:
        job = coord.call("GetJob", coordinator_pb2.GetJobRequest(job_id=args.job)).job
        if job.state in FINAL:
            print(f"{args.job}: already {STATE[job.state]}; nothing to cancel")
            return 0
        state = coord.call("CancelJob", coordinator_pb2.CancelJobRequest(job_id=args.job),
                           timeout=30.0).state
    print(f"{args.job}: {STATE[state]}")
    return 0


def cmd_rm(args) -> int:
    """Each job on its own: one that cannot be removed (running, unknown) is reported and the
    rest are still removed; the exit code is the last refusal's."""
    code = 0
    with connect_from_args(args) as coord:
        for job_id in args.jobs:
            try:
                coord.call("DeleteJob", coordinator_pb2.DeleteJobRequest(job_id=job_id))
            except HerdError as e:
                if isinstance(e, PeerLostError):  # the coordinator is unreachable: stop
                    raise
                print(f"herd rm: {e}", file=sys.stderr)
                code = e.exit_code
                continue
            print(f"{job_id}: removed (record, events, checkpoints, logs)")
    return code


# --- pull ------------------------------------------------------------------------------------

def cmd_pull(args) -> int:
    from herd.adapter_card import convert_hint, read_card

    out: Path = args.output
    if args.step is not None and args.step < 1:  # 0 would ask for the latest (the wire's unset)
        raise NotFoundError(f"no checkpoint at step {args.step}: steps count from 1",
                            hint="`herd jobs` lists each job's checkpoints; omit --step for the "
                            "latest")
    made = not out.exists()
    try:
        with connect_from_args(args) as coord:
            header = coord.pull(args.job, args.step or 0, out, force=args.force)
    except HerdError:
        if made and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # nothing pulled: leave no empty folder behind
        raise
    size = sum(f.bytes for f in header.files)
    print(f"pulled step {header.step} of {args.job} ({size} bytes) into {out}")
    card = read_card(out)
    if card.get("quantized_on_load") and card.get("quantization"):
        # mlx-lm would apply it to the full-precision folder without a word.
        print(f"note: this adapter was trained on a {card['quantization']['bits']}-bit "
              f"quantization of {card.get('model')} made on load; load it on the same, e.g. "
              f"{convert_hint(card.get('model', 'MODEL'), card['quantization'])}, then "
              "mlx_lm.generate --model <that folder> --adapter-path "
              f"{out} (`herd generate` checks this)", file=sys.stderr)
    return 0


# --- watch -----------------------------------------------------------------------------------

def cmd_watch(args) -> int:
    with connect_from_args(args) as coord:
        state, message = watch(coord, args.job, plain=args.plain or not sys.stdout.isatty())
    if state == common_pb2.JOB_STATE_SUCCEEDED:
        return 0
    print(f"{args.job}: {STATE[state]}: {message}", file=sys.stderr)
    return EXIT_JOB_CANCELLED if state == common_pb2.JOB_STATE_CANCELLED else EXIT_JOB_FAILED


# --- dispatch --------------------------------------------------------------------------------

DESCRIPTIONS = {
    "submit": """\
Check a job config and its dataset here, upload the dataset to the coordinator and queue the job.

The job id goes to stdout alone (JOB=$(herd submit job.yaml)); what to run next goes to stderr.
Relative paths in the config resolve from the current folder, as in mlx_lm.lora; a local model
path must exist at the same path on every worker. A job that needs more workers than are verified
now is queued with a warning: it waits for them for up to the coordinator's --placement-timeout
(default 600 s), then fails. --watch follows it to the end (exit codes as herd watch).""",
    "watch": """\
Follow a job to its end: a progress line (iteration, loss, validation loss, tok/s over all
workers) on a terminal, one plain line per event otherwise (or with --plain). A job already ended
replays its history. Exit 0 when it succeeded, 10 when it failed, 11 when it was cancelled.""",
    "cancel": "Stop every rank of a job and mark it cancelled (a job that has ended is left as "
              "it is).",
    "pull": """\
Download a job's adapter (its latest checkpoint, or --step N): adapters.safetensors and
adapter_config.json, sha256-checked, ready for mlx_lm.generate --adapter-path. adapter_config.json
records the base model, its revision and its quantization. A file already in the folder is
replaced only with --force.""",
    "rm": """\
Delete jobs that have ended, on the coordinator: their record, events, stored checkpoints,
relayed logs and any dataset no other job uses. A queued or running job is refused: cancel it
first. (Workers delete old job folders themselves: herd worker --keep-attempts.)""",
}


def _parser(cmd: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"herd {cmd}", description=DESCRIPTIONS[cmd],
                                formatter_class=HelpFormatter)
    if cmd == "submit":
        p.add_argument("config", help="job YAML (an mlx_lm.lora config, plus optional "
                       "cluster: and quantize: sections)")
        p.add_argument("--model", help="use this model instead of the config's")
        p.add_argument("--data", help="use this dataset folder instead of the config's")
        p.add_argument("--name", default=None,
                       help="job name, the job id's prefix (default: the config's file name)")
        p.add_argument("--no-check", action="store_true", help="skip the local dataset check")
        p.add_argument("--resume-from", metavar="JOB[@STEP]", default=None,
                       help="start from that job's stored checkpoint (the latest, or STEP), "
                       "exactly: adapter, optimizer state, step and data position (to go on "
                       "after herd cancel, or with more iters); same model and adapter shape")
        p.add_argument("--watch", action="store_true",
                       help="follow the job until it ends, as herd watch (exit 0/10/11)")
        p.add_argument("--plain", action="store_true", help="with --watch: plain lines")
    elif cmd == "rm":
        p.add_argument("jobs", nargs="+", metavar="JOB", help="job ids (herd jobs lists them)")
    else:
        p.add_argument("job", metavar="JOB", help="a job id (herd jobs lists them)")
        if cmd == "watch":
            p.add_argument("--plain", action="store_true",
                           help="plain lines, no progress bar (the default when stdout is not a "
                           "terminal)")
        if cmd == "pull":
            p.add_argument("--step", type=int, default=None,
                           help="the checkpoint step (default: the latest)")
            p.add_argument("-o", "--output", type=Path, default=Path("adapters"),
                           help="folder to write the adapter into")
            p.add_argument("--force", action="store_true",
                           help="replace files already in the folder (refused otherwise)")
    add_connection_args(p)
    return p


COMMANDS = {"submit": cmd_submit, "watch": cmd_watch, "cancel": cmd_cancel, "pull": cmd_pull,
            "rm": cmd_rm}


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
