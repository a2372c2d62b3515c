"""``herd train`` and ``herd check``: one job, as one process or one rank of a group.

    herd train CONFIG [--adapter-path DIR] [--resume DIR] [--metrics-file PATH]
               [--stage-layers A:B,B:C]
    herd check CONFIG

``python -m worker.rank CONFIG [...]`` is ``herd train`` (the worker agent starts ranks so).
Under a launcher (``mlx.launch``, or MLX_RANK + MLX_HOSTFILE, or the herd worker agent) it is one
data-parallel rank, or one pipeline stage (worker/pipeline/main.py) when the job is cut into stages
(``--stage-layers``, or ``cluster.parallelism.pipeline`` > 1); otherwise a single process. On Linux
it restarts itself with OpenBLAS preloaded.

MLX is imported only once the command needs it (inside ``run``): ``herd check`` never loads it,
and ``herd train`` must choose its BLAS (worker/rank/runtime.py) before it loads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from herd import log
from herd.config import JobConfig, load_config
from herd.errors import ConfigError, HerdError
from herd.usage import HelpFormatter
from worker.rank.events import Done, EventLog, RankFailed, TestReport
from worker.rank.lifeline import tie_to_agent
from worker.rank.reporter import Reporter, skip_unused_reporters

DESCRIPTIONS = {
    "train": """\
Run one job on this machine, without a cluster: one process, or one rank under an MLX launcher
(mlx.launch -n 2 --backend ring $(which herd) train job.yaml: data parallel over MLX's ring).

Progress lines go to stdout (iteration, loss, tok/s, learning rate, peak memory; validation
lines at the iteration they ran at, as mlx-lm's). Adapters and checkpoints go to adapter_path
(mlx-lm's layout plus checkpoints/); --resume continues exactly where a checkpoint left off.
Relative paths in the config (model, data, adapter_path) resolve from the current folder, as in
mlx_lm.lora.""",
    "check": """\
Validate a job config and its dataset, and train nothing: every config error names the key and
the fix, every dataset error the file, the lines and how many are affected (exit 2 / 3). Relative
paths resolve from the current folder, as in mlx_lm.lora.""",
}


def _parser(cmd: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"herd {cmd}", description=DESCRIPTIONS[cmd],
                                formatter_class=HelpFormatter)
    p.add_argument("config",
                   help="job YAML (an mlx_lm.lora config, plus optional cluster:/quantize:)")
    p.add_argument("--model", help="override the config's model")
    p.add_argument("--data", help="override the config's data folder")
    if cmd == "train":
        p.add_argument("--adapter-path",
                       help="where adapters and checkpoints go (config: adapter_path)")
        p.add_argument("--resume", type=Path,
                       help="an adapter path or one of its checkpoint folders to resume from; "
                       "training continues writing into that adapter path unless "
                       "--adapter-path says otherwise")
        p.add_argument("--iters", type=int, help="override iters")
        p.add_argument("--metrics-file", type=Path, help="append progress as JSON lines here")
        p.add_argument("--quiet", action="store_true", help="no progress lines on stdout")
        p.add_argument("--stage-layers", help="pipeline cut into stages, e.g. 0:3,3:4 (blocks "
                       "[start, end) per stage); under a launcher it runs one pipeline stage")
    return p


def check(job: JobConfig):
    """Validate the files the job names before anything else is loaded: ConfigError or
    DatasetError."""
    from herd.dataset import check_job_dataset, load_tokenizer_for
    from herd.model_config import check_job_files

    check_job_files(job)
    return check_job_dataset(job, tokenizer=load_tokenizer_for(job.model))


def _resume(job: JobConfig, resume: Path | None, model, optimizer, logger):
    """The Progress to start from: a herd checkpoint restores everything (exact); an mlx-lm
    adapter (``--resume`` folder or file, or ``resume_adapter_file``) only its weights, as
    mlx_lm.lora does: the optimizer starts fresh and training starts at iteration 1."""
    from worker.rank.checkpoint import load_adapter_weights, load_checkpoint, resolve_resume
    from worker.rank.trainer import Progress

    folder = resolve_resume(resume) if resume is not None else None
    if folder is not None:
        state = load_checkpoint(folder, model, optimizer)
        if state.packing != job.cluster.packing:
            raise ConfigError(f"{folder} was trained with cluster.packing: {state.packing}",
                              hint="packing changes the batches: resume with the same setting")
        logger.info("resumed", checkpoint=str(folder), iteration=state.iteration)
        return Progress(iteration=state.iteration, trained_tokens=state.trained_tokens,
                        random_key=state.random_key,
                        shares=tuple(state.shares) if state.shares else None)
    source = resume if resume is not None else job.resume_adapter_file
    if source is not None:
        file, ignored = load_adapter_weights(Path(source), model)
        if ignored:
            logger.warning("adapter_tensors_ignored", adapter=str(file), count=len(ignored),
                           first=ignored[0], reason="not trained by this job (num_layers, "
                           "lora_parameters.keys): left out, as mlx_lm.lora leaves them")
        why = ("resume_adapter_file restores weights only, as in mlx_lm.lora (--resume DIR "
               "continues a herd checkpoint exactly)") if resume is None else (
               "an mlx-lm adapter holds no optimizer state or step")
        logger.warning("resumed_weights_only", adapter=str(file), optimizer="fresh",
                       iteration=0, reason=why)
    return Progress()


def _reporting(job: JobConfig, adapter_path: Path):
    """mlx-lm's reporting callbacks (``report_to``), or a ConfigError saying why they cannot
    start here (the package missing on this machine, no wandb login), not a traceback."""
    from mlx_lm.tuner.callbacks import get_reporting_callbacks

    try:
        return get_reporting_callbacks(job.report_to, project_name=job.project_name,
                                       log_dir=str(adapter_path), config=job.mlx_lm_dict())
    except Exception as e:  # wandb raises its own UsageError, swanlab ImportError, ...
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise ConfigError(
            f"report_to {job.report_to} could not start on this worker: "
            f"{type(e).__name__}: {first}",
            hint="install the package on every worker, and log in there (`wandb login`, or "
            "WANDB_API_KEY; WANDB_MODE=offline keeps the run local)") from None


def _test(job: JobConfig, model, train_set, valid_set, test_set, exchange, events, trained):
    """``test: true``: the test loss mlx_lm.lora prints, same value (same batches, drawn from
    the same numpy stream after training's draws), printed on rank 0 as mlx-lm prints it."""
    import math

    from worker.rank.trainer import LoopArgs, data_order, evaluate

    args = LoopArgs.from_job(job)
    order = data_order(train_set, valid_set, args, test_set, trains=trained,
                       test_batches=job.test_batches)
    loss = evaluate(model, test_set, args, exchange, order.test, num_batches=job.test_batches)
    events.append(TestReport(rank=exchange.rank, test_loss=loss, test_ppl=math.exp(loss)))
    if exchange.rank == 0:
        print(f"Test loss {loss:.3f}, Test ppl {math.exp(loss):.3f}.", flush=True)


def run(job: JobConfig, adapter_path: Path, resume: Path | None, events: EventLog, quiet: bool):
    """What ``mlx_lm.lora -c CONFIG`` does, as one rank: train (``job.trains()``), and evaluate
    the test set when ``test: true`` (after training, or of the adapter at ``adapter_path``)."""
    skip_unused_reporters(job.report_to)
    import mlx.core as mx
    import numpy as np
    from mlx_lm.tuner.datasets import CacheDataset, load_dataset
    from mlx_lm.tuner.utils import load_adapters

    from worker.exchange.group import open_exchange
    from worker.rank import runtime
    from worker.rank.heartbeat import Heartbeat, WatchedExchange
    from worker.rank.model import apply_adapters, build_optimizer, load_base
    from worker.rank.packing import enable_packing
    from worker.rank.trainer import LoopArgs, Progress, train

    warm_memory = runtime.reuse_freed_memory()  # 2 ranks on Linux: +14% tok/s
    # Forming the group is the first collective the agent's watchdog bounds: the accepting side
    # of MLX's ring waits forever for a peer that never dials (worker/rank/heartbeat.py).
    heartbeat = Heartbeat.from_env()
    heartbeat.enter("group")
    exchange = open_exchange(job.cluster)
    heartbeat.leave("group")
    trains = job.trains()
    progress, tic = Progress(), time.perf_counter()
    # Closed on every way out, a failed load included: a gRPC exchange's open links would
    # otherwise hold this process (and its ring neighbours) at exit.
    try:
        logger = log.get("herd.train", rank=exchange.rank)
        _check_world(job, exchange.size)  # a launcher that did not say its world size up front
        logger.info(
            "train_start", world=exchange.size, exchange=exchange.name,
            blas=runtime.blas_in_use(), wired_limit=runtime.set_wired_limit(), model=job.model,
            reuse_freed_memory=warm_memory, train=trains, test=job.test,
        )
        np.random.seed(job.seed)  # as mlx_lm.lora does before loading
        model, tokenizer = load_base(job)
        ns = argparse.Namespace(**job.mlx_lm_dict())
        ns.train = trains
        train_set, valid_set, test_set = load_dataset(ns, tokenizer)
        train_set = CacheDataset(train_set) if len(train_set) else None
        valid_set = CacheDataset(valid_set) if len(valid_set) else None
        test_set = CacheDataset(test_set) if job.test else None
        heartbeat.leave("ready")  # loaded: the load time is the first step time it measures
        exchange = WatchedExchange(exchange, heartbeat)
        if trains:
            apply_adapters(model, job)
            if job.cluster.packing:
                enable_packing(model, model.args.model_type)
            optimizer = build_optimizer(job)
            progress = _resume(job, resume, model, optimizer, logger)
            adapter_path.mkdir(parents=True, exist_ok=True)
            reporting = None
            if exchange.rank == 0:
                reporting = _reporting(job, adapter_path)
            reporter = Reporter(job, model, optimizer, adapter_path, exchange.rank,
                                exchange.size, events, quiet, reporting)
            progress = train(model, optimizer, train_set, valid_set, LoopArgs.from_job(job),
                             exchange, reporter, progress)
            reporter.close()
        elif job.adapter_path != "":  # as mlx-lm: an empty adapter_path tests the bare model
            load_adapters(model, str(adapter_path))
        if job.test:
            _test(job, model, train_set, valid_set, test_set, exchange, events, trains)
    finally:
        exchange.close()
        heartbeat.close()
    events.append(Done(rank=exchange.rank, iteration=progress.iteration,
                       seconds=time.perf_counter() - tic))
    logger.info("train_done", iteration=progress.iteration, adapter_path=str(adapter_path))
    mx.eval()
    return progress


def _check_model_here(model: str) -> None:
    """A local model path names a folder on the machine that trains (mlx-lm took a mistyped one
    for a hub repo id and failed after loading the data: an outside run)."""
    from herd.models.ref import parse

    ref = parse(model)
    if ref.is_local and not ref.path.expanduser().is_dir():
        raise ConfigError(f"model = {model!r}: no such folder "
                          f"({ref.path.expanduser().resolve()})",
                          hint="give the model folder's path, or a hub id (org/name)")


def main(argv: list[str]) -> int:
    cmd = argv[0]
    args = _parser(cmd).parse_args(argv[1:])
    if cmd == "train":
        # (OpenBLAS: a process started as `herd train` or `python -m worker.rank` re-exec'd itself
        # for it before importing this module, herd/cli/main.py and worker/rank/__main__.py.)
        tie_to_agent()  # a rank the agent started dies with it (nothing for `herd train` by hand)
    events = EventLog(getattr(args, "metrics_file", None))
    try:
        overrides = {"model": args.model, "data": args.data}
        if cmd == "train":
            overrides.update({"adapter_path": args.adapter_path, "iters": args.iters})
        # a resumed run writes on where it was, unless the config or a flag names a place
        job = load_config(args.config, overrides, {"adapter_path": _resumed_path(args.resume)}
                          if cmd == "train" else None)
        stage = _pipeline_stage(job, args) if cmd == "train" else None
        if cmd == "train" and stage is None:
            _check_world(job, _launcher_world())  # before any ring forms
        if cmd == "train":  # (a path with nothing behind it went to the hub as a repo id)
            _check_model_here(job.model)
        report = check(job)
        for w in report.warnings:
            print(f"warning: {w}", file=sys.stderr)
        if cmd == "check":
            from herd.model_config import missing_here

            if note := missing_here(job.model):
                print(f"warning: {note}; the dataset was checked without its tokenizer",
                      file=sys.stderr)
            for key in ("model", "data"):  # (mlx-lm's defaults fill a key the config lacks)
                if key not in job.model_fields_set:
                    print(f"warning: {key}: the config sets none: mlx-lm's default "
                          f"{getattr(job, key)!r} is used", file=sys.stderr)
            for name, s in report.splits.items():
                print(f"{name}: {s.records} records ({s.format}) in {s.path}")
            if not job.trains():
                print(f"evaluates only: {job.why_no_training()}")
            print("ok")
            return 0
        if cmd == "train":
            _probe_link(events)
        if stage is not None:
            from worker.pipeline.main import run_stage

            return run_stage(job, stage)
        run(job, Path(job.adapter_path), args.resume, events, args.quiet)
        return 0
    except HerdError as e:
        events.append(RankFailed(str(e)))
        print(f"herd {cmd}: {e}", file=sys.stderr)
        return e.exit_code
    except (ValueError, FileNotFoundError) as e:
        events.append(RankFailed(str(e)))
        print(f"herd {cmd}: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        from worker.exchange.group import lost_peer

        lost = lost_peer(e)
        if lost is None:
            raise
        events.append(RankFailed(str(lost)))
        print(f"herd {cmd}: {lost}", file=sys.stderr)
        return lost.exit_code


def _resumed_path(resume: Path | None) -> str | None:
    """The adapter path a ``--resume`` names: the folder itself, or the adapter path above one
    of its checkpoints (ADAPTER_PATH/checkpoints/0000100)."""
    if resume is not None and resume.parent.name == "checkpoints" and \
            (resume / "manifest.json").exists():
        return str(resume.parent.parent)
    return str(resume) if resume is not None else None


def _pipeline_stage(job: JobConfig, args):
    """The pipeline stage's options when this rank is one stage of a pipeline, else None.

    A rank is a stage when it runs under a launcher (a world of more than one) and the job is cut
    into stages: by ``--stage-layers`` (the coordinator's planned cut; the config may say
    ``parallelism: auto``) or by ``cluster.parallelism.pipeline``. Data-parallel pipelines are
    the world divided by the stages. One process (no launcher) always trains the whole model."""
    world = _launcher_world()
    spans = [s for s in (args.stage_layers or "").split(",") if s]
    stages = len(spans) or job.cluster.pipeline_stages()
    if world <= 1 or stages <= 1 or "MLX_RANK" not in os.environ:
        return None
    if world % stages:
        raise ConfigError(f"{world} ranks do not split into pipelines of {stages} stages",
                          hint="cluster.workers must be data x pipeline")
    from worker.pipeline.main import StageOptions

    return StageOptions(adapter_path=Path(job.adapter_path),
                        stage_layers=",".join(spans) if spans else None,
                        data_parallel=world // stages, resume=args.resume,
                        metrics_file=args.metrics_file)


def _probe_link(events: EventLog) -> None:
    """Under the herd service, before the ring forms: measure the link to the next rank
    (worker/exchange/probe.py) so `herd watch` shows the rate the data path really has. Not for
    JACCL (its peers' addresses are the control network's, not the RDMA link), not when
    HERD_LINK_PROBE=0."""
    peers = [p for p in os.environ.get("HERD_EXCHANGE_PEERS", "").split(",") if p]
    if (len(peers) < 2 or "HERD_JOB_ID" not in os.environ or "MLX_IBV_DEVICES" in os.environ
            or os.environ.get("HERD_LINK_PROBE") == "0"):
        return
    from worker.exchange.probe import probe_next
    from worker.rank.events import LinkProbe

    rank = int(os.environ.get("HERD_RANK") or os.environ.get("MLX_RANK") or 0)
    nxt = (rank + 1) % len(peers)
    try:
        rate = probe_next(rank, peers)
        events.append(LinkProbe(rank, nxt, peers[nxt], rate.bits_per_second, rate.seconds))
    except OSError as e:
        events.append(LinkProbe(rank, nxt, peers[nxt], error=str(e)))


def _launcher_world() -> int:
    """The world size the launcher's environment announces (1 when it says nothing)."""
    if world := int(os.environ.get("MLX_WORLD_SIZE") or 0):
        return world
    if os.environ.get("MLX_HOSTFILE"):  # mlx.launch names the hosts only
        return len(json.loads(Path(os.environ["MLX_HOSTFILE"]).read_text()))
    return len([p for p in os.environ.get("HERD_EXCHANGE_PEERS", "").split(",") if p]) or 1


def _check_world(job: JobConfig, world: int) -> None:
    """The global batch splits over the ranks: by cluster.shares (one per rank), else as evenly
    as it goes (4 over 3 ranks: 2, 1, 1), or evenly where the job needs it (herd.config
    ``uneven_split_why_not``)."""
    for key in ("shares", "max_shares"):
        given = getattr(job.cluster, key)
        if given is not None and world > 1 and len(given) != world:
            raise ConfigError(
                f"cluster.{key} {given} names {len(given)} ranks; the job runs {world}",
                hint=f"give one entry per data-parallel rank, or remove cluster.{key}")
    if job.cluster.shares is not None:
        return
    why = job.cluster.uneven_split_why_not()
    if job.batch_size < world or job.batch_size % world and why:
        raise ConfigError(
            f"batch_size = {job.batch_size} is not divisible by the {world} data-parallel ranks"
            + (f" ({why})" if job.batch_size >= world else ": every rank takes at least one "
               "example of each global batch"),
            hint=f"batch_size is the global batch; use a multiple of {world}",
        )
