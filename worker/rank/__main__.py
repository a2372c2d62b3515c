"""``python -m worker.rank CONFIG [options]``: the rank process, with ``herd train``'s options."""

import sys

from worker.rank.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
