"""Structured logs: JSON lines for machines (default in containers), key=value for people."""

from __future__ import annotations

import logging
import sys

import structlog


def configure(level: str = "INFO", json_output: bool | None = None) -> None:
    if json_output is None:
        json_output = not sys.stderr.isatty()
    renderer = structlog.processors.JSONRenderer() if json_output else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s %(message)s", force=True)
    coordinator = logging.getLogger("aiokafka.consumer.group_coordinator")
    if not any(isinstance(f, RetriedIsWarning) for f in coordinator.filters):
        coordinator.addFilter(RetriedIsWarning())


class RetriedIsWarning(logging.Filter):
    """aiokafka logs a retriable coordinator error (the group coordinator still loading, moving) at ERROR and then
    retries it: a warning. Error-level lines stay for what needs a person."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and any(getattr(arg, "retriable", False) for arg in record.args or ()):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
