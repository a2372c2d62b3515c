#!/usr/bin/env bash
# Installs herd and its dependencies into .venv (uv, from the lock file).
# On Debian/Ubuntu it also installs OpenBLAS: the mlx-cpu wheel links the slow reference BLAS,
# and herd's Linux training processes preload OpenBLAS when it is present (about 25x faster matmuls).
# And Chromium, for the dashboard's browser test (tests/test_dashboard_e2e.py).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "$(uname)" == "Linux" ]] && command -v apt-get >/dev/null; then
  if ! ls /usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0 >/dev/null 2>&1; then
    SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
    echo "herd setup: installing OpenBLAS (libopenblas0-pthread)"
    ($SUDO apt-get update -qq && $SUDO apt-get install -y -qq libopenblas0-pthread) \
      || echo "herd setup: could not install OpenBLAS; training will run on the slow reference BLAS"
  fi
  # The dashboard's tests drive Debian's Chromium with Playwright (never `playwright install`,
  # which downloads a browser build of its own).
  if ! command -v chromium >/dev/null; then
    SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
    echo "herd setup: installing Chromium for the dashboard tests"
    ($SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium) \
      || echo "herd setup: could not install Chromium; the dashboard's browser test will skip"
  fi
  # The multi-host tests (tests/netns.py, run as root) build network namespaces with iproute2
  # and drop frames between two of them with nftables.
  if [[ $(id -u) -eq 0 ]] && ! command -v nft >/dev/null; then
    echo "herd setup: installing nftables and iproute2 (for the network-namespace tests)"
    (apt-get update -qq && apt-get install -y -qq nftables iproute2) \
      || echo "herd setup: could not install nftables; tests that drop frames will skip"
  fi
fi
if ! command -v uv >/dev/null; then
  python3 -m pip install --quiet 'uv>=0.5'
fi
# With bytecode: uv installs none unless asked, and where PYTHONDONTWRITEBYTECODE is set (CI
# machines) Python never caches what it compiles, so every herd process (each rank start, agent,
# CLI call) compiled its ~650 modules from source again: ~2.5 s of CPU per rank start, 1 s per
# CLI call. herd's own packages are an editable install, outside uv's reach: compiled here too
# (a stale .pyc after an edit is only ignored, never wrong: Python checks the source's mtime).
uv sync --frozen --quiet --compile-bytecode
.venv/bin/python -m compileall -q -j 0 herd coordinator worker protos tests bench >/dev/null
