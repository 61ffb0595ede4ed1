"""Structured logs: JSON lines for machines (default in containers), key=value for people."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from dataclasses import dataclass

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
# aiokafka messages that name the broker they failed to reach: by its node id (the first argument), or its address
# (host and port, the first two).
_BY_NODE = (
    "Unable connect to node with id",
    "Unable to request metadata from node with id",
    "Failed fetch messages from",
    "Marking the coordinator dead (node",
)
_BY_ADDRESS = ('Unable connect to "%s:%s"', 'Unable to request metadata from "%s:%s"')
# No broker answered: every known one was asked for metadata and none replied.
_NO_BROKER = ("Unable to update metadata from", "Unable to bootstrap from")
CLUSTER = "cluster"  # the outage of the whole cluster, beside those of single brokers


@dataclass
class _Outage:
    since: float
    last: float
    hushed: int = 0


class KafkaRetries(logging.Filter):
    """aiokafka logs every retry of a request, most at ERROR: a 24-second broker restart wrote ~15,000 error lines
    that need no person, and drowned the ones that do. This filter turns them into:

    - one warning when a broker becomes unreachable (the first connection error naming it) and one when it is back
      (no connection error naming it for `quiet` seconds), with how long it was gone and how many retries were
      hushed; the same two for the whole cluster when no broker answers at all;
    - other retried errors (a coordinator moving, a leader changing) at most once per `every` seconds per
      message, as warnings, also while a broker is down (on a cluster they tell the others taking over).

    Errors aiokafka does not retry (refused credentials, authorization, a bug in its routines) pass unchanged.
    """

    def __init__(self, quiet: float = 10.0, every: float = 60.0) -> None:
        super().__init__()
        self.quiet = quiet
        self.every = every
        self.outages: dict[str, _Outage] = {}  # by broker ("node 1", "host:9092") or CLUSTER
        self._last_said: dict[tuple[str, object], float] = {}
        self._log = get_logger("metering_pipeline.kafka")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        now = time.monotonic()
        self.notice_recovery(now)
        message = record.msg if isinstance(record.msg, str) else ""
        args = record.args if isinstance(record.args, tuple) else ()
        errors = [arg for arg in args if isinstance(arg, BaseException)]
        if any(isinstance(error, KafkaError) and not error.retriable for error in errors):
            return True  # e.g. refused credentials, not authorized: for a person
        broker = _broker_named(message, args)
        unreachable = message.startswith(("Unable connect to", *_NO_BROKER)) or any(
            isinstance(error, _UNREACHABLE) for error in errors
        )
        if not (
            unreachable
            or any(getattr(error, "retriable", False) for error in errors)
            or message.startswith(_RETRIED_MESSAGES)
        ):
            return True
        if unreachable:
            where = CLUSTER if message.startswith(_NO_BROKER) else broker
            if where is not None:
                self._unreachable(where, now, record)
            elif self.outages:  # a connection error that names no broker, during an outage: part of it
                next(iter(self.outages.values())).hushed += 1
                return False
        if broker is not None and broker in self.outages:
            self.outages[broker].hushed += 1
            return False
        if CLUSTER in self.outages:
            self.outages[CLUSTER].hushed += 1
            return False
        if now - self._last_said.get((record.name, record.msg), -self.every) < self.every:
            return False
        self._last_said[(record.name, record.msg)] = now
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True

    def _unreachable(self, where: str, now: float, record: logging.LogRecord) -> None:
        outage = self.outages.get(where)
        if outage is None:
            self.outages[where] = _Outage(now, now)
            error = record.getMessage()[:300]
            if where == CLUSTER:
                self._log.warning(
                    "Kafka unreachable: no broker answers; its clients retry until it is back", error=error
                )
            else:
                self._log.warning(
                    "Kafka broker unreachable; its clients retry until it is back", broker=where, error=error
                )
        else:
            outage.last = now

    def notice_recovery(self, now: float | None = None) -> None:
        """Says once that a broker (or the cluster) is back, after `quiet` seconds without a connection error naming
        it (called by each filtered record and by `watch`)."""
        now = time.monotonic() if now is None else now
        for where, outage in list(self.outages.items()):
            if now - outage.last < self.quiet:
                continue
            del self.outages[where]
            gone = {"unreachable_seconds": round(outage.last - outage.since, 1), "retries_not_logged": outage.hushed}
            if where == CLUSTER:
                self._log.warning("Kafka reachable again", **gone)
            else:
                self._log.warning("Kafka broker reachable again", broker=where, **gone)

    async def watch(self) -> None:
        """Notices recovery in a process whose clients have nothing more to log once Kafka is back."""
        while True:
            await asyncio.sleep(1)
            self.notice_recovery()


def _broker_named(message: str, args: tuple[object, ...]) -> str | None:
    """The broker an aiokafka message is about, when it names one."""
    if message.startswith(_BY_ADDRESS) and len(args) >= 2:
        return f"{args[0]}:{args[1]}"
    if message.startswith(_BY_NODE) and args:
        return f"node {args[0]}"
    return None


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(name)  # structlog types it Any
    return logger


KAFKA_RETRIES = KafkaRetries()
