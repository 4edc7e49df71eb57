"""structlog set-up: JSON lines in production, a readable console on a TTY.

Key/value events only (`log.info("hl7.accepted", channel=..., msh_10=...)`).
PHI belongs at debug level at most; info and above go to shared log systems.
"""

from __future__ import annotations

import logging
import sys

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure(level: str = "info", fmt: str = "auto") -> None:
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer() if use_console else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # pynetdicom, pydicom, uvicorn use stdlib logging (and pydicom Python warnings too): their
    # records become structlog events like ours, quiet unless debugging.
    root = logging.getLogger()
    root.handlers = [LibraryHandler()]
    root.setLevel(max(_LEVELS[level], logging.WARNING))
    logging.captureWarnings(True)
    for noisy in ("pynetdicom", "uvicorn.access", "httpx"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if level == "debug" else logging.WARNING)


class LibraryHandler(logging.Handler):
    """A library's stdlib log record as one structlog event (``library.log``, with the logger's
    name and its text cut to 300 characters): the same JSON lines as the engine's own, never a
    traceback. A record's exception is reduced to its type (pydicom logs each failed pixel
    decoder's traceback at ERROR before raising; medrelay handles and logs that failure itself)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:
            text = str(record.msg)
        fields: dict[str, str] = {"logger": record.name, "detail": text.strip()[:300]}
        if record.exc_info and record.exc_info[1] is not None:
            fields["error"] = type(record.exc_info[1]).__name__
        try:
            structlog.get_logger().log(record.levelno, "library.log", **fields)
        except Exception:
            self.handleError(record)
