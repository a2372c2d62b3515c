"""A model's ``config.json`` and revision, for a local folder or a hub id, without the weights.

``herd plan`` on a laptop needs only the config (the planner is arithmetic on its shapes); an
adapter records the revision it was trained on. A hub id is read from the local Hugging Face
cache (``$HF_HOME``, as ``huggingface_hub`` finds it); when the cache lacks it, that one small
file is fetched (never with ``HF_HUB_OFFLINE=1``), never the weights. The model store (DESIGN.md
"Models onto the workers") plugs in at ``resolve_model_config``, the one seam.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from herd.errors import ConfigError, HerdError
from herd.lora_keys import check_lora_keys
from herd.stage_cut import check_stages

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SNAPSHOT = re.compile(r"/snapshots/([0-9a-f]{40})(/|$)")


def is_hub_id(model: str) -> bool:
    """``org/name`` that is not a local path."""
    return looks_like_hub_id(model) and not Path(model).expanduser().exists()


def looks_like_hub_id(model: str) -> bool:
    """``org/name``, optionally ``@revision``, whatever this machine's disk holds."""
    return bool(_HUB_ID.match(model.split("@", 1)[0]))


def missing_here(model: str) -> str | None:
    """A warning when ``model`` is a path with no folder behind it here. Allowed (the workers
    may hold the model at that path, a laptop need not), but said before a job fails on them."""
    from herd.models.ref import parse

    ref = parse(model)
    if ref.is_local and not ref.path.expanduser().is_dir():
        return (f"model {model} is not a folder here ({ref.path.expanduser().resolve()}): every "
                "worker must hold it at that path, or the job fails as it starts there")
    return None


def _cached(model: str, revision: str | None) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(model, "config.json", revision=revision)
    return Path(found) if isinstance(found, str) else None


def _fetch(model: str, revision: str | None) -> Path:
    """config.json alone from the hub, into the cache (ConfigError when offline or refused)."""
    from huggingface_hub import constants, hf_hub_download

    where = "the local Hugging Face cache"
    if not constants.HF_HUB_OFFLINE:
        try:
            return Path(hf_hub_download(model, "config.json", revision=revision))
        except Exception as e:  # any hub failure (network, auth, no such repo): one message
            where += f" nor on the hub ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    from herd.models.ref import _cached_revisions

    if revision and (cached := _cached_revisions(model)) is not None:
        # the repository is there, the revision is not (plan said "no config.json for this hub
        # id" and hinted a download that would not help: an outside run)
        raise ConfigError(
            f"{model} has no revision {revision!r} with config.json in {where} (cached: "
            f"{', '.join(cached) or 'nothing'})",
            hint="check the revision (a branch, a tag or a commit), or fetch it: "
            f"`hf download {model} config.json --revision {revision}`")
    raise ConfigError(
        f"{model}: no config.json for this hub id in {where}",
        hint=f"fetch just that file (`hf download {model} config.json`), or pass --model with a "
        "local folder (config.json alone is enough to plan)")


def resolve_model_config(model: str, revision: str | None = None) -> dict:
    """The model's config.json as a dict: a local folder's, or a hub id's from the local cache.
    ConfigError naming what was looked for, and how to get it, when there is none."""
    folder = Path(model).expanduser()
    if folder.is_dir():
        path = folder / "config.json"
        if not path.is_file():
            raise ConfigError(f"model folder {folder} has no config.json",
                              hint="a model folder holds config.json, *.safetensors and a "
                              "tokenizer (mlx_lm.convert or the hub writes them)")
        return json.loads(path.read_text())
    if folder.exists() or model.startswith(("/", "./", "../", "~")):
        raise ConfigError(f"model {model} is not a folder here (looked for {folder.resolve()})",
                          hint="paths resolve from the current folder, as in mlx_lm.lora")
    from herd.models.ref import parse  # the model store's reading of org/name[@revision]

    ref = parse(model)
    revision = revision or ref.revision
    path = _cached(ref.repo_id, revision) or _fetch(ref.repo_id, revision)
    return json.loads(path.read_text())


def model_revision(model: str) -> str | None:
    """The commit a model resolves to when it is known here: a hub id's cached snapshot, or a
    folder inside a Hugging Face cache's snapshots/; None for a plain local folder."""
    if m := _SNAPSHOT.search(str(Path(model).expanduser().resolve())):
        return m.group(1)
    repo, _, pinned = model.partition("@")  # org/name@revision (the model store pins a commit)
    if pinned and is_hub_id(repo):
        return pinned
    if is_hub_id(model) and (path := _cached(model, None)) is not None:
        if m := _SNAPSHOT.search(str(path)):
            return m.group(1)
    return None


def snapshot_folder(model: str, download: bool = False) -> tuple[str, str] | None:
    """For a pinned hub reference, ``org/name@commit`` (a hub job's base as the model store
    records it, which no mlx-lm tool reads: they have no --revision), ``(repo, folder)``: that
    commit's snapshot folder in the local cache, fetched when ``download`` and online. None when
    ``model`` is not one; whatever huggingface_hub raises when the snapshot is not to be had."""
    repo, _, revision = model.partition("@")
    if not revision or not is_hub_id(repo):
        return None
    from huggingface_hub import snapshot_download

    return repo, snapshot_download(repo, revision=revision, local_files_only=not download)


RESUME_HINT = ("an adapter .safetensors file or a folder holding adapters.safetensors; paths "
               "resolve from the current folder")


def resume_weights_file(cfg) -> Path | None:
    """The file ``resume_adapter_file`` names (a folder: its adapters.safetensors, as the rank
    loads it), checked to be a readable safetensors file; ConfigError naming it if not."""
    if not cfg.resume_adapter_file:
        return None
    from safetensors import safe_open

    resume = Path(cfg.resume_adapter_file).expanduser()
    file = resume / "adapters.safetensors" if resume.is_dir() else resume
    if not file.is_file():
        raise ConfigError(f"resume_adapter_file {cfg.resume_adapter_file} does not exist "
                          f"(looked for {file.resolve()})", hint=RESUME_HINT)
    try:
        with safe_open(str(file), framework="numpy") as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError, OSError, ...
        raise ConfigError(f"resume_adapter_file {file} is not a safetensors file: {e}",
                          hint=RESUME_HINT) from None
    # An adapter of another LoRA rank fails every rank after placement: said here instead.
    # (lora_a is (in, rank) and lora_b (rank, out), whatever the base's quantization.)
    rank = cfg.lora_parameters.rank
    for name, shape in sorted(shapes.items()):
        if cfg.fine_tune_type != "full" and len(shape) == 2 and (
                name.endswith("lora_a") and shape[1] != rank
                or name.endswith("lora_b") and shape[0] != rank):
            raise ConfigError(
                f"resume_adapter_file {cfg.resume_adapter_file} was trained with LoRA rank "
                f"{shape[1] if name.endswith('lora_a') else shape[0]} ({name}: shape "
                f"{tuple(shape)}); this job's lora_parameters.rank is {rank}",
                hint="resume with the lora_parameters (rank, keys) of the run that wrote it")
    return file


def full_of_quantized(model: str) -> ConfigError:
    """A full fine-tune of a model stored quantized (refused here, and by the rank that loads
    it: mlx would fail mid-step, as a quantized weight has no gradient)."""
    return ConfigError(f"fine_tune_type: full cannot train {model}: it is quantized, and a "
                       "quantized weight has no gradient",
                       hint="use fine_tune_type: lora or dora (QLoRA), or a full-precision model")


def too_many_layers(num_layers: int, model: str, blocks: int) -> ConfigError:
    """``num_layers`` beyond the model's blocks (mlx-lm fails on it too, in the rank)."""
    return ConfigError(f"num_layers = {num_layers}, but {model} has only {blocks} layers",
                       hint=f"use num_layers: -1 (all) or a number up to {blocks} (mlx-lm's "
                       "default is 16)")


def check_job_files(cfg) -> None:
    """What a job config names besides its dataset, checked where it is read (``herd check``,
    ``herd submit``, each rank) rather than failing a rank after placement: the adapter to resume
    from exists and reads as safetensors, and a full fine-tune is not of an already quantized
    model. ConfigError if not."""
    resume_weights_file(cfg)
    try:
        model = resolve_model_config(cfg.model)
    except HerdError:
        return  # no config.json here: the model's own checks say so, where it is
    check_against_model(cfg, model)


def check_model_folder(model: str) -> None:
    """A local model folder holds every shard its index names and a tokenizer (ConfigError if
    not). Where a job is submitted: a pipeline rank's folder holds its own shards only."""
    folder = Path(model).expanduser()
    if not folder.is_dir():
        return  # a hub id: the model store checks what it stores
    from herd.models.manifest import check_complete
    from herd.models.ref import INDEX

    index = folder / INDEX
    check_complete({p.name for p in folder.iterdir()},
                   json.loads(index.read_text()) if index.is_file() else None, str(folder))


def check_against_model(cfg, model: dict) -> None:
    """A job config against its model's config.json (also `herd plan`'s, so plan and submit
    refuse the same configs): ConfigError for layers, stages or a full fine-tune it cannot
    have."""
    model = {**model.get("text_config", {}), **model}
    blocks = model.get("num_hidden_layers")
    # (a job that only tests loads its adapter's own layout, as mlx-lm does: num_layers unused)
    if isinstance(blocks, int) and cfg.num_layers > blocks and cfg.trains():
        raise too_many_layers(cfg.num_layers, cfg.model, blocks)
    if cfg.fine_tune_type == "full" and cfg.quantize is None and "quantization" in model:
        raise full_of_quantized(cfg.model)
    check_stages(model, cfg)
    check_lora_keys(cfg, model)
