"""`metering webhooks`: events POSTed to the endpoints that subscribe to them, retried on a schedule, never lost.

Two loops in one process, each a consumer group of its own, so instances share the work by partitions:

- the fan-out reads `metering.alerts` and `metering.events` and writes one delivery per subscribed endpoint to the
  compacted `webhook-deliveries` topic, committing the events' offsets once the broker has them all;
- the scheduler owns some partitions of that topic: it reads each from its beginning when assigned (what is left
  to deliver, as it stood when the last owner stopped, or was killed), attempts what is due, and writes each
  delivery's next state back (a tombstone once delivered or failed).

An attempt is logged to ClickHouse (`webhook_deliveries`) before its state is written: a crash between the two repeats
that one attempt, with the same `webhook-id`, which receivers de-duplicate by. A delivery whose first attempt finds
it delivered already (a fan-out replayed after a crash) is dropped. Each endpoint has its own bound on requests in
flight, so a slow or dead receiver holds only its own deliveries.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from clickhouse_connect.driver.client import Client
from prometheus_client import CollectorRegistry, Counter, Histogram

from metering_pipeline.definitions import Catalog, DefinitionFeed, feed_into
from metering_pipeline.logs import get_logger
from metering_pipeline.retry import until_success
from metering_pipeline.settings import Settings
from metering_pipeline.topics import (
    Topics,
    ensure_topics,
    event_reader,
    partitions_of,
    public_topics,
    webhook_topics,
)
from metering_pipeline.warehouse.errors import is_transient
from metering_pipeline.warehouse.webhook_deliveries import record_attempt, was_delivered
from metering_pipeline.webhooks.deliveries import (
    DECODE,
    ENCODE,
    EVENT_TYPES,
    Delivery,
    after_attempt,
    fan_out,
    given_up,
    secrets_in_force,
)
from metering_pipeline.webhooks.sender import WebhookSender
from metering_schemas.webhook import WebhookAttempt, WebhookEndpoint

log = get_logger(__name__)

WRITER = "writer"  # header naming the scheduler instance that wrote a delivery's state
_IDLE_WAIT = 0.2  # seconds the scheduler waits for new deliveries when nothing is due sooner
# ... and at least this long, so that deliveries due but held back (their partition still being read, an attempt of
# the same delivery in flight) do not make it spin.
_MIN_WAIT = 0.02
_FEED_CATCH_UP = 10.0  # seconds the fan-out waits for the endpoints feed to read what was written before an event
_AFTER_ERROR_MS = 5_000  # an attempt that failed on our side (not the receiver's) is tried again after this


def fan_out_group(settings: Settings) -> str:
    return f"{settings.consumer_group_prefix}-webhooks"


def scheduler_group(settings: Settings) -> str:
    return f"{settings.consumer_group_prefix}-webhook-deliveries"


class DeliveryMetrics:
    """`/metrics` of `metering webhooks`: attempts and their latency by outcome (delivered, retrying, failed)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.attempts = Counter(
            "metering_webhook_attempts", "Webhook delivery attempts by outcome", ["outcome"], registry=registry
        )
        self.latency = Histogram(
            "metering_webhook_attempt_seconds",
            "Seconds from a delivery attempt's request to its answer (or its failure), by outcome",
            ["outcome"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 30),
            registry=registry,
        )
        self.fanned_out = Counter(
            "metering_webhook_deliveries_created",
            "Deliveries created from events (one per subscribed endpoint)",
            registry=registry,
        )

    def observe(self, attempt: WebhookAttempt) -> None:
        self.attempts.labels(attempt.status.value).inc()
        self.latency.labels(attempt.status.value).observe(attempt.latency_ms / 1000)


@dataclass
class _Owned:
    """The deliveries of the partitions this instance owns, and which of those partitions it has read to their end."""

    pending: dict[str, tuple[int, Delivery]] = field(default_factory=dict)  # key -> (partition, delivery)
    due: list[tuple[int, str]] = field(default_factory=list)  # heap of (due ms, key); stale entries are skipped
    restoring: dict[int, int] = field(default_factory=dict)  # partition -> end offset when it was assigned
    in_flight: set[str] = field(default_factory=set)

    def put(self, partition: int, delivery: Delivery) -> None:
        self.pending[delivery.key] = (partition, delivery)
        heapq.heappush(self.due, (delivery.due_ms, delivery.key))

    def drop(self, key: str) -> None:
        self.pending.pop(key, None)

    def release(self, partitions: Iterable[int]) -> None:
        gone = set(partitions)
        for key in [key for key, (partition, _) in self.pending.items() if partition in gone]:
            del self.pending[key]
        for partition in gone:
            self.restoring.pop(partition, None)

    def take_due(self, now_ms: int) -> list[Delivery]:
        """The deliveries due by `now_ms` on partitions read to their end, not already being attempted."""
        ready: list[Delivery] = []
        deferred: list[tuple[int, str]] = []
        while self.due and self.due[0][0] <= now_ms:
            due_ms, key = heapq.heappop(self.due)
            entry = self.pending.get(key)
            if entry is None or entry[1].due_ms != due_ms:
                continue  # delivered, dropped or rescheduled since
            if entry[0] in self.restoring or key in self.in_flight:
                deferred.append((due_ms, key))
                continue
            ready.append(entry[1])
        for item in deferred:
            heapq.heappush(self.due, item)
        return ready

    def next_due_ms(self) -> int | None:
        return self.due[0][0] if self.due else None


class WebhookDispatcher:
    def __init__(self, settings: Settings, clickhouse: Client, registry: CollectorRegistry) -> None:
        self.settings = settings
        self.topics = Topics.of(settings)
        self.clickhouse = clickhouse
        self.clickhouse_lock = asyncio.Lock()
        self.metrics = DeliveryMetrics(registry)
        self.endpoints: Catalog[WebhookEndpoint] = Catalog()
        self.instance = uuid.uuid4().hex.encode()
        self._owned = _Owned()
        self._limits: dict[str, asyncio.Semaphore] = defaultdict(
            lambda: asyncio.Semaphore(settings.webhook_max_in_flight)
        )
        self._attempts: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()

    @property
    def pending(self) -> int:
        """Deliveries of this instance's partitions still to attempt."""
        return len(self._owned.pending)

    async def run(self, stopping: asyncio.Event) -> None:
        await ensure_topics(
            self.settings,
            [spec for spec in public_topics(self.settings) if spec.name == self.topics.webhooks]
            + webhook_topics(self.settings),
        )
        feed = feed_into(
            self.settings, self.topics.webhooks, WebhookEndpoint, self.endpoints.put, self.endpoints.delete
        )
        feed_task = feed.start(stopping)
        producer = AIOKafkaProducer(**self.settings.kafka_client_options(), acks="all", enable_idempotence=True)
        await producer.start()
        try:
            await feed.loaded()
            async with WebhookSender(self.settings) as sender:
                loops = [
                    asyncio.create_task(self._fan_out(producer, feed, stopping)),
                    asyncio.create_task(self._schedule(producer, sender, stopping)),
                ]
                done, _ = await asyncio.wait([*loops, feed_task], return_when=asyncio.FIRST_COMPLETED)
                stopping.set()
                results = await asyncio.gather(*loops, return_exceptions=True)
                for task in done:
                    task.result()  # the first loop's error, if one stopped it
                for result in results:
                    if isinstance(result, BaseException):
                        raise result
                if self._attempts:
                    await asyncio.wait(self._attempts, timeout=self.settings.webhook_timeout)
        finally:
            stopping.set()
            await producer.stop()
            with contextlib.suppress(Exception):
                await feed_task

    async def _fan_out(
        self, producer: AIOKafkaProducer, feed: DefinitionFeed[WebhookEndpoint], stopping: asyncio.Event
    ) -> None:
        """Events into deliveries: acknowledged by the broker before the events' offsets are committed."""
        consumer = event_reader(self.settings, fan_out_group(self.settings), self.topics.alerts, self.topics.events)
        await consumer.start()
        try:
            while not stopping.is_set():
                batches = await consumer.getmany(timeout_ms=200, max_records=500)
                if batches:
                    await self._endpoints_written_so_far(consumer, feed)
                sends = []
                for messages in batches.values():
                    for message in messages:
                        published = datetime.fromtimestamp(message.timestamp / 1000, tz=UTC)
                        for delivery in self._deliveries_of(message.value, published):
                            self.metrics.fanned_out.inc()
                            sends.append(
                                await producer.send(
                                    self.topics.webhook_deliveries, ENCODE(delivery), key=delivery.key.encode()
                                )
                            )
                if sends:
                    await asyncio.gather(*sends)
                if batches:
                    await consumer.commit()
        finally:
            await consumer.stop()

    async def _endpoints_written_so_far(
        self, consumer: AIOKafkaConsumer, feed: DefinitionFeed[WebhookEndpoint]
    ) -> None:
        """Until the catalog holds every endpoint written before now: an event published just after an endpoint was
        created reaches it even when the feed had not read the endpoint yet when the event arrived."""
        topic = self.topics.webhooks
        partitions = [TopicPartition(topic, p) for p in sorted(await partitions_of(consumer, topic) or ())]
        ends = await consumer.end_offsets(partitions) if partitions else {}
        if not await feed.has_read({tp.partition: end for tp, end in ends.items()}, _FEED_CATCH_UP):
            log.warning("webhook endpoints feed behind its topic; fanning out with what it has", topic=topic)

    def _deliveries_of(self, value: bytes | None, published: datetime) -> list[Delivery]:
        try:
            event = orjson.loads(value or b"null")
            event_type, event_id = event["type"], event["id"]
        except (orjson.JSONDecodeError, TypeError, KeyError) as error:
            log.error("unreadable event skipped by webhooks", error=repr(error))
            return []
        if event_type not in EVENT_TYPES or not isinstance(event_id, str):
            return []  # another event on the topic: no endpoint can subscribe to it
        return fan_out(self.endpoints.values(), event_id, event_type, value or b"", published)

    async def _schedule(self, producer: AIOKafkaProducer, sender: WebhookSender, stopping: asyncio.Event) -> None:
        consumer = AIOKafkaConsumer(
            **self.settings.kafka_client_options(),
            **self.settings.kafka_group_options(),
            group_id=scheduler_group(self.settings),
            enable_auto_commit=False,  # never committed: each owner reads its partitions from their beginning
            auto_offset_reset="earliest",
        )
        owned = self._owned
        consumer.subscribe([self.topics.webhook_deliveries], listener=_Restore(consumer, owned))
        await consumer.start()
        try:
            while not stopping.is_set():
                now_ms = _now_ms()
                next_due = owned.next_due_ms()
                wait = _IDLE_WAIT if next_due is None else min(_IDLE_WAIT, max(_MIN_WAIT, (next_due - now_ms) / 1000))
                batches = await consumer.getmany(timeout_ms=int(wait * 1000), max_records=1000)
                for tp, messages in batches.items():
                    for message in messages:
                        self._apply(tp.partition, message.key, message.value, message.headers)
                for partition, end in list(owned.restoring.items()):
                    if await consumer.position(TopicPartition(self.topics.webhook_deliveries, partition)) >= end:
                        del owned.restoring[partition]
                        log.info("webhook deliveries restored", partition=partition, pending=len(owned.pending))
                for delivery in owned.take_due(_now_ms()):
                    owned.in_flight.add(delivery.key)
                    task = asyncio.create_task(self._attempt(producer, sender, delivery))
                    self._attempts.add(task)
                    task.add_done_callback(self._attempts.discard)
        finally:
            await consumer.stop()

    def _apply(self, partition: int, key: bytes | None, value: bytes | None, headers: Iterable[Any]) -> None:
        """A delivery's entry as read: this instance's own writes are already applied (unless it is reading the
        partition again from its beginning); a tombstone ends it."""
        if key is None:
            return
        if partition not in self._owned.restoring and (WRITER, self.instance) in headers:
            return
        if value is None:
            self._owned.drop(key.decode())
            return
        try:
            delivery = DECODE(value)
        except ValueError as error:
            log.error("unreadable webhook delivery skipped", key=key.decode(errors="replace"), error=str(error))
            return
        self._owned.put(partition, delivery)

    async def _attempt(self, producer: AIOKafkaProducer, sender: WebhookSender, delivery: Delivery) -> None:
        try:
            async with self._limits[delivery.endpoint_id]:
                await self._attempt_once(producer, sender, delivery)
        except Exception:
            log.exception("webhook attempt failed unexpectedly; tried again shortly", delivery_id=delivery.id)
            entry = self._owned.pending.get(delivery.key)
            if entry is not None and entry[1] is delivery:
                later = msgspec.structs.replace(delivery, due_ms=_now_ms() + _AFTER_ERROR_MS)
                self._owned.put(entry[0], later)
        finally:
            self._owned.in_flight.discard(delivery.key)

    async def _attempt_once(self, producer: AIOKafkaProducer, sender: WebhookSender, delivery: Delivery) -> None:
        endpoint = self.endpoints.get(delivery.endpoint_id)
        now = datetime.now(UTC)
        if endpoint is None:
            await self._finish(producer, delivery, given_up(delivery, "endpoint deleted: not sent", now), None)
            return
        if delivery.attempts == 0 and not delivery.resend:
            if await self._query(was_delivered, delivery.endpoint_id, delivery.id):
                log.info("webhook already delivered; not sent again", delivery_id=delivery.id)
                await self._write(producer, delivery, None)
                return
        if len(delivery.body.encode()) > self.settings.webhook_max_body_bytes:
            reason = f"body larger than METERING_WEBHOOK_MAX_BODY_BYTES ({self.settings.webhook_max_body_bytes})"
            await self._finish(producer, delivery, given_up(delivery, reason, now), None)
            return
        outcome = await sender.post(endpoint.url, delivery, secrets_in_force(endpoint, now), now)
        row, following = after_attempt(delivery, outcome, self.settings.webhook_delays, now)
        await self._finish(producer, delivery, row, following)

    async def _finish(
        self, producer: AIOKafkaProducer, delivery: Delivery, row: WebhookAttempt, following: Delivery | None
    ) -> None:
        """Logs the attempt, then writes the delivery's next state: a crash between the two repeats the attempt."""
        self.metrics.observe(row)
        (log.info if following is None and row.status_code else log.warning)(
            "webhook attempt",
            endpoint_id=row.endpoint_id,
            delivery_id=row.delivery_id,
            attempt=row.attempt,
            status=row.status.value,
            status_code=row.status_code,
            latency_ms=row.latency_ms,
            error=row.error or None,
        )
        await self._query(record_attempt, row, delivery.body)
        await self._write(producer, delivery, following)

    async def _write(self, producer: AIOKafkaProducer, delivery: Delivery, following: Delivery | None) -> None:
        entry = self._owned.pending.get(delivery.key)
        if entry is None or entry[1] is not delivery:
            return  # replaced meanwhile (a resend, or the partition moved): that state stands
        value = None if following is None else ENCODE(following)
        await producer.send_and_wait(
            self.topics.webhook_deliveries, value, key=delivery.key.encode(), headers=[(WRITER, self.instance)]
        )
        if following is None:
            self._owned.drop(delivery.key)
        else:
            self._owned.put(entry[0], following)

    async def _query(self, function: Callable[..., Any], *args: Any) -> Any:
        async with self.clickhouse_lock:
            return await until_success(
                lambda: asyncio.to_thread(function, self.clickhouse, *args),
                f"ClickHouse {function.__name__}",
                transient=is_transient,
            )


class _Restore(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka's listener base is untyped
    """Partitions assigned are read from their beginning before any of their deliveries is attempted; partitions
    revoked are forgotten (their new owner reads them)."""

    def __init__(self, consumer: AIOKafkaConsumer, owned: _Owned) -> None:
        self.consumer = consumer
        self.owned = owned

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        self.owned.release(tp.partition for tp in revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        if not assigned:
            return
        ends = await self.consumer.end_offsets(assigned)
        await self.consumer.seek_to_beginning(*assigned)
        for tp in assigned:
            self.owned.restoring[tp.partition] = ends[tp]


def _now_ms() -> int:
    return int(datetime.now(UTC).timestamp() * 1000)
