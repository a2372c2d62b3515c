import os
import sys

from herd.cli.main import main

try:
    code = main()
    sys.stdout.flush()
except BrokenPipeError:
    # `herd --help | head`: the reader left; no traceback (Python's documented recipe: stdout
    # pointed at devnull so the interpreter's own flush at exit does not raise again)
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    code = 0
sys.exit(code)
