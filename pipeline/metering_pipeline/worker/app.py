"""`metering worker`: the Faust app that hosts the pipeline's stages and its web endpoint.

Faust runs the process (signals, logging, the web server with /health and /metrics); the
stages use aiokafka consumers of their own so that they read, checkpoint and commit in
batches: Faust's per-message path is what bounds a plain agent (see shared notes).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import Awaitable
from typing import Any

import faust
from aiokafka import AIOKafkaProducer
from faust.types import StreamT
from faust.web import Request, Response, View
from mode import Service
from prometheus_client import CONTENT_TYPE_LATEST

from metering_pipeline import logs
from metering_pipeline.definitions import DefinitionFeed, feed_into
from metering_pipeline.logs import get_logger
from metering_pipeline.retry import FailingStreak
from metering_pipeline.settings import Settings
from metering_pipeline.topics import (
    KAFKA_UNREACHABLE,
    Topics,
    check_partitioning,
    ensure_topics,
    internal_topics,
    kafka_answers,
    public_topics,
    rollup_group,
)
from metering_pipeline.usage.metrics import MetricCatalog
from metering_pipeline.usage.subject_zones import SubjectZones
from metering_pipeline.usage.thresholds import ThresholdBook
from metering_pipeline.warehouse import mirrors
from metering_pipeline.warehouse.errors import is_transient
from metering_pipeline.warehouse.migrations import migrate
from metering_pipeline.warehouse.sink import ClickHouseSink
from metering_pipeline.worker import garbage
from metering_pipeline.worker.alert_archive import AlertArchive
from metering_pipeline.worker.definition_mirror import DefinitionMirror, MetricAnnouncer
from metering_pipeline.worker.entitlements import FORWARDED_HEADER, SERVED_BY_HEADER, Entitlements, member_client_id
from metering_pipeline.worker.health import failing_writer
from metering_pipeline.worker.rollup_stage import RollupStage
from metering_pipeline.worker.router_stage import RouterStage
from metering_pipeline.worker.stats import WorkerStats
from metering_schemas import MetricDefinition, SubjectSettings, UsageThreshold

log = get_logger(__name__)


class Pipeline:
    """The stages of one worker process, started and stopped together."""

    def __init__(self, settings: Settings, web_port: int) -> None:
        self.settings = settings
        self.url = settings.worker_url or f"http://{socket.gethostname()}:{web_port}"
        self.stats = WorkerStats()
        self.catalog = MetricCatalog()
        self.book = ThresholdBook()
        self.zones = SubjectZones(settings.default_time_zone)
        self.stopping = asyncio.Event()
        self.started = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self.healthy = False
        self.failure: tuple[str, BaseException] | None = None  # the stage that stopped the worker, and why

    async def start(self) -> None:
        self.outage_watch = asyncio.create_task(logs.KAFKA_RETRIES.watch())
        self.sink = ClickHouseSink(self.settings)
        self.events_producer = AIOKafkaProducer(**self.settings.kafka_client_options(), acks="all")
        await self.events_producer.start()
        topics = Topics.of(self.settings)
        self.mirrors: dict[str, DefinitionMirror[Any]] = {
            topics.metrics: MetricAnnouncer(self.sink, mirrors.METRICS, self.events_producer, topics.events),
            topics.plans: DefinitionMirror(self.sink, mirrors.PLANS),
            topics.subscriptions: DefinitionMirror(self.sink, mirrors.SUBSCRIPTIONS),
        }
        feeds: list[DefinitionFeed[Any]] = [
            feed_into(self.settings, topics.metrics, MetricDefinition, self.catalog.put, self.catalog.delete),
            feed_into(self.settings, topics.thresholds, UsageThreshold, self.book.put, self.book.delete),
            feed_into(self.settings, topics.subjects, SubjectSettings, self.zones.put, self.zones.delete),
        ]
        self.tasks = [asyncio.create_task(self._guard(f"{feed.topic} feed", feed.run(self.stopping))) for feed in feeds]
        for feed in feeds:  # thresholds are checked against the metrics' reset periods from the first record on
            await feed.ready.wait()
        rollups = RollupStage(
            self.settings,
            self.sink,
            self.stats,
            self.catalog,
            self.book,
            client_id=member_client_id(rollup_group(self.settings), self.url),
            zones=self.zones,
        )
        self.entitlements = Entitlements(self.settings, rollups, self.url)
        self.rollups = rollups
        self.alert_archive = AlertArchive(self.settings, self.sink)
        self.tasks += [
            asyncio.create_task(self._guard("rollups", rollups.run(self.stopping))),
            asyncio.create_task(
                self._guard(
                    "router",
                    RouterStage(self.settings, self.catalog, self.zones, self.stats, rollups.backpressured).run(
                        self.stopping
                    ),
                )
            ),
            asyncio.create_task(self._guard("alert archive", self.alert_archive.run(self.stopping))),
        ]
        self.healthy = True
        self.started.set()
        garbage.freeze_survivors()  # the framework, clients and catalogs: alive for as long as the process
        log.info("worker started", guarantee=self.settings.processing_guarantee)

    async def stop(self) -> None:
        self.stopping.set()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.events_producer.stop()
        self.outage_watch.cancel()

    def liveness_problem(self) -> str | None:
        """Why this worker is not alive (starting, or a stage failed and the process is stopping), or None. A
        ClickHouse outage is not one: a restart would not end it, and would replay state."""
        if self.failure is not None:
            stage, error = self.failure
            return f"stage {stage} failed: {_described(error)}"
        if not self.healthy:
            return "starting"
        return None

    def readiness_problem(self) -> str | None:
        """Why this worker must not count as serving (not alive, or a ClickHouse writer failing for longer than
        `writer_unhealthy_after`), or None; restoring partitions are reported beside it."""
        problem = self.liveness_problem()
        if problem is not None:
            return problem
        writers: list[tuple[str, FailingStreak]] = [
            (f"checkpoint writer of partition {partition}", owned.writer.failing)
            for partition, owned in sorted(self.rollups.owned.items())
        ]
        writers.append(("alert archive", self.alert_archive.failing))
        return failing_writer(writers, self.settings.writer_unhealthy_after, time.monotonic())

    def fail(self, stage: str, error: BaseException) -> None:
        """A stage that cannot go on takes the process down (exit status 1, see `metering worker`): a supervisor
        restarts it and it resumes from its last commit. One error line: the first failure is the cause."""
        self.healthy = False
        if self.failure is None:
            self.failure = (stage, error)
            log.error("stage failed; stopping the worker", stage=stage, error=_described(error), exc_info=error)
            os.kill(os.getpid(), signal.SIGTERM)

    async def _guard(self, name: str, work: Awaitable[None]) -> None:
        try:
            await work
        except Exception as error:
            self.fail(name, error)
            raise


def _described(error: BaseException) -> str:
    """The error in one line, with what it interrupted (`retry.until_success` notes it)."""
    return "; ".join([f"{type(error).__name__}: {error}", *getattr(error, "__notes__", ())])[:2000]


def prepare(settings: Settings) -> None:
    """Before the worker joins its groups: every topic it reads or writes exists, and the warehouse schema does
    if ClickHouse answers within its connect timeout. A ClickHouse that is down or hanging does not keep the
    worker from consuming and alerting: its sink applies the migrations once ClickHouse answers. Refused
    credentials, an untrusted certificate or internal topics whose partition counts differ end the start here,
    in one line."""
    asyncio.run(ensure_topics(settings, public_topics(settings) + internal_topics(settings)))
    asyncio.run(check_partitioning(settings))
    try:
        migrate(settings, timeout=settings.clickhouse_connect_timeout)
    except Exception as error:
        if not is_transient(error):
            raise
        log.warning(
            "ClickHouse does not answer; the worker starts without it and applies migrations once it does",
            error=str(error)[:300],
        )


class PipelineService(Service):
    """The pipeline as a service of the Faust worker, started before the app: Faust starts the app's own services
    only once the app's consumer group (the definitions mirror's) has joined, which after a crash waits for the dead
    member's Kafka session; counting, alerts and entitlement checks must not (their groups may be static,
    METERING_KAFKA_GROUP_INSTANCE_ID)."""

    def __init__(self, pipeline: Pipeline) -> None:
        super().__init__()
        self.pipeline = pipeline

    async def on_start(self) -> None:
        await self.pipeline.start()

    async def on_stop(self) -> None:
        await self.pipeline.stop()


def create_app(settings: Settings, web_port: int) -> tuple[faust.App, Pipeline]:
    """The Faust app, and the pipeline it runs (whose `failure` decides the exit status)."""
    # A fresh volume or path: Faust makes only the last directory of its datadir, the stores theirs.
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        f"{settings.topic_prefix}{settings.consumer_group_prefix}-worker",
        broker=f"kafka://{settings.kafka_bootstrap}",
        broker_credentials=_faust_credentials(settings),
        broker_session_timeout=settings.kafka_session_timeout,
        broker_heartbeat_interval=max(1.0, settings.kafka_session_timeout / 10),
        store="memory://",
        datadir=str(settings.state_dir / "faust"),  # Faust's own files, beside the state (not the working directory)
        web_enabled=True,
        web_port=web_port,
        web_bind="0.0.0.0",
        topic_disable_leader=True,
    )
    pipeline = Pipeline(settings, web_port)
    topics = Topics.of(settings)
    definitions = app.topic(
        topics.metrics, topics.plans, topics.subscriptions, key_serializer="raw", value_serializer="raw"
    )

    @app.agent(definitions)
    async def mirror_definitions(stream: StreamT[bytes]) -> None:
        """Metric, plan and subscription entries into ClickHouse (each entry by one member of the group)."""
        await pipeline.started.wait()
        async for event in stream.events():
            message = event.message
            try:
                await pipeline.mirrors[message.topic].mirror_entry(message.key, message.value, message.offset)
            except Exception as error:  # noqa: BLE001 - e.g. a permanent ClickHouse error: like a stage's, it stops the worker
                pipeline.fail("definition mirror", error)
                return

    @app.page("/health")
    async def health(web: View, request: Request) -> Response:
        """Liveness: 200 {"healthy": true}, or 503 {"healthy": false, "reason": ...} (`Pipeline.liveness_problem`)."""
        problem = pipeline.liveness_problem()
        if problem is None:
            return web.json({"healthy": True})
        return web.json({"healthy": False, "reason": problem}, status=503)

    @app.page("/ready")
    async def ready(web: View, request: Request) -> Response:
        """Readiness: 200 once alive, with every assigned partition's state restored, no writer failing for too long
        and a Kafka broker answering; else 503 saying what it waits for (the restoring partitions and how far along
        they are, the reason)."""
        problem = pipeline.readiness_problem()
        if problem is None and not await kafka_answers(pipeline.events_producer.client, topics.usage_recorded):
            problem = KAFKA_UNREACHABLE
        restoring = [
            {"partition": r.partition, "replayedEntries": r.entries, "remainingOffsets": r.remaining}
            for r in sorted(pipeline.rollups.restoring.values(), key=lambda r: r.partition)
        ]
        body: dict[str, object] = {"ready": problem is None and not restoring, "restoring": restoring}
        if problem is not None:
            body["reason"] = problem
        return web.json(body, status=200 if body["ready"] else 503)

    @app.page("/v1/subjects/{subject_type}/{subject_id}/metrics/{metric_key}")
    async def entitlement(web: View, request: Request, subject_type: str, subject_id: str, metric_key: str) -> Response:
        """Current-period usage, limits and blocked state of one subject's metric (owner answers; others forward)."""
        if not pipeline.started.is_set():
            return web.json({"error": "starting", "message": "the worker is starting"}, status=503)
        status, body, served_by = await pipeline.entitlements.check(
            subject_type, subject_id, metric_key, forwarded=FORWARDED_HEADER in request.headers
        )
        return web.json(body, status=status, headers={SERVED_BY_HEADER: served_by})

    @app.page("/metrics")
    async def metrics(web: View, request: Request) -> Response:
        # In a header: aiohttp refuses a content_type argument with a charset, and CONTENT_TYPE_LATEST has one.
        return web.bytes(pipeline.stats.prometheus(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    return app, pipeline


def _faust_credentials(settings: Settings) -> faust.SASLCredentials | faust.SSLCredentials | None:
    if settings.kafka_sasl_mechanism is None and settings.kafka_security_protocol == "PLAINTEXT":
        return None
    options = settings.kafka_client_options()
    ssl_context = options.get("ssl_context")
    if settings.kafka_sasl_mechanism is not None:
        return faust.SASLCredentials(
            username=settings.kafka_sasl_username,
            password=settings.kafka_sasl_password.get_secret_value() if settings.kafka_sasl_password else None,
            mechanism=settings.kafka_sasl_mechanism,
            ssl_context=ssl_context,
        )
    return faust.SSLCredentials(ssl_context)
