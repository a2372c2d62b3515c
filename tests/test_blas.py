"""Linux training processes preload OpenBLAS when it is installed, and say which BLAS they use."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from worker.rank import runtime

# numpy first, as in a rank: its wheel maps an OpenBLAS of its own, which MLX does not use.
PROBE = ("import numpy; import mlx.core as mx; mx.eval(mx.ones((4,4)) @ mx.ones((4,4))); "
         "from worker.rank.runtime import blas_in_use; print(blas_in_use())")


@pytest.mark.skipif(sys.platform != "linux", reason="LD_PRELOAD of OpenBLAS is the Linux path")
def test_preload_switches_mlx_to_openblas():
    lib = runtime.find_openblas()
    if lib is None:
        pytest.skip("OpenBLAS not installed (deploy/setup.sh installs libopenblas0-pthread)")
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    plain = subprocess.run([sys.executable, "-c", PROBE], env={**env, "HERD_NO_OPENBLAS": "1"},
                           capture_output=True, text=True, check=True)
    preloaded = subprocess.run([sys.executable, "-c", PROBE], env=runtime.preload_env(env),
                               capture_output=True, text=True, check=True)
    assert plain.stdout.strip() == "reference"
    assert preloaded.stdout.strip() == "openblas"


def test_opt_out_is_respected():
    env = runtime.preload_env({"HERD_NO_OPENBLAS": "1"})
    assert "LD_PRELOAD" not in env
