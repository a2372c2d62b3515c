"""What an adapter says about the base it was trained on, and the check made when loading it.

``adapter_config.json`` is mlx-lm's (``mlx_lm.generate --adapter-path`` reads it) plus one key,
``base_model``: the model reference, its revision when known, and the quantization of the
weights the adapter was trained against (``quantized_on_load``: herd made it from an unquantized
folder, ``quantize:`` in the job). Paths of the run itself (the dataset, the output folder: a
worker's job folder) are left out. mlx-lm ignores the extra key and would apply a QLoRA adapter to
a full-precision base without a word; ``check_base`` is that word, said by herd's own loaders
(``herd generate``) and by ``herd pull``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from herd.errors import ConfigError
from herd.model_config import model_revision, resolve_model_config, snapshot_folder

ADAPTER_CONFIG = "adapter_config.json"
# Training-run keys that are paths on the machine that ran it: not part of the adapter.
RUN_PATHS = ("data", "adapter_path", "resume_adapter_file", "config")
# Set by the agent for its rank: the job's model reference, when the rank loads a local copy.
BASE_MODEL_ENV = "HERD_BASE_MODEL"


def _quantization(q: Any) -> dict | None:
    if not isinstance(q, dict) or "bits" not in q:
        return None
    return {"bits": int(q["bits"]), "group_size": int(q.get("group_size", 64))}


def base_model(model: str, quantize: dict | None, local: str | None = None) -> dict:
    """The ``base_model`` entry for a job on ``model`` (``quantize``: the job's quantize: section,
    None when it has none; ``local``: where this machine has the model, when that is not the
    reference a user knows, such as a worker's model cache)."""
    on_load = _quantization(quantize)
    stored = None
    if on_load is None:
        try:
            stored = _quantization(resolve_model_config(local or model).get("quantization"))
        except ConfigError:  # not readable here: nothing known about its quantization
            stored = None
    return {"model": model, "revision": model_revision(model),
            "quantization": on_load or stored, "quantized_on_load": on_load is not None}


def read_card(adapter_dir: Path) -> dict:
    """The adapter's ``base_model`` entry ({} for an adapter from elsewhere)."""
    try:
        config = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError):
        return {}
    return config.get("base_model") or {}


def _describe(q: dict | None) -> str:
    return f"{q['bits']}-bit (group size {q['group_size']})" if q else "unquantized"


def convert_hint(model: str, q: dict) -> str:
    """The mlx_lm.convert command that quantizes ``model`` as ``q`` says. A hub job's base is
    recorded as org/name@commit, which mlx_lm.convert cannot read (it has no --revision: an
    outside run): that commit's folder in the local cache, else the repo at its current one."""
    repo, _, revision = model.partition("@")
    source, note = model, ""
    try:
        if found := snapshot_folder(model):
            source = found[1]
    except Exception:  # not cached here: the repo's current revision, said
        source, note = repo, f" (its current revision; the adapter's base is {revision})"
    return (f"mlx_lm.convert --hf-path {source} -q --q-bits {q['bits']} --q-group-size "
            f"{q['group_size']} --mlx-path {Path(repo).name}-{q['bits']}bit{note}")


def check_base(adapter_dir: Path, model: str) -> str | None:
    """A warning when ``model`` is not quantized as the adapter's base was; None when it is, or
    when either side is unknown."""
    card = read_card(adapter_dir)
    if "quantization" not in card:
        return None
    want = card["quantization"]
    try:
        have = _quantization(resolve_model_config(model).get("quantization"))
    except ConfigError:
        return None
    if want == have:
        return None
    trained_on = card.get("model") or "its base"
    text = (f"this adapter was trained on a {_describe(want)} base ({trained_on}); {model} is "
            f"{_describe(have)}, so the adapter would act on weights it was not trained with")
    if want and not have:
        text += f". Quantize the base the same way first: {convert_hint(model, want)}"
    return text
