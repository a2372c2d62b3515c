"""What a job may ask of this worker, decided by the worker's owner (``herd worker`` flags), and
the checks every StartRank passes before anything is written.

- ``trust_remote_code: true`` makes mlx-lm import Python named by the model folder's
  ``config.json`` inside the rank: refused unless the worker runs with ``--allow-remote-code``.
- ``model`` is a hub id, or a folder under one of the worker's model roots (``--model-root``).
  A relative path would resolve inside the job's own folder, next to the files the job shipped,
  so a path that names anything there is refused as well.
- A dataset the rank loads through ``datasets`` (no shipped folder) is a hub dataset by its id,
  with only the arguments that pick within it: a file loader (json, csv, ...) or a path would
  read this worker's own files, its keys included, and the dataset check quotes rows back.
- Every field of the request is checked as data: a job id of the coordinator's form, an attempt,
  a rank within its world, dataset names of data files, model file names of model files (a
  relative path, each part checked), a checkpoint step the job can reach, and a
  rank credential signed by the cluster CA for exactly this job attempt.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from herd.config import JobConfig
from herd.errors import ConfigError, PlacementError, ProtocolError
from herd.hf_dataset import check_cluster_source, hub_source
from herd.models.source import ModelSource
from herd.rpc import pki
from herd.rpc.names import (
    HUB_ID,
    check_job_id,
    check_name,
    check_path,
    check_sha,
    check_step,
)
from worker.agent.domain import RankSpec

MAX_WORLD = 4096
# What a rank's folder (its working directory) holds, made by worker/agent/rank_process.py: a
# relative model path starting with one of these would load what the job shipped (data/) or
# what the agent wrote for it.
JOB_FOLDER = frozenset({"data", "adapters", "resume", "tls", "config.yaml", "hostfile.json",
                        "metrics.jsonl", "rank.log"})


def default_model_roots() -> tuple[Path, ...]:
    """$HERD_HOME/models and the Hugging Face cache (where hub downloads land)."""
    hf = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub")
    return (pki.default_home() / "models", Path(hf))


# A Ray node's policy, set by its owner's `herd worker --ray` in the environment `ray start`
# passes to the node's rank actors (worker/agent/ray_actor.py).
MODEL_ROOTS_ENV = "HERD_MODEL_ROOTS"          # os.pathsep-separated folders
REMOTE_CODE_ENV = "HERD_ALLOW_REMOTE_CODE"    # "1": allow trust_remote_code


@dataclass(frozen=True)
class Policy:
    allow_remote_code: bool = False
    model_roots: tuple[Path, ...] = ()

    @classmethod
    def from_env(cls) -> Policy:
        """This node's policy from MODEL_ROOTS_ENV / REMOTE_CODE_ENV (default: the default
        model roots, no remote code)."""
        roots = os.environ.get(MODEL_ROOTS_ENV, "")
        return cls(os.environ.get(REMOTE_CODE_ENV) == "1",
                   tuple(Path(r) for r in roots.split(os.pathsep) if r) or default_model_roots())

    def reported_roots(self) -> tuple[str, ...]:
        """The model roots as the coordinator is told them (WorkerInfo.model_roots), so that a
        job this worker would refuse is refused at submit (coordinator/placement.py
        policy_refusal): each as given and resolved (``check_model`` holds the resolved path to
        the resolved roots; the coordinator only reads the path, which `herd submit` sends
        resolved). A job API path that reaches a root only through a link of the worker's own
        is the one case the coordinator refuses and this check would run: name it resolved."""
        forms = (f(r.expanduser()) for r in self.model_roots for f in (Path.absolute, Path.resolve))
        return tuple(dict.fromkeys(map(str, forms)))

    def check_job(self, cfg: JobConfig, job_dir: Path, worker_id: str,
                  source: ModelSource | None = None, shipped_data: bool = True,
                  shipped_resume: bool = False) -> None:
        """``source``: where the model comes from. A stored model's files arrive by digest from
        the coordinator's store (data files only: herd/models/manifest.py is_model_file, their
        names checked by check_spec), a pinned hub model from the hub: neither is a path here,
        so only a local folder is held to the model roots. ``shipped_data``: the job carries its
        data folder's files; else its dataset is a hub dataset (``check_dataset``).
        ``shipped_resume``: the job carries its resume_adapter_file, which is never read from
        this worker's own files (another job's adapter, say)."""
        self.check_dataset(cfg, job_dir, shipped_data)
        if cfg.resume_adapter_file and not shipped_resume:
            raise ConfigError(f"resume_adapter_file {cfg.resume_adapter_file} was not sent with "
                              "the job", hint="submit it with `herd submit`, which sends it")
        if cfg.trust_remote_code and not self.allow_remote_code:
            raise PlacementError(
                f"the job sets trust_remote_code: true, and worker {worker_id} runs no code "
                "from jobs", hint="remove trust_remote_code, or start the worker with "
                "--allow-remote-code if its owner trusts every job submitter and model")
        source = source or ModelSource()
        if source.digest:
            return
        if source.hub_repo:
            if ".." in source.hub_repo or not HUB_ID.match(source.hub_repo):
                raise PlacementError(f"refusing hub repo {source.hub_repo[:80]!r}")
            return
        self.check_model(cfg.model, job_dir, worker_id)

    @staticmethod
    def check_dataset(cfg: JobConfig, job_dir: Path, shipped_data: bool) -> None:
        """A Hugging Face dataset a rank would load here: a hub dataset by its id, never a file
        loader, a path or an argument that reaches past it (herd/hf_dataset.py
        check_cluster_source: the coordinator checked it at submit), nor a name that the rank's
        folder holds (``datasets`` would load that folder)."""
        check_cluster_source(cfg, shipped_data)
        if cfg.hf_dataset or not shipped_data:
            first = hub_source(cfg).split("/")[0]
            if first in JOB_FOLDER or (job_dir / first).exists():
                raise ConfigError(f"dataset {hub_source(cfg)!r} names a file of the job's own "
                                  "folder on the worker", hint="name a hub dataset id")

    def check_model(self, model: str, job_dir: Path, worker_id: str) -> None:
        path = Path(model).expanduser()
        if not path.is_absolute():
            if ".." in model or not HUB_ID.match(model):
                raise PlacementError(f"model {model!r} is neither a hub id nor an absolute path",
                                     hint="name a hub id (org/name) or a folder under one of "
                                     f"worker {worker_id}'s model roots")
            first = model.split("/")[0]
            if first in JOB_FOLDER or (job_dir / first).exists():
                raise PlacementError(f"model {model!r} names a file the job shipped itself",
                                     hint="name a hub id or a folder under a model root")
            return
        real = path.resolve()
        roots = [r.expanduser().resolve() for r in self.model_roots]
        if not any(real == r or real.is_relative_to(r) for r in roots):
            shown = ", ".join(map(str, roots)) or "none"
            raise PlacementError(
                f"model path {model} is outside worker {worker_id}'s model roots ({shown})",
                hint="put the model under a model root, or start the worker with "
                "--model-root FOLDER")


def check_spec(spec: RankSpec, ca_pem: bytes) -> None:
    """A StartRank request's fields, as data (ProtocolError / AuthError)."""
    check_job_id(spec.job_id)
    if not 1 <= spec.attempt <= 10**6:
        raise ProtocolError(f"refusing attempt {spec.attempt}", hint="attempts count from 1")
    if not 0 <= spec.rank < spec.world_size <= MAX_WORLD:
        raise ProtocolError(f"refusing rank {spec.rank} of {spec.world_size}")
    for peers in (spec.ring_hosts, spec.exchange_peers):
        if peers and len(peers) != spec.world_size:
            raise ProtocolError(f"{len(peers)} peers for a world of {spec.world_size}")
    if not re.match(r"^[A-Za-z0-9_.:\[\]-]+:\d{1,5}$", spec.coordinator or ""):
        raise ProtocolError(f"refusing coordinator address {spec.coordinator[:80]!r}")
    for f in spec.dataset:
        check_name(f.name, "dataset")
        check_sha(f.sha256)
    for f in spec.model.files:
        check_path(f.name, "model")
        check_sha(f.sha256)
    if spec.resume_adapter is not None:
        check_name(spec.resume_adapter.name, "checkpoint")
        check_sha(spec.resume_adapter.sha256)
    if spec.resume_step:
        check_step(spec.resume_step, spec.config.iters)
    pki.check_rank_credential(ca_pem, spec.rank_cert_pem, spec.rank_key_pem,
                              pki.rank_scope(spec.job_id, spec.attempt))
