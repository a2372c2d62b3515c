"""Many trainings in one process, each exactly as its own command would run it:

    python -m tests.train_many herd CONFIG...     # each as `herd train CONFIG --quiet`
    python -m tests.train_many mlx_lm CONFIG...   # each as `mlx_lm.lora -c CONFIG`

The interpreter start and the imports (mlx, mlx-lm, transformers: ~3 s of every run of a tiny
model) are paid once per command instead of once per configuration; that is most of what the
bit-for-bit matrix of tests/test_training.py costs. Nothing carries over between runs that could
make two of them agree: both commands seed their own RNGs at the start of each run (mlx-lm's
``run``/``train_model``, herd's trainer), and each run loads its model and data again.

Start it with the environment the commands would get (worker/rank/runtime.py's ``preload_env``: herd
train then does not restart itself, and mlx-lm gets the same OpenBLAS). Prints one JSON line per
configuration: {"config": ..., "ok": bool, "error": "..."}.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import traceback


def _herd(cfg: str) -> None:
    from worker.rank.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["train", cfg, "--quiet"])
    if rc != 0:
        raise RuntimeError(f"herd train exited {rc}: {err.getvalue()[-2000:]}")


def _mlx_lm(cfg: str) -> None:
    from mlx_lm.lora import main

    sys.argv = ["mlx_lm.lora", "-c", cfg]
    main()


def run(tool: str, configs: list[str]) -> None:
    if tool == "mlx_lm":
        # kept out of the process as herd's ranks keep them out when a job does not report to
        # them (an import of ~1 s that changes no number)
        sys.modules["wandb"] = sys.modules["swanlab"] = None
    one = {"herd": _herd, "mlx_lm": _mlx_lm}[tool]
    for cfg in configs:
        try:
            with contextlib.redirect_stdout(sys.stderr):  # stdout carries the results only
                one(cfg)
            result = {"config": cfg, "ok": True, "error": ""}
        except BaseException as e:  # noqa: BLE001 (SystemExit too: the next config still runs)
            result = {"config": cfg, "ok": False,
                      "error": "".join(traceback.format_exception(e))[-3000:]}
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2:])
