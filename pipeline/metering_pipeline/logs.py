"""Structured logs: JSON lines for machines (default in containers), key=value for people."""

from __future__ import annotations

import asyncio
import logging
import sys
import time

import structlog
from aiokafka.errors import KafkaConnectionError, KafkaError, NodeNotReadyError, RequestTimedOutError


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
    logging.basicConfig(
        level=level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s %(message)s", force=True
    )
    for name in AIOKAFKA_LOGGERS:
        logger = logging.getLogger(name)
        if KAFKA_RETRIES not in logger.filters:
            logger.addFilter(KAFKA_RETRIES)


# Every aiokafka module that logs the errors it retries (the client's own logger is plain "aiokafka").
AIOKAFKA_LOGGERS = (
    "aiokafka",
    "aiokafka.conn",
    "aiokafka.cluster",
    "aiokafka.consumer.consumer",
    "aiokafka.consumer.fetcher",
    "aiokafka.consumer.group_coordinator",
    "aiokafka.producer.producer",
    "aiokafka.producer.sender",
)
# aiokafka messages (their format strings' starts) about requests it retries by itself.
_RETRIED_MESSAGES = (
    "Unable connect to",
    "Unable to request metadata",
    "Unable to update metadata",
    "Failed fetch messages",
    "Failed fetch offsets",
    "Group Coordinator Request failed",
    "FindCoordinator Request failed",
    "Heartbeat send request failed",
    "Heartbeat session expired",
    "Heartbeat failed for group",
    "Marking the coordinator dead",
    "Error sending",
    "Got error produce response",
    "Cannot send",
    "Could not send",
    "OffsetCommit failed before join",
    "Topic %s is not available during auto-create",
    "Topic %s not found in cluster metadata",
)
_UNREACHABLE = (KafkaConnectionError, NodeNotReadyError, RequestTimedOutError, ConnectionError, TimeoutError)


class KafkaRetries(logging.Filter):
    """aiokafka logs every retry of a request, most at ERROR: a 24-second broker restart wrote ~15,000 error lines
    that need no person, and drowned the ones that do. This filter turns them into:

    - one warning when the broker becomes unreachable (the first connection error) and one when it is back
      (no connection error for `quiet` seconds), with how long it was gone and how many retries were hushed;
      the clients' retries in between are not logged;
    - other retried errors (a coordinator moving, a leader changing) at most once per `every` seconds per
      message, as warnings.

    Errors aiokafka does not retry (refused credentials, authorization, a bug in its routines) pass unchanged.
    """

    def __init__(self, quiet: float = 10.0, every: float = 60.0) -> None:
        super().__init__()
        self.quiet = quiet
        self.every = every
        self.unreachable_since: float | None = None
        self.last_unreachable = 0.0
        self.hushed = 0
        self._last_said: dict[tuple[str, object], float] = {}
        self._log = get_logger("metering_pipeline.kafka")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        now = time.monotonic()
        self.notice_recovery(now)
        message = record.msg if isinstance(record.msg, str) else ""
        errors = (
            [arg for arg in record.args if isinstance(arg, BaseException)] if isinstance(record.args, tuple) else []
        )
        if any(isinstance(error, KafkaError) and not error.retriable for error in errors):
            return True  # e.g. refused credentials, not authorized: for a person
        unreachable = any(isinstance(error, _UNREACHABLE) for error in errors) or message.startswith(
            ("Unable connect to", "Unable to update metadata")
        )
        if not (
            unreachable
            or any(getattr(error, "retriable", False) for error in errors)
            or message.startswith(_RETRIED_MESSAGES)
        ):
            return True
        if unreachable:
            if self.unreachable_since is None:
                self.unreachable_since = now
                self._log.warning(
                    "Kafka unreachable; its clients retry until it is back", error=record.getMessage()[:300]
                )
            self.last_unreachable = now
        if (
            self.unreachable_since is not None
            or now - self._last_said.get((record.name, record.msg), -self.every) < self.every
        ):
            self.hushed += 1
            return False
        self._last_said[(record.name, record.msg)] = now
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True

    def notice_recovery(self, now: float | None = None) -> None:
        """Says once that Kafka is back, after `quiet` seconds without a connection error (called by each filtered
        record and by `watch`)."""
        now = time.monotonic() if now is None else now
        if self.unreachable_since is not None and now - self.last_unreachable >= self.quiet:
            self._log.warning(
                "Kafka reachable again",
                unreachable_seconds=round(self.last_unreachable - self.unreachable_since, 1),
                retries_not_logged=self.hushed,
            )
            self.unreachable_since, self.hushed = None, 0

    async def watch(self) -> None:
        """Notices recovery in a process whose clients have nothing more to log once Kafka is back."""
        while True:
            await asyncio.sleep(1)
            self.notice_recovery()


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(name)  # structlog types it Any
    return logger


KAFKA_RETRIES = KafkaRetries()
