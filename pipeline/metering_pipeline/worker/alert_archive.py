"""Alerts from `metering.alerts` into ClickHouse's `threshold_events`, for reports and the API.

A stage of its own, so that alerting never waits for the warehouse: the rollup stage publishes
alerts to Kafka, and this copies them at least once (rows are keyed by the alert's id, so a
copy written twice is one event). While ClickHouse is down it retries and falls behind; the
alerts topic holds what it has not copied yet. A permanent ClickHouse error stops the stage.
"""

from __future__ import annotations

import asyncio

import orjson
from aiokafka import AIOKafkaConsumer, ConsumerRecord
from aiokafka.errors import CommitFailedError

from metering_pipeline.logs import get_logger
from metering_pipeline.retry import FailingStreak, until_success
from metering_pipeline.settings import Settings
from metering_pipeline.topics import Topics
from metering_pipeline.warehouse.errors import is_transient
from metering_pipeline.warehouse.sink import ClickHouseSink

log = get_logger(__name__)


class AlertArchive:
    def __init__(self, settings: Settings, sink: ClickHouseSink) -> None:
        self.settings = settings
        self.sink = sink
        self.failing = FailingStreak()  # threshold_events writes retrying since (for /health)
        self.consumer = AIOKafkaConsumer(
            Topics.of(settings).alerts,
            **settings.kafka_client_options(),
            group_id=f"{settings.consumer_group_prefix}-alert-archive",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",  # alerts of aborted checkpoints never happened
            **settings.kafka_group_options(),
        )

    async def run(self, stopping: asyncio.Event) -> None:
        await self.consumer.start()
        try:
            while not stopping.is_set():
                batches = await self.consumer.getmany(timeout_ms=200, max_records=5_000)
                events = [
                    event
                    for messages in batches.values()
                    for message in messages
                    if (event := _event(message)) is not None
                ]
                if events:
                    await until_success(
                        lambda: self.sink.write_alerts(events),  # noqa: B023 - awaited in this same iteration
                        "write threshold_events",
                        transient=is_transient,
                        streak=self.failing,
                    )
                if batches:
                    try:
                        await self.consumer.commit()
                    except CommitFailedError as error:  # the group moved on meanwhile: copies may repeat, harmlessly
                        log.warning("alert archive commit failed; its alerts will be copied again", error=str(error))
        finally:
            await self.consumer.stop()


def _event(message: ConsumerRecord) -> dict[str, object] | None:
    try:
        event = orjson.loads(message.value)
        if isinstance(event, dict) and isinstance(event.get("id"), str):
            return event
    except orjson.JSONDecodeError:
        pass
    log.error(
        "not an alert event on the alerts topic; not archived", partition=message.partition, offset=message.offset
    )
    return None
