"""structlog set-up: JSON lines when stderr is not a terminal, readable key=value when it is.

Events are snake_case; context (job_id, worker_id, rank, step) is bound, not formatted into text.
"""

from __future__ import annotations

import logging
import os
import sys


def _import_structlog():
    """structlog, without its optional rich tracebacks. structlog.dev imports rich whenever it
    is installed (herd installs it for `herd watch`'s progress bars, imported only where they
    draw): ~0.3 s of every herd process's start (`herd workers`, each rank, each agent) for
    tracebacks herd never renders that way: its console lines are plain text, its files JSON
    lines. rich stays importable afterwards; a process that imported it already keeps it."""
    blocked = [m for m in ("rich", "better_exceptions") if m not in sys.modules]
    for m in blocked:
        sys.modules[m] = None  # `import rich` raises ImportError: structlog falls back
    try:
        import structlog
    finally:
        for m in blocked:
            if sys.modules.get(m, 0) is None:
                del sys.modules[m]
    return structlog


structlog = _import_structlog()

_configured = False


class _CurrentStderr:
    """Writes to sys.stderr as it is now: test runners and daemons swap it after set-up."""

    def write(self, s: str) -> int:
        return sys.stderr.write(s)

    def flush(self) -> None:
        sys.stderr.flush()


def setup(level: str | None = None, json: bool | None = None) -> None:
    global _configured
    level = (level or os.environ.get("HERD_LOG_LEVEL", "info")).upper()
    if json is None:
        json = not sys.stderr.isatty()
    processors = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]
    renderer = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=processors + [renderer],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),
        cache_logger_on_first_use=True,
    )
    _configured = True


def get(name: str | None = None, **bound):
    if not _configured:
        setup()
    log = structlog.get_logger(name) if name else structlog.get_logger()
    return log.bind(**bound) if bound else log
