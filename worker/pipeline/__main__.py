"""``python -m worker.pipeline CONFIG --adapter-path DIR [...]``: one pipeline stage."""

import sys

from worker.pipeline.main import main

sys.exit(main(sys.argv[1:]))
