"""``python -m worker.rank CONFIG [options]``: the rank process, with ``herd train``'s options."""

import sys

from worker.rank.runtime import reexec_with_openblas

# Before anything else is imported: a process that re-execs itself for OpenBLAS (runtime.py)
# should not first pay for the CLI's imports (pydantic, structlog: ~0.8 s of CPU).
reexec_with_openblas(sys.argv[1:])

from worker.rank.cli import main  # noqa: E402 (after the re-exec)

sys.exit(main(["train", *sys.argv[1:]]))
