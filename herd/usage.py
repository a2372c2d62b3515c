"""What ``--help`` says, shared by every command's parser (the CLI's and both planes' daemons):
one formatter, and the environment variables and exit codes ``herd --help`` lists."""

from __future__ import annotations

import argparse
import textwrap


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Descriptions keep their line breaks; options show their default, except where there is
    none worth showing (None, a flag's False, a default already spelled out in the help)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if default is None or default is False or default == argparse.SUPPRESS \
                or "default" in text:
            return text
        return super()._get_help_string(action)


def port_number(text: str) -> int:
    """An option's port: 0 (any free one) to 65535 (``--port 99999`` served on a random port,
    which no one found: an outside run)."""
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port (0 to 65535)")
    return value


def port_or_off(text: str) -> int:
    """A port, or -1: none (--http-port)."""
    return -1 if text.strip() == "-1" else port_number(text)


def at_least(low: float, kind: type = int):
    """An option's number, ``low`` or more (``--workers 0`` crashed `herd up` in the
    background after it said it had started: an outside run)."""
    def parse(text: str):
        value = kind(text)
        if not low <= value < float("inf"):  # (nan compares false: a timeout that never came)
            raise argparse.ArgumentTypeError(f"{text} is below {low}" if value < low else
                                             f"{text} is not a finite number")
        return value
    parse.__name__ = kind.__name__  # (argparse names it in "invalid int value")
    return parse


ENVIRONMENT = [
    ("HERD_HOME", "where `herd init` / `herd join` keep the certificates (tls/) and the "
                  "daemons their state (default ~/.herd)"),
    ("HERD_COORDINATOR", "HOST[:PORT] of the coordinator, instead of zeroconf (port 7450)"),
    ("HERD_ZEROCONF_INTERFACES", "comma-separated addresses mDNS uses (e.g. 127.0.0.1); the "
                                 "first is also the daemons' default --host"),
    ("HERD_LOG_LEVEL", "debug | info | warning: the structured log on stderr (default: info "
                       "for the daemons and `herd train`, warning for the other commands)"),
    ("HERD_NO_OPENBLAS", "1: training processes on Linux do not preload OpenBLAS"),
]

EXIT_CODES = [
    (0, "success"),
    (1, "any other failure (the message says what), e.g. a state folder already in use"),
    (2, "invalid job config or arguments (the message names the key and the fix)"),
    (3, "invalid dataset (file, line numbers, how many lines)"),
    (4, "the job cannot be placed (what is missing: workers, memory, with fixes)"),
    (5, "the coordinator or a peer was lost or unreachable"),
    (6, "authentication failed (no certificate of this cluster, or one revoked)"),
    (7, "not found (job, checkpoint step, rank, a background `herd up`)"),
    (8, "a disk is full or failing (the message names it and its free space)"),
    (9, "training produced a non-finite loss or gradient (the iteration and values)"),
    (10, "`herd watch`: the job failed"),
    (11, "`herd watch`: the job was cancelled"),
]


def environment_text(columns: int = 100) -> str:
    width = max(len(name) for name, _ in ENVIRONMENT)
    indent = " " * (width + 4)
    return "\n".join(textwrap.fill(text, columns, initial_indent=f"  {name:<{width}}  ",
                                   subsequent_indent=indent) for name, text in ENVIRONMENT)


def exit_codes_text() -> str:
    return "\n".join(f"  {code:>3}  {text}" for code, text in EXIT_CODES)
