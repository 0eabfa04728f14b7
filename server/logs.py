"""structlog setup: JSON lines for machines, console rendering for people.

A log line that cannot be written (stderr closed, a full disk, a reader gone:
EPIPE) is dropped and counted, never raised: logging must not fail the RPC
or the machine start it describes (DESIGN.md, "Rules every error follows").

The per-RPC line is written through :class:`FastLogger`: while structlog runs
the JSON chain :func:`configure_logging` installed, it renders the same line
(same fields, same order, same JSON) in one step instead of five processors;
under any other configuration (console rendering, ``capture_logs``, an
embedding application's own chain) it goes through structlog as before.
On an event loop it keeps the call and the loop writes the lines kept in
the next 20 ms together (:class:`_Pending`).
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import datetime
import json
import logging
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal, TextIO

import structlog
from structlog.contextvars import STRUCTLOG_KEY_PREFIX

LogFormat = Literal["json", "console", "auto"]

_dropped = 0
_dropped_lock = threading.Lock()


def dropped_lines() -> int:
    """How many log lines could not be written since the process started."""
    return _dropped


def count_dropped(lines: int = 1) -> None:
    """Record log lines lost (the output failed)."""
    global _dropped
    with _dropped_lock:
        _dropped += lines


class SafePrintLogger(structlog.PrintLogger):
    """A ``PrintLogger`` that drops (and counts) lines its file refuses."""

    def msg(self, message: str) -> None:
        """Write one line; on an output error (or a closed file) drop it.

        Per-RPC lines this thread's event loop still holds are written
        first, so the file keeps the order lines were logged in.
        """
        if _pending.lines:
            _pending.flush()
        self.write_lines(message, 1)

    def write_lines(self, text: str, count: int) -> None:
        """Write ``count`` lines joined in ``text`` at once; on an error drop (and count) them."""
        try:
            super().msg(text)
        except (OSError, ValueError):  # ValueError: I/O operation on closed file
            count_dropped(count)

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


#: structlog's names for the numeric levels (what ``add_log_level`` writes).
_LEVEL_NAMES = {50: "critical", 40: "error", 30: "warning", 20: "info", 10: "debug"}
_PREFIX_LEN = len(STRUCTLOG_KEY_PREFIX)


@dataclass(frozen=True)
class _JsonChain:
    """What :func:`configure_logging` installed for JSON, to recognise it later."""

    processors: list[Any]
    wrapper_class: Any
    logger_factory: Any
    level: int
    out: SafePrintLogger


_json_chain: _JsonChain | None = None


class _Clock:
    """``TimeStamper(fmt="iso", utc=True)``'s text, with the seconds formatted once per second."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def stamp(self, now_ns: int) -> str:
        """The text for ``now_ns`` (``time.time_ns()``)."""
        second, micro = divmod(now_ns // 1000, 1_000_000)
        if second != self._second:
            self._prefix = datetime.datetime.fromtimestamp(
                second, tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S")
            self._second = second
        # isoformat() leaves out a zero fraction; so does this.
        return f"{self._prefix}.{micro:06d}Z" if micro else f"{self._prefix}Z"


_clock = _Clock()
_running_loop = asyncio._get_running_loop  # the C function: no RuntimeError, None off a loop


def _no_fallback(value: Any) -> Any:
    raise TypeError(f"{type(value).__name__} needs the renderer's fallback")


def _make_dumps() -> Any:
    """``json.dumps`` with its defaults, its C encoder made once instead of at every call."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # no C accelerator: json.dumps itself
        return json.dumps
    # markers=None: no cycle check; a cyclic value ends in RecursionError (-> structlog).
    encode = make(None, _no_fallback, json.encoder.encode_basestring_ascii, None,  # type: ignore[attr-defined]
                  ": ", ", ", False, False, True)
    return lambda value: "".join(encode(value, 0))


_dumps = _make_dumps()


class FastLogger:
    """A logger for hot lines (one per RPC): ``structlog.get_logger(name).log`` made cheap.

    While the JSON chain of :func:`configure_logging` is in force, a line is
    rendered here exactly as that chain renders it (the call's fields, the
    event, context variables, level, ISO timestamp; ``json.dumps`` text) and
    written through the same :class:`SafePrintLogger`; otherwise, or for a
    field ``json.dumps`` cannot encode by itself, structlog does it. Like
    :func:`log_safely`, it never raises. Called on an event loop, it keeps
    the call (fields, context variables, time) and the loop writes it
    within :data:`FLUSH_SECONDS`, with the other lines kept meanwhile.

    Args:
        name: the logger name (as for ``structlog.get_logger``).
    """

    def __init__(self, name: str) -> None:
        self._logger = structlog.get_logger(name)

    def log(self, level: int, event: str, **fields: Any) -> None:
        """Write one line at ``level`` (a number, as for ``logging``)."""
        try:
            if self._fast(level, event, fields):
                return
        except Exception:
            count_dropped()
            return
        log_safely(self._logger, level, event, **fields)

    def _fast(self, level: int, event: str, fields: dict[str, Any]) -> bool:
        chain = _json_chain
        if chain is None:
            return False
        config = structlog.get_config()
        processors = config["processors"]
        # capture_logs() edits the configured list in place: compare its items
        # (list equality looks at identity first: the same objects, in order).
        if (config["wrapper_class"] is not chain.wrapper_class
                or config["logger_factory"] is not chain.logger_factory
                or processors != chain.processors):
            return False
        if level < chain.level:
            return True  # the filtering wrapper drops it too
        name = _LEVEL_NAMES.get(level)
        if name is None or "exc_info" in fields:
            return False
        now = time.time_ns()
        context = contextvars.copy_context()
        loop = _running_loop()
        if loop is not None:
            _pending.add((self._logger, level, name, event, fields, context, now), chain, loop)
            return True
        line = _render(name, event, fields, context, now)
        if line is None:
            return False
        chain.out.msg(line)
        return True


def _render(name: str, event: str, fields: dict[str, Any], context: contextvars.Context,
            now_ns: int) -> str | None:
    """The JSON chain's line for one call (None: it needs structlog's renderer)."""
    # The chain's order: fields, event, context variables not given, level, time.
    event_dict = dict(fields)
    event_dict["event"] = event
    for var, value in context.items():
        if var.name.startswith(STRUCTLOG_KEY_PREFIX) and value is not Ellipsis:
            event_dict.setdefault(var.name[_PREFIX_LEN:], value)
    event_dict["level"] = name
    event_dict["timestamp"] = _clock.stamp(now_ns)
    try:
        # JSONRenderer is json.dumps with a fallback for other types: where
        # json.dumps needs none, its text is the renderer's.
        return _dumps(event_dict)
    except (TypeError, ValueError, RecursionError):
        return None


#: One call of :meth:`FastLogger.log` made on an event loop, as it was made: the
#: structlog logger, level, level name, event, fields, the call's context
#: variables and its time (``time.time_ns()``).
_PendingLine = tuple[Any, int, str, str, dict[str, Any], contextvars.Context, int]


#: How late a per-RPC line taken on an event loop may be written (seconds), and
#: how many such lines may wait: like nginx's ``access_log ... buffer= flush=``.
FLUSH_SECONDS = 0.02
MAX_PENDING_LINES = 256


class _Pending(threading.local):
    """The per-RPC lines an event loop has taken and not yet written (one list per thread).

    On an event loop, :meth:`FastLogger.log` keeps the call (its fields, its
    context variables and its time, all taken then) and the loop renders and
    writes the kept lines together, with one write, :data:`FLUSH_SECONDS`
    after the first of them (or at once when :data:`MAX_PENDING_LINES` wait).
    grpc finishes calls one per loop turn, so writing each turn's lines
    would write one at a time; rendering and writing them together costs a
    fraction of doing it in the middle of each call. A line written any
    other way in this thread first writes the kept ones, so the file keeps
    the order lines were logged in; so do a change of logging configuration
    and the interpreter's exit. A process killed outright loses at most the
    last :data:`FLUSH_SECONDS` of per-RPC lines.
    """

    def __init__(self) -> None:
        self.lines: list[_PendingLine] = []
        self.chain: _JsonChain | None = None
        self.loop: asyncio.AbstractEventLoop | None = None  # where the write is scheduled

    def add(self, line: _PendingLine, chain: _JsonChain, loop: asyncio.AbstractEventLoop) -> None:
        """Keep ``line``, to be written for ``chain`` by ``loop`` (running here) soon."""
        # Another chain, or a loop that ended before the write was due: write those first.
        if self.lines and (chain is not self.chain or loop is not self.loop):
            self.flush()
        if not self.lines:
            self.chain, self.loop = chain, loop
            loop.call_later(FLUSH_SECONDS, self.flush)
        self.lines.append(line)
        if len(self.lines) >= MAX_PENDING_LINES:
            self.flush()

    def flush(self) -> None:
        """Render and write the kept lines, in order; never raises."""
        lines, self.lines = self.lines, []
        chain, self.chain, self.loop = self.chain, None, None  # keep no closed loop alive
        if not lines or chain is None:
            return
        texts: list[str] = []
        for logger, level, name, event, fields, context, now_ns in lines:
            try:
                text = _render(name, event, fields, context, now_ns)
            except Exception:
                count_dropped()
                continue
            if text is not None:
                texts.append(text)
                continue
            # A value only structlog's renderer takes: it writes this one, in the call's context.
            if texts:
                chain.out.write_lines("\n".join(texts), len(texts))
                texts = []
            context.run(log_safely, logger, level, event, **fields)
        if texts:
            chain.out.write_lines("\n".join(texts), len(texts))


_pending = _Pending()
atexit.register(lambda: _pending.flush())  # the main thread's, if no write came after them


def configure_logging(log_format: LogFormat = "auto", level: int = logging.INFO) -> None:
    """Configure structlog (and stdlib logging) to write to stderr.

    Args:
        log_format: ``json``, ``console``, or ``auto`` (console on a terminal,
            JSON otherwise).
        level: the minimum level logged.
    """
    _pending.flush()  # lines kept for the configuration in force go to its file
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
    chain = [*processors, renderer]
    wrapper_class = structlog.make_filtering_bound_logger(level)
    factory = SafePrintLoggerFactory(sys.stderr)
    structlog.configure(
        processors=chain,
        wrapper_class=wrapper_class,
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    global _json_chain
    _json_chain = (_JsonChain(list(chain), wrapper_class, factory, level, factory())
                   if log_format == "json" else None)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s")
