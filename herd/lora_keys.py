"""``lora_parameters.keys`` against the model's own module names, from its config.json alone.

mlx-lm adapts the modules of each trained block whose name is in ``keys`` (and any of the whole
model's), silently skipping names that match nothing: a typo (``self_attn.q_prj``, ``q_proj``
without its ``self_attn.``) trained nothing in that place, and a list with no match at all failed
the rank at its first step with MLX's "[grad] Must specify at least one argument". The names come
from the model class mlx-lm would build, built lazily (MLX allocates nothing until it evaluates),
so ``herd check`` / ``herd submit`` can say it before any worker is touched.
"""

from __future__ import annotations

import json
from functools import lru_cache

from herd.errors import ConfigError

MAX_LAYERS = 512  # more blocks than any model has; building them costs ~15 ms each


@lru_cache(maxsize=8)
def _module_names(config_json: str) -> tuple[frozenset[str], tuple[str, ...]] | None:
    """Every name a LoRA key can match in this model (each block's modules, the model's own),
    and the blocks' modules mlx-lm can adapt (what to suggest); None when mlx-lm cannot build
    the model here (then nothing is checked)."""
    try:
        import mlx.nn as nn
        from mlx_lm.utils import _get_classes

        config = json.loads(config_json)
        model_class, args_class = _get_classes(config)
        model = model_class(args_class.from_dict(config))
        blocks = [dict(block.named_modules()) for block in model.layers]
        names = {k for b in blocks for k in b} | {k for k, _ in model.named_modules()}
        adaptable = sorted({k for b in blocks for k, m in b.items()
                            if hasattr(m, "to_lora") or isinstance(m, (nn.Linear, nn.Embedding))
                            or type(m).__name__.endswith(("SwitchLinear", "QuantizedLinear"))})
        return frozenset(names), tuple(adaptable)
    except Exception:  # (an architecture this mlx-lm lacks, an odd config: the rank will say)
        return None


def _suggest(key: str, adaptable: tuple[str, ...]) -> str | None:
    import difflib

    within = [n for n in adaptable if n.endswith("." + key)]  # q_proj -> self_attn.q_proj
    close = within or difflib.get_close_matches(key, adaptable, n=1)
    return close[0] if close else None


def check_lora_keys(cfg, model_config: dict) -> None:
    """ConfigError naming each key of ``lora_parameters.keys`` that no module of the model has."""
    keys = cfg.lora_parameters.keys
    if not keys or cfg.fine_tune_type == "full":
        return
    layers = {**model_config.get("text_config", {}), **model_config}.get("num_hidden_layers")
    if not isinstance(layers, int) or not 0 < layers <= MAX_LAYERS:
        return  # (a config.json sent to the coordinator could ask it to build a million blocks)
    found = _module_names(json.dumps(model_config, sort_keys=True))
    if found is None:
        return
    names, adaptable = found
    unknown = [k for k in keys if k not in names]
    if unknown:
        said = ", ".join(f"{k!r}" + (f" (did you mean {s!r}?)" if (s := _suggest(k, adaptable))
                                     else "") for k in unknown)
        raise ConfigError(
            f"lora_parameters.keys: {said} match no module of {cfg.model} (mlx-lm would adapt "
            "nothing there)",
            hint="its blocks' modules mlx-lm can adapt: " + ", ".join(adaptable) if adaptable
            else "leave keys out to adapt every linear layer of the trained blocks")
