"""The dataset check for Hugging Face datasets: what mlx-lm loads through ``datasets``.

mlx-lm reads a Hugging Face dataset in two cases (``mlx_lm/tuner/datasets.py`` load_dataset):
``hf_dataset`` (one entry or a list, each loaded split by split with
``datasets.load_dataset(path, split=..., **config)`` and its own feature keys; ``data`` is then
ignored), or ``data`` that is no local path (``datasets.load_dataset(data)``, whose ``train``,
``valid`` and ``test`` splits are used, with the config's feature keys). herd loads the same
splits the same way, before training, and checks their records as it checks a local folder
(herd/dataset.py): errors for what mlx-lm would fail on, warnings for the rest, each naming the
dataset, split and row.

``datasets`` is optional (``pip install 'herd[hf]'``): imported only here, only when a job names a
Hugging Face dataset. Loading uses the machine's Hugging Face cache and network as ``datasets``
does (``HF_HUB_OFFLINE=1``: the cache and local files only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from herd import log
from herd.dataset import (
    FORMATS_HELP,
    DatasetReport,
    Features,
    FileCheck,
    SplitReport,
    check_records,
    split_summary,
)
from herd.errors import ConfigError, DatasetError
from herd.rpc.names import HUB_ID

logger = log.get(__name__)


def _datasets():
    try:
        import datasets
    except ImportError:
        raise DatasetError(
            "the job reads a Hugging Face dataset, but the `datasets` package is not installed",
            hint="pip install datasets (or herd[hf]), as mlx-lm needs it for hf_dataset too",
        ) from None
    return datasets


def _load(source: str, split: str | None, kwargs: dict[str, Any]):
    datasets = _datasets()
    try:
        return datasets.load_dataset(source, split=split, **kwargs)
    except Exception as e:  # noqa: BLE001 - any loader failure is this dataset's problem
        where = f"{source}" + (f" split {split!r}" if split else "")
        raise DatasetError(
            f"Hugging Face dataset {where} could not be loaded: {type(e).__name__}: {e}",
            hint="check the path/hub id, config and split names; without a network the "
            "dataset must be in the Hugging Face cache or in local files",
        ) from None


def _splits(cfg: Any, trains: bool) -> list[tuple[str, str, Any, Features]]:
    """(split name, shown name, rows, features) of every split mlx-lm would read."""
    test = bool(getattr(cfg, "test", False))
    out = []
    entries = cfg.hf_datasets() if getattr(cfg, "hf_dataset", None) else []
    for d in entries:
        feats = Features(d.text_feature, d.prompt_feature, d.completion_feature, d.chat_feature)
        wanted = ([("train", d.train_split), ("valid", d.valid_split)] if trains else []) + (
            [("test", d.test_split)] if test else [])
        for name, split in wanted:
            out.append((name, f"{d.path}[{split}]", _load(d.path, split, d.config), feats))
    if not entries:  # data: a hub id
        feats = Features(cfg.text_feature, cfg.prompt_feature, cfg.completion_feature,
                         cfg.chat_feature)
        try:
            whole = _load(cfg.data, None, {})
        except DatasetError as e:  # it may well have been meant as a folder: say where we looked
            raise DatasetError(
                f"dataset {cfg.data} is not a local folder (looked for "
                f"{Path(cfg.data).expanduser().resolve()}), nor a loadable Hugging Face "
                f"dataset: {e.message}",
                hint="relative paths resolve from the current folder, as in mlx_lm.lora; "
                "a local folder holds train.jsonl and valid.jsonl") from None
        wanted = {"train": trains, "valid": False, "test": test}
        for name in ("train", "valid", "test"):
            if name in whole:
                out.append((name, f"{cfg.data}[{name}]", whole[name], feats))
            elif wanted[name]:
                raise DatasetError(f"Hugging Face dataset {cfg.data} has no {name!r} split "
                                   f"(it has {sorted(whole)})",
                                   hint=f"mlx-lm reads the splits named train, valid, test; "
                                   f"use hf_dataset with {name}_split to pick another")
    return out


def check_hub_dataset(cfg: Any, tokenizer: Any, trains: bool) -> DatasetReport:
    """Load and check the Hugging Face splits a job trains and tests on; one DatasetError with
    every problem, as for a local folder."""
    problems: list[str] = []
    warnings: list[str] = []
    splits: dict[str, SplitReport] = {}
    records_of: dict[str, int] = {}
    for name, shown, rows, feats in _splits(cfg, trains):
        fc = FileCheck(shown, unit="row")
        numbered = ((i, dict(row)) for i, row in enumerate(rows))
        fmt, records, lengths = check_records(fc, numbered, feats, tokenizer, cfg.mask_prompt)
        problems += fc.messages()
        warnings += fc.warnings()
        records_of[name] = records_of.get(name, 0) + records
        report, p, w = split_summary(shown, name, shown, fmt, records, lengths, tokenizer,
                                     max_seq_length=cfg.max_seq_length, batch_size=None,
                                     batched=False, unit="row")
        splits[shown] = report
        problems, warnings = problems + p, warnings + w
    # A list of hf_dataset entries is concatenated split by split: batches span the entries.
    for name, n in records_of.items():
        if n and n < cfg.batch_size and (name != "valid" or trains):
            problems.append(f"{name}: {n} records, fewer than batch_size {cfg.batch_size}. "
                            f"Fix: add records or lower batch_size to at most {n}")
    if trains and not records_of.get("train"):
        problems.append("no training records: the train split is empty")
    if problems:
        source = getattr(cfg, "hf_dataset", None) and "hf_dataset" or cfg.data
        raise DatasetError(
            f"dataset {source} has {len(problems)} problem(s):\n  " + "\n  ".join(problems),
            hint=FORMATS_HELP,
        )
    logger.info("dataset_checked", hub=True, warnings=len(warnings),
                **{f"{k}_records": v for k, v in records_of.items()})
    return DatasetReport(splits=splits, warnings=warnings, sha256={})


# --- what a cluster job may name ---------------------------------------------------------------
#
# `herd train` reads whatever the user's own machine holds. A cluster job's Hugging Face dataset
# is loaded on the workers, by the submitter's config: a loader that reads files (csv, json, ...)
# or a path would read the worker's own files (its keys included), and the dataset check quotes
# rows back into the job's messages. So a cluster job names hub datasets only, with the
# load_dataset arguments that pick within one (local files go as `data:`, which herd ships).
# The loaders `datasets` packages (5.2), for when it is not installed where this is checked.
FILE_LOADERS = frozenset({
    "arrow", "audiofolder", "conll", "csv", "eval", "fasta", "fastq", "genbank", "harbor",
    "hdf5", "iceberg", "imagefolder", "json", "lance", "meshfolder", "mmcif", "niftifolder",
    "pandas", "parquet", "pdb", "pdffolder", "text", "tsfile", "videofolder", "vortex",
    "webdataset", "xml", "sql", "spark", "generator", "cache", "folder_based_builder"})
# load_dataset arguments that choose within a hub dataset; any other (cache_dir, storage_options,
# trust_remote_code, token, download_config, ...) reaches past the dataset.
HUB_ARGS = frozenset({"name", "revision", "data_dir", "data_files"})


def _file_loaders() -> frozenset[str]:
    try:
        from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES
    except ImportError:
        return FILE_LOADERS
    return FILE_LOADERS | frozenset(_PACKAGED_DATASETS_MODULES)


def _hub_id(source: str, what: str) -> None:
    if ".." in source or not HUB_ID.match(source) or source in _file_loaders():
        raise ConfigError(
            f"{what} {source!r} is not a Hugging Face hub dataset id: a cluster job loads hub "
            "datasets only (a loader such as json or csv, or a path, would read files on the "
            "workers)", hint="ship local files as `data: FOLDER` (train.jsonl, valid.jsonl), "
            "or name the dataset's hub id (org/name)")


def _in_repo(value: Any, what: str) -> None:
    """data_files / data_dir: paths inside the dataset's repo, never a URL or a path here."""
    values = (list(value.values()) if isinstance(value, dict) else
              value if isinstance(value, list) else [value])
    for v in values:
        if isinstance(v, (list, dict)):
            _in_repo(v, what)
            continue
        s = str(v)
        if s.startswith(("/", "~", "\\")) or "://" in s or ".." in s.split("/") or ":" in s:
            raise ConfigError(f"{what} {s!r} is not a path inside the hub dataset's repo",
                              hint="a cluster job's data_files and data_dir name files of the "
                              "hub dataset (e.g. data/train-*.parquet); ship local files as "
                              "`data: FOLDER`")


def check_cluster_source(cfg: Any, shipped: bool) -> None:
    """ConfigError unless the job's Hugging Face dataset, if it reads one, is a hub dataset
    named by its id with only HUB_ARGS (checked at submit by the coordinator, and again by each
    worker before it starts a rank). ``shipped``: the job carries its data folder's files (then
    ``data`` is that folder); a job with neither those nor hf_dataset names a hub id as
    ``data``, never a path on the workers."""
    if getattr(cfg, "hf_dataset", None):
        for i, d in enumerate(cfg.hf_datasets()):
            where = f"hf_dataset[{i}]" if isinstance(cfg.hf_dataset, list) else "hf_dataset"
            _hub_id(d.path, f"{where}.path")
            extra = sorted(set(d.config) - HUB_ARGS)
            if extra:
                raise ConfigError(f"{where}.config: {', '.join(extra)} not allowed in a cluster "
                                  "job", hint=f"a cluster job's load_dataset arguments are "
                                  f"{', '.join(sorted(HUB_ARGS))}")
            for key in ("data_files", "data_dir"):
                if key in d.config:
                    _in_repo(d.config[key], f"{where}.config.{key}")
    elif not shipped:
        _hub_id(str(cfg.data), "data")


def hub_source(cfg: Any) -> str | None:
    """The hub dataset id a job loads first (hf_dataset's first path, else ``data``)."""
    hf = cfg.hf_datasets() if getattr(cfg, "hf_dataset", None) else []
    return hf[0].path if hf else str(cfg.data)
