"""The ``herd`` command: a thin dispatcher, and the composition root of the planes.

Each subcommand lives where it belongs (a plane's process, or herd/cli/ for the laptop's and the
developer's commands) and owns its own argparse parser (``main(argv) -> int``). The table below
names modules as strings and imports only the one that runs, so ``herd submit`` on a laptop never
imports MLX. Only herd/cli/ may name the planes so (tests/test_architecture.py).
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings

from herd.limits import raise_open_files
from herd.usage import environment_text, exit_codes_text

# name -> (module with main(argv), one-line help), in the order of a first session.
COMMANDS: dict[str, tuple[str, str]] = {
    "init": ("herd.cli.trust", "make the cluster CA and this machine's certificates (once)"),
    "token": ("herd.cli.trust", "make a short-lived token that lets a machine join"),
    "join": ("herd.cli.trust", "join this machine to a cluster with a token"),
    "revoke": ("herd.cli.trust", "revoke a member's certificate"),
    "coordinator": ("herd.cli.coordinator", "run the coordinator (one per cluster)"),
    "worker": ("worker.agent.main", "run a worker agent (one per Mac)"),
    "up": ("herd.cli.up", "start a local cluster: a coordinator and N workers (--detach)"),
    "down": ("herd.cli.up", "stop a `herd up` cluster"),
    "status": ("herd.cli.listing", "the cluster at a glance: coordinator, workers, jobs"),
    "workers": ("herd.cli.listing", "list verified workers (--wait N for scripts)"),
    "plan": ("herd.cli.plan", "will a job fit? predicted memory and data x pipeline layout"),
    "check": ("worker.rank.cli", "validate a job config and its dataset, train nothing"),
    "submit": ("herd.cli.laptop", "check a job here and queue it on the cluster"),
    "jobs": ("herd.cli.listing", "list jobs: state, iteration, losses, checkpoints"),
    "watch": ("herd.cli.laptop", "follow a job to its end (exit 0/10/11)"),
    "logs": ("herd.cli.logs", "a rank's output (-f to follow)"),
    "cancel": ("herd.cli.laptop", "stop a job"),
    "pull": ("herd.cli.laptop", "download a job's adapter (mlx-lm format)"),
    "rm": ("herd.cli.laptop", "delete ended jobs: record, checkpoints, logs"),
    "models": ("herd.cli.models", "the coordinator's model store: list, add, rm"),
    "generate": ("herd.cli.generate", "mlx_lm.generate with a pulled adapter, its base checked"),
    "train": ("worker.rank.cli", "run one job on this machine (or one rank under mlx.launch)"),
    "tiny-model": ("herd.cli.tiny", "write a small real model folder (random weights)"),
    "tiny-data": ("herd.cli.tiny", "write a small dataset with a pattern a LoRA can learn"),
    "api-token": ("herd.cli.api_token", "print the HTTP API's bearer token (dashboard, /metrics)"),
}
# Commands a person runs and reads: their own output is the message, so the structured log
# shows only warnings unless $HERD_LOG_LEVEL asks for more. Daemons and training keep info.
QUIET_LOG = {"init", "token", "join", "revoke", "status", "workers", "plan", "check", "submit",
             "jobs", "watch", "logs", "cancel", "pull", "rm", "generate", "tiny-model",
             "tiny-data", "down", "api-token", "models"}

ABOUT = """\
herd: LoRA/QLoRA fine-tuning across a cluster of Apple Silicon Macs, on MLX.

A coordinator finds worker agents by zeroconf (each proves its certificate), splits a job
across them (data parallel, and pipeline parallel when a model does not fit one Mac) and keeps
every checkpoint; the adapter you pull loads with mlx_lm.generate --adapter-path. A job file is
an mlx_lm.lora YAML, plus optional cluster: and quantize: sections.

A first session:
  herd init                          # once, on the coordinator's machine: the cluster CA
  herd coordinator &                 # prints `herd join <token>` for adding a Mac
  herd join <token>; herd worker &   # on each Mac
  herd workers --wait 2              # the verified workers
  herd plan job.yaml                 # will it fit on this cluster?
  JOB=$(herd submit job.yaml)        # checks config + dataset here, then queues it
  herd watch $JOB                    # progress to the end
  herd pull $JOB -o adapters/        # the adapter, for mlx_lm.generate --adapter-path
(Everything on one machine first: export HERD_ZEROCONF_INTERFACES=127.0.0.1, or `herd up -d`.)"""


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [ABOUT, "", "usage: herd COMMAND [ARGS...]   (herd COMMAND --help: its options and "
             "defaults)", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "environment:", environment_text(), "", "exit codes:", exit_codes_text(), "",
              "herd --version: the version."]
    return "\n".join(lines)


def _quiet_third_parties() -> None:
    """No third-party notices on a normal run (they reach the rank processes too): transformers'
    "PyTorch was not found" (herd uses its tokenizers only)."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def _print_config_warnings() -> None:
    """A deprecated config key is a ``warning:`` line, like the dataset check's, not Python's
    file:line warning format."""
    from herd.config import LegacyKeyWarning

    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, LegacyKeyWarning):
            print(f"warning: {message}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_third_parties()
    raise_open_files()  # a flood of connections must not use up a server's descriptors
    if argv[:1] == ["train"]:
        # A `herd train` process that re-execs itself for OpenBLAS does it before importing
        # anything it would lose (worker/rank/runtime.py; returns when nothing would change).
        from worker.rank.runtime import reexec_with_openblas

        reexec_with_openblas(argv[1:])
    _print_config_warnings()
    if not argv:  # (a script's empty variable: exit 2, as git and kubectl do, not success)
        print(usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from herd import __version__

        print(f"herd {__version__}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"herd: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    if name in QUIET_LOG and not os.environ.get("HERD_LOG_LEVEL"):
        from herd import log

        log.setup(level="warning")
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return int(module.main(argv) or 0)
    except BrokenPipeError:
        # The reader went away (`herd plan job.yaml | head -2`): no traceback. Python's own
        # recipe: stdout onto /dev/null, so the flush at exit does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
