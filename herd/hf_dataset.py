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
from herd.errors import DatasetError

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
