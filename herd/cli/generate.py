"""``herd generate``: ``mlx_lm.generate`` (same options), with a pulled adapter's base checked.

mlx-lm reads an adapter's LoRA settings but not the quantization of the base it was trained on,
so a QLoRA adapter loads silently onto a full-precision folder. This reads the adapter's
``base_model`` record (herd/adapter_card.py) first: ``--model`` defaults to the base it names,
and a base quantized otherwise than the adapter's gets a warning with the command that makes the
right one. Then mlx-lm's own generate runs, unchanged.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from herd.adapter_card import check_base, read_card
from herd.errors import ConfigError, HerdError, NotFoundError

DESCRIPTION = """\
usage: herd generate [mlx_lm.generate options] --adapter-path DIR [--model BASE] --prompt TEXT

mlx_lm.generate with a pulled adapter: --model defaults to the base model the adapter records
(adapter_config.json, base_model), and a base not quantized as the adapter's was gets a warning
with the mlx_lm.convert command that makes the right one. Then mlx-lm's generate runs, unchanged.
"""


SHAPE = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size",
         "num_attention_heads", "num_key_value_heads", "vocab_size")


def _other_shape(model: str, trained_on: str) -> str | None:
    """How ``model`` differs in shape from the base the adapter was trained on (None: the same
    shape, e.g. that base quantized, or either config unreadable here)."""
    from herd.model_config import resolve_model_config

    try:
        a, b = (resolve_model_config(m) for m in (model, trained_on))
    except HerdError:
        return None
    a, b = ({**c.get("text_config", {}), **c} for c in (a, b))
    differ = [f"{k} {a.get(k)} vs {b.get(k)}" for k in SHAPE if a.get(k) != b.get(k)]
    return ", ".join(differ) or None


def _loadable(model: str) -> str:
    """``model`` as mlx-lm takes it: a pinned org/name@commit base (exit 2 from mlx-lm on the
    recorded base: an outside run) as that commit's snapshot folder, fetched when online."""
    from herd.model_config import snapshot_folder

    try:
        found = snapshot_folder(model, download=True)
    except Exception as e:  # offline without it, no such revision, refused: one message
        raise NotFoundError(f"the adapter's base {model} is not in the local Hugging Face cache "
                            f"and could not be fetched ({type(e).__name__})",
                            hint=f"pass --model (a folder, or {model.partition('@')[0]} for its "
                            "current revision)") from None
    return found[1] if found else model


def main(argv: list[str]) -> int:
    args = argv[1:]
    trained_on = None
    if any(a in ("-h", "--help") for a in args):
        print(DESCRIPTION + "\nmlx_lm.generate's own help follows.\n", flush=True)
    else:
        p = argparse.ArgumentParser(add_help=False)
        p.add_argument("--model")
        p.add_argument("--adapter-path")
        known, rest = p.parse_known_args(args)
        if rest and not rest[0].startswith("-"):  # `herd generate JOB`: mlx-lm's usage, no more
            print(f"herd generate: {rest[0]}: takes options only (mlx_lm.generate's)",
                  file=sys.stderr)
            print(f"  hint: a job's adapter: `herd pull {rest[0]} -o DIR`, then `herd generate "
                  "--adapter-path DIR --prompt ...`", file=sys.stderr)
            return 2
        if known.adapter_path:
            folder = Path(known.adapter_path).expanduser()
            if not (folder / "adapters.safetensors").is_file():
                # (mlx-lm took the missing folder for a hub id: a hub traceback, an outside run)
                print(f"herd generate: {known.adapter_path}: no adapters.safetensors there",
                      file=sys.stderr)
                print("  hint: give the folder `herd pull JOB -o DIR` wrote (or an "
                      "mlx_lm.lora adapter_path)", file=sys.stderr)
                return NotFoundError.exit_code
            trained_on = read_card(folder).get("model")
            model = known.model or trained_on
            if model and not known.model:
                print(f"herd generate: base model {model} (from the adapter)", file=sys.stderr)
                try:
                    model = _loadable(model)
                except HerdError as e:
                    print(f"herd generate: {e}", file=sys.stderr)
                    return e.exit_code
                args = ["--model", model, *args]
            elif known.model and trained_on and (
                    differ := _other_shape(known.model, trained_on)):
                print(f"warning: this adapter was trained on {trained_on}; --model "
                      f"{known.model} has another shape ({differ})", file=sys.stderr)
            if model and (warning := check_base(folder, model)):
                print(f"warning: {warning}", file=sys.stderr)
    import importlib

    sys.argv = ["mlx_lm.generate", *args]
    try:
        importlib.import_module("mlx_lm.generate").main()
    except ValueError as e:  # mlx-lm's "Adapter ... contains incompatible tensors" and the like
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"herd generate: {first}", file=sys.stderr)
        if trained_on and "--model" in argv[1:] and "incompatible" in first:
            print(f"  hint: this adapter was trained on {trained_on}: generate with that base "
                  "(leave out --model)", file=sys.stderr)
        return ConfigError.exit_code
    return 0
