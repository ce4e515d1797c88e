"""Structured logs: one JSON object per line for machines, aligned key=value for a terminal.

The standard library logs and structlog renders.  Every module keeps its
`logging.getLogger(__name__)`, as uvicorn, SQLAlchemy and httpx do too, and one structlog
`ProcessorFormatter` on the root handler turns each record into an event dict, adds the
context bound in contextvars (`request_id`, `cart_id`) and renders it.  structlog rather than
a stdlib JSON formatter (python-json-logger) because contextvars binding, the console
renderer and the JSON renderer are one processor chain: the two formats cannot disagree on a
field, and third-party records get the same context as ours, with no change at call sites.

Context lives in contextvars because every asyncio task runs in a copy of its creator's
context: what a request handler or a fetch task binds stays on that request's or that
fetch's lines and never leaks into another's.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

# httpx logs every archive request at INFO: three lines per staged file is noise, and
# formatting them costs real CPU on carts of many small files.
# aiosqlite logs every statement at DEBUG, which drowns cartd's own debug lines.
QUIET = {
    "httpx": logging.WARNING,
    "httpcore": logging.WARNING,
    "aiosqlite": logging.INFO,
    # Alembic announces its dialect on every schema check; cartd logs what changed instead.
    "alembic": logging.WARNING,
}


def bind(**values: Any) -> None:
    """Add fields to every line logged from now on in this task (and tasks it starts)."""
    structlog.contextvars.bind_contextvars(**values)


def new_request(request_id: str) -> None:
    """Start a request's context afresh: only its own id, nothing from before."""
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id)


def context() -> dict[str, Any]:
    return structlog.contextvars.get_contextvars()


def _drop_uvicorn_colour(_logger: WrappedLogger, _name: str, event: EventDict) -> EventDict:
    event.pop("color_message", None)  # uvicorn's duplicate of the message, with ANSI codes
    return event


def formatter(fmt: str, stream: TextIO) -> logging.Formatter:
    """`json`, `console`, or `auto`: console when `stream` is a terminal, else JSON."""
    console = fmt == "console" or (fmt == "auto" and stream.isatty())
    pre_chain: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.ExtraAdder(),
        _drop_uvicorn_colour,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    final: list[Processor] = [structlog.stdlib.ProcessorFormatter.remove_processors_meta]
    if console:
        final.append(structlog.dev.ConsoleRenderer(colors=stream.isatty()))
    else:
        final += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    return structlog.stdlib.ProcessorFormatter(foreign_pre_chain=pre_chain, processors=final)


class _CurrentStderr(logging.StreamHandler[TextIO]):
    """Writes to whatever `sys.stderr` is when a line is emitted, not when configured: a
    caller that swaps stderr (a test runner's capture, a daemon redirect) and closes the old
    one must not leave every later line failing with "I/O operation on closed file"."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


def configure(fmt: str, level: str, stream: TextIO | None = None) -> None:
    """Route every logger in the process through one handler with our formatter."""
    handler = logging.StreamHandler(stream) if stream else _CurrentStderr()
    handler.setFormatter(formatter(fmt, stream or sys.stderr))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.captureWarnings(True)  # a DeprecationWarning is a log line too, not raw stderr
    for name, quiet in QUIET.items():
        logging.getLogger(name).setLevel(quiet)
    # uvicorn's loggers propagate to the root handler above instead of printing their own way.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
