"""structlog setup: JSON lines for machines, console rendering for people.

A log line that cannot be written (stderr closed, a full disk, a reader gone:
EPIPE) is dropped and counted, never raised: logging must not fail the RPC
or the machine start it describes (DESIGN.md, "Rules every error follows").
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any, Literal, TextIO

import structlog

LogFormat = Literal["json", "console", "auto"]

_dropped = 0
_dropped_lock = threading.Lock()


def dropped_lines() -> int:
    """How many log lines could not be written since the process started."""
    return _dropped


def count_dropped() -> None:
    """Record one log line lost (the output failed)."""
    global _dropped
    with _dropped_lock:
        _dropped += 1


class SafePrintLogger(structlog.PrintLogger):
    """A ``PrintLogger`` that drops (and counts) lines its file refuses."""

    def msg(self, message: str) -> None:
        """Write one line; on an output error (or a closed file) drop it."""
        try:
            super().msg(message)
        except (OSError, ValueError):  # ValueError: I/O operation on closed file
            count_dropped()

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


class SafePrintLoggerFactory:
    """Makes :class:`SafePrintLogger` instances writing to one file."""

    def __init__(self, file: TextIO) -> None:
        self._file = file

    def __call__(self, *args: Any) -> SafePrintLogger:
        return SafePrintLogger(self._file)


def log_safely(logger: Any, level: int, event: str, **fields: Any) -> None:
    """``logger.log(level, event, **fields)`` that never raises.

    For the lines written in the middle of an RPC: whatever logging was
    configured with (an embedding application's own logger, a processor
    that fails), the call goes on.
    """
    try:
        logger.log(level, event, **fields)
    except Exception:
        count_dropped()


def configure_logging(log_format: LogFormat = "auto", level: int = logging.INFO) -> None:
    """Configure structlog (and stdlib logging) to write to stderr.

    Args:
        log_format: ``json``, ``console``, or ``auto`` (console on a terminal,
            JSON otherwise).
        level: the minimum level logged.
    """
    if log_format == "auto":
        log_format = "console" if sys.stderr.isatty() else "json"
    renderer: structlog.typing.Processor
    if log_format == "console":
        renderer = structlog.dev.ConsoleRenderer()
    else:
        renderer = structlog.processors.JSONRenderer()
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if log_format == "json":
        processors += [structlog.processors.dict_tracebacks]
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=SafePrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s")
