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

from herd.adapter_card import check_base, read_card

DESCRIPTION = """\
usage: herd generate [mlx_lm.generate options] --adapter-path DIR [--model BASE] --prompt TEXT

mlx_lm.generate with a pulled adapter: --model defaults to the base model the adapter records
(adapter_config.json, base_model), and a base not quantized as the adapter's was gets a warning
with the mlx_lm.convert command that makes the right one. Then mlx-lm's generate runs, unchanged.
"""


def main(argv: list[str]) -> int:
    args = argv[1:]
    if any(a in ("-h", "--help") for a in args):
        print(DESCRIPTION + "\nmlx_lm.generate's own help follows.\n", flush=True)
    else:
        p = argparse.ArgumentParser(add_help=False)
        p.add_argument("--model")
        p.add_argument("--adapter-path")
        known, _ = p.parse_known_args(args)
        if known.adapter_path:
            model = known.model or read_card(known.adapter_path).get("model")
            if model and not known.model:
                args = ["--model", model, *args]
                print(f"herd generate: base model {model} (from the adapter)", file=sys.stderr)
            if model and (warning := check_base(known.adapter_path, model)):
                print(f"warning: {warning}", file=sys.stderr)
    import importlib

    sys.argv = ["mlx_lm.generate", *args]
    importlib.import_module("mlx_lm.generate").main()
    return 0
