"""structlog set-up for every lineguard process: JSON lines in production, readable on a TTY.

Logs go to stderr, so stdout stays free for what a command prints on purpose (event lines,
benchmark tables, JSON). Context such as the worker's stage and consumer name, and the frame
key while a frame is handled, is bound with ``structlog.contextvars``, so every line a worker
writes says which frame it is about without each call repeating it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

import structlog

from lineguard.stream.settings import LogSettings

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


class _StreamLogger:
    """Writes rendered lines to ``stream``, or to whatever ``sys.stderr`` is at write time.

    Looking stderr up per line (instead of binding it once) keeps logging working when a
    test runner or a rich Live display swaps it; a closed stream drops the line rather than
    crash the worker that logged it.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream

    def msg(self, message: str) -> None:
        out = self._stream or sys.stderr
        try:
            out.write(message + "\n")
            out.flush()
        except (ValueError, OSError):
            pass

    log = debug = info = warn = warning = err = error = critical = exception = fatal = msg


def configure_logging(
    settings: LogSettings | None = None,
    *,
    level: str | None = None,
    fmt: str | None = None,
    stream: TextIO | None = None,
) -> None:
    """Configure structlog once per process; explicit ``level``/``fmt`` win over ``settings``.

    ``fmt="auto"`` renders for people when ``stream`` is a terminal and JSON otherwise (a
    container, a pipe, a log shipper).
    """
    cfg = settings or LogSettings()
    lvl = (level or cfg.level).lower()
    form = (fmt or cfg.format).lower()
    out = stream or sys.stderr
    logger = _StreamLogger(stream)
    if lvl not in _LEVELS:
        lvl = "info"
    if form == "auto":
        form = "console" if getattr(out, "isatty", lambda: False)() else "json"
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if form == "json":
        processors += [structlog.processors.dict_tracebacks, structlog.processors.JSONRenderer()]
    else:
        processors += [structlog.dev.ConsoleRenderer(colors=False)]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[lvl]),
        logger_factory=lambda *_args: logger,
        # Not cached: tests and ``lineguard run`` reconfigure after module loggers exist.
        cache_logger_on_first_use=False,
    )


@contextmanager
def frame_context(key: str, **extra: Any) -> Iterator[None]:
    """Bind ``frame=<line/camera/seq>`` (and ``extra``) to every log line inside the block."""
    with structlog.contextvars.bound_contextvars(frame=key, **extra):
        yield


def bind_worker(stage: str, consumer: str) -> None:
    """Bind the worker's identity for the rest of this thread's context."""
    structlog.contextvars.bind_contextvars(stage=stage, consumer=consumer)
