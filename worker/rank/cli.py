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
from worker.rank.events import CheckpointSaved, Done, EventLog, RankFailed, TrainReport, ValReport
from worker.rank.runtime import reexec_with_openblas


def _parser(cmd: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"herd {cmd}", description=__doc__.splitlines()[0])
    p.add_argument("config",
                   help="job YAML (an mlx_lm.lora config, plus optional cluster:/quantize:)")
    p.add_argument("--model", help="override the config's model")
    p.add_argument("--data", help="override the config's data folder")
    if cmd == "train":
        p.add_argument("--adapter-path",
                       help="where adapters and checkpoints go (config: adapter_path)")
        p.add_argument("--resume", type=Path,
                       help="an adapter path or checkpoint folder to resume from")
        p.add_argument("--iters", type=int, help="override iters")
        p.add_argument("--metrics-file", type=Path, help="append progress as JSON lines here")
        p.add_argument("--quiet", action="store_true", help="no progress lines on stdout")
        p.add_argument("--stage-layers", help="pipeline cut into stages, e.g. 0:3,3:4 (blocks "
                       "[start, end) per stage); under a launcher it runs one pipeline stage")
    return p


def check(job: JobConfig):
    """Validate the dataset before anything else is loaded; raises DatasetError."""
    from herd.dataset import check_job_dataset, load_tokenizer_for

    return check_job_dataset(job, tokenizer=load_tokenizer_for(job.model))


class Reporter:
    """The trainer's callback: progress lines, events, checkpoints (rank 0 writes)."""

    def __init__(self, job: JobConfig, model, optimizer, adapter_path: Path, rank: int,
                 world: int, events: EventLog, quiet: bool):
        from worker.rank.model import adapter_config

        self.job, self.model, self.optimizer = job, model, optimizer
        self.adapter_path, self.rank, self.world = Path(adapter_path), rank, world
        self.adapter_config = adapter_config(job)
        self.events = events
        self.quiet = quiet or rank != 0

    def on_train_report(self, info: dict) -> None:
        self.events.append(TrainReport(rank=self.rank, **info))
        if not self.quiet:
            print(
                f"iter {info['iteration']:>6}/{self.job.iters}  loss {info['train_loss']:.4f}  "
                f"tok/s {info['tokens_per_second']:8.1f}  lr {info['learning_rate']:.2e}  "
                f"peak {info['peak_memory_gb']:.3f} GB",
                flush=True,
            )

    def on_val_report(self, info: dict) -> None:
        self.events.append(ValReport(rank=self.rank, **info))
        if not self.quiet:
            print(f"iter {info['iteration']:>6}/{self.job.iters}  val loss {info['val_loss']:.4f}",
                  flush=True)

    def on_save(self, progress) -> None:
        if self.rank != 0:
            return
        from worker.rank.checkpoint import TrainerState, save_checkpoint

        iteration = progress.iteration
        state = TrainerState(iteration, progress.trained_tokens, self.job.seed, self.world,
                             random_key=progress.random_key)
        path = save_checkpoint(self.adapter_path, self.model, self.optimizer,
                               self.adapter_config, state)
        self.events.append(CheckpointSaved(rank=self.rank, step=iteration, path=str(path)))
        if not self.quiet:
            print(f"iter {iteration:>6}/{self.job.iters}  saved {path}", flush=True)


def run(job: JobConfig, adapter_path: Path, resume: Path | None, events: EventLog, quiet: bool):
    import mlx.core as mx
    import numpy as np
    from mlx_lm.tuner.datasets import CacheDataset, load_dataset

    from worker.exchange.group import open_exchange
    from worker.rank import runtime
    from worker.rank.checkpoint import load_checkpoint, resolve_resume
    from worker.rank.model import apply_adapters, build_optimizer, load_base
    from worker.rank.trainer import LoopArgs, Progress, train

    warm_memory = runtime.reuse_freed_memory()  # 2 ranks on Linux: +14% tok/s
    exchange = open_exchange(job.cluster)
    # Closed on every way out, a failed load included: a gRPC exchange's open links would
    # otherwise hold this process (and its ring neighbours) at exit.
    try:
        logger = log.get("herd.train", rank=exchange.rank)
        _check_world(job, exchange.size)  # a launcher that did not say its world size up front
        logger.info(
            "train_start", world=exchange.size, exchange=exchange.name,
            blas=runtime.blas_in_use(), wired_limit=runtime.set_wired_limit(), model=job.model,
            reuse_freed_memory=warm_memory,
        )
        np.random.seed(job.seed)  # as mlx_lm.lora does before loading
        model, tokenizer = load_base(job)
        ns = argparse.Namespace(**job.mlx_lm_dict())
        ns.train = True
        train_set, valid_set, _ = load_dataset(ns, tokenizer)
        apply_adapters(model, job)
        optimizer = build_optimizer(job)
        progress = Progress()
        if resume is not None:
            folder = resolve_resume(resume)
            state = load_checkpoint(folder, model, optimizer)
            progress = Progress(iteration=state.iteration, trained_tokens=state.trained_tokens,
                                random_key=state.random_key)
            logger.info("resumed", checkpoint=str(folder), iteration=state.iteration)

        adapter_path.mkdir(parents=True, exist_ok=True)
        reporter = Reporter(job, model, optimizer, adapter_path, exchange.rank, exchange.size,
                            events, quiet)
        tic = time.perf_counter()
        progress = train(
            model, optimizer, CacheDataset(train_set),
            CacheDataset(valid_set) if len(valid_set) else None,
            LoopArgs.from_job(job), exchange, reporter, progress,
        )
    finally:
        exchange.close()
    events.append(Done(rank=exchange.rank, iteration=progress.iteration,
                       seconds=time.perf_counter() - tic))
    logger.info("train_done", iteration=progress.iteration, adapter_path=str(adapter_path))
    mx.eval()
    return progress


def main(argv: list[str]) -> int:
    cmd = argv[0]
    args = _parser(cmd).parse_args(argv[1:])
    if cmd == "train":
        reexec_with_openblas(argv[1:])  # before MLX is imported; returns if nothing would change
    events = EventLog(getattr(args, "metrics_file", None))
    try:
        overrides = {"model": args.model, "data": args.data}
        if cmd == "train":
            overrides.update({"adapter_path": args.adapter_path, "iters": args.iters})
        job = load_config(args.config, overrides)
        stage = _pipeline_stage(job, args) if cmd == "train" else None
        if cmd == "train" and stage is None:
            _check_world(job, _launcher_world())  # before any ring forms
        report = check(job)
        for w in report.warnings:
            print(f"warning: {w}", file=sys.stderr)
        if cmd == "check":
            for name, s in report.splits.items():
                print(f"{name}: {s.records} records ({s.format}) in {s.path}")
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
    """The global batch must split evenly over the data-parallel ranks."""
    if job.batch_size % world:
        raise ConfigError(
            f"batch_size = {job.batch_size} is not divisible by the {world} data-parallel ranks",
            hint=f"batch_size is the global batch; use a multiple of {world}",
        )
