"""The ``herd`` command: a thin dispatcher, and the composition root of the planes.

Each subcommand lives where it belongs (a plane's process, or herd/cli/ for the laptop's and the
developer's commands) and owns its own argparse parser (``main(argv) -> int``). The table below
names modules as strings and imports only the one that runs, so ``herd submit`` on a laptop never
imports MLX. Only herd/cli/ may name the planes so (tests/test_architecture.py).
"""

from __future__ import annotations

import importlib
import sys

# name -> (module with main(argv), one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("worker.rank.cli", "run one job locally, or as one rank under an MLX launcher"),
    "tiny-model": ("herd.cli.tiny", "write a small real model folder (random weights)"),
    "tiny-data": ("herd.cli.tiny", "write a small dataset with a pattern a LoRA can learn"),
    "check": ("worker.rank.cli", "validate a job config and its dataset without training"),
    "plan": ("herd.cli.plan", "predict memory and pick a data x pipeline layout"),
    "init": ("herd.cli.laptop", "create the cluster secret and state directory"),
    "coordinator": ("coordinator.main", "run the coordinator"),
    "worker": ("worker.agent.main", "run a worker agent on this machine"),
    "up": ("herd.cli.up", "start a local cluster (coordinator + N workers)"),
    "submit": ("herd.cli.laptop", "validate a job locally and submit it"),
    "jobs": ("herd.cli.laptop", "list jobs"),
    "watch": ("herd.cli.laptop", "follow a job's progress"),
    "cancel": ("herd.cli.laptop", "cancel a job"),
    "workers": ("herd.cli.laptop", "list verified workers"),
    "pull": ("herd.cli.laptop", "download a job's adapter"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: herd COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`herd COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
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
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(argv) or 0)


if __name__ == "__main__":
    sys.exit(main())
