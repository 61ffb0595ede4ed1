"""Topics as the product creates them and as it finds them: min.insync.replicas set on every topic it creates and the
broker's clock on usage.recorded, a warning for existing topics that keep fewer copies than its settings ask for, and
no start on internal topics whose partition counts were changed apart (a subject's state would be split)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from structlog.testing import capture_logs

from metering_pipeline import topics as topics_module
from metering_pipeline.logs import get_logger
from metering_pipeline.settings import Settings
from metering_pipeline.topics import Topics, ensure_topics, internal_topics, public_topics
from support import PARTITIONS, define, eventually, metric, settings_env, summary_rows, usage

pytestmark = pytest.mark.integration

TOPIC_CONFIG = 1  # DescribeConfigs' config_source of a value set on the topic itself
LOG_APPEND_TIME = 1  # a record's timestamp type: the broker's time


async def topic_configs(settings: Settings, names: list[str], key: str) -> dict[str, tuple[str, int]]:
    """Per topic: the value of `key` and where it comes from."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        responses = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, name, {key: None}) for name in names]
        )
    finally:
        await admin.close()
    return {
        name: (value, source)
        for response in responses
        for _code, _message, _type, name, entries in response.resources
        for _key, value, _read_only, source, *_ in entries
    }


async def add_partitions(settings: Settings, names: list[str]) -> None:
    """Two more partitions on each topic, as an operator scaling out might add them."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_partitions(dict.fromkeys(names, NewPartitions(PARTITIONS + 2)))
    finally:
        await admin.close()


async def refused_start(new_worker) -> str:
    """A worker that must not start: it exits 1; what it said."""
    worker = new_worker().start()
    assert worker.process is not None
    await asyncio.to_thread(eventually, lambda: worker.process.poll() is not None, 60, message=worker.log_tail)
    assert worker.process.returncode == 1
    said: str = worker.log_tail()
    assert "Traceback" not in said
    return said


async def test_every_topic_the_product_creates_sets_min_insync_replicas(pipeline):
    settings, _ = pipeline  # the fixture created the public and internal topics with the product's own code
    names = [spec.name for spec in public_topics(settings) + internal_topics(settings)]
    configs = await topic_configs(settings, names, "min.insync.replicas")
    assert configs == dict.fromkeys(names, (str(settings.insync_replicas), TOPIC_CONFIG))


async def test_existing_topics_with_fewer_copies_than_the_settings_are_named(pipeline, monkeypatch):
    settings, _ = pipeline
    stricter = settings.model_copy(update={"replication_factor": 2, "min_insync_replicas": 2})
    specs = public_topics(settings) + internal_topics(settings)
    # A logger not yet used: one an earlier test used keeps the processors it was cached with, and escapes capture.
    monkeypatch.setattr(topics_module, "log", get_logger("metering_pipeline.topics"))
    with capture_logs() as logs:
        assert await ensure_topics(stricter, specs) == []  # all exist: nothing created, nothing changed
    fewer = {e["topic"] for e in logs if e["event"].startswith("topic has fewer replicas")}
    weaker = {e["topic"] for e in logs if e["event"].startswith("topic acknowledges writes held by fewer")}
    assert fewer == weaker == {spec.name for spec in specs}
    assert {e["replicas"] for e in logs if e["topic"] in fewer and "replicas" in e} == {1}


async def test_a_worker_refuses_to_start_when_partitions_were_added_to_the_changelog(pipeline):
    settings, new_worker = pipeline
    topics = Topics.of(settings)
    await add_partitions(settings, [topics.rollup_changelog])

    said = await refused_start(new_worker)
    assert (
        f"topic {topics.routed} has {PARTITIONS} partitions and {topics.rollup_changelog} has {PARTITIONS + 2}" in said
    )


async def test_a_back_dated_message_time_is_replaced_by_the_brokers_and_the_record_counts_in_its_own_period(pipeline):
    settings, new_worker = pipeline
    topic = Topics.of(settings).usage_recorded
    assert (await topic_configs(settings, [topic], "message.timestamp.type"))[topic] == ("LogAppendTime", TOPIC_CONFIG)
    await define(settings, metric("tokens", "SUM"))
    worker = new_worker().start()
    await asyncio.to_thread(worker.wait_healthy)
    event_time = (datetime.now(UTC) - timedelta(days=30)).replace(minute=10, second=0, microsecond=0)
    record = {**orjson.loads(usage("old-1", "tokens", "org:acme", "7")[1]), "timestamp": event_time.isoformat()}
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:  # a producer that sets the message time to the event time, 30 days back
        sent = await producer.send_and_wait(
            topic, orjson.dumps(record), key=b"org:acme", timestamp_ms=int(event_time.timestamp() * 1000)
        )
    finally:
        await producer.stop()

    # What retention reads: the broker's append time, so the record is kept for the topic's whole retention.
    assert sent.timestamp_type == LOG_APPEND_TIME
    assert abs(sent.timestamp / 1000 - time.time()) < 60
    hour = ("tokens", "acme", "HOURLY", event_time.replace(minute=0, tzinfo=None), ())
    await asyncio.to_thread(
        eventually, lambda: summary_rows(settings, ["tokens"]).get(hour) == (Decimal(7), 1), 60, message=worker.log_tail
    )


async def test_a_worker_refuses_to_start_when_partitions_were_added_to_both_internal_topics(pipeline):
    settings, new_worker = pipeline
    topics = Topics.of(settings)
    first = new_worker().start()
    await asyncio.to_thread(first.wait_healthy)  # its start recorded the partition count
    await asyncio.to_thread(first.stop)
    await add_partitions(settings, [topics.routed, topics.rollup_changelog])  # the same count on both

    said = await refused_start(new_worker)
    assert f"have {PARTITIONS + 2} partitions, but the workers first ran with {PARTITIONS}" in said


def test_metering_topics_creates_the_public_topics_and_no_internal_one(pipeline):
    settings, _ = pipeline
    fresh = settings.model_copy(update={"topic_prefix": f"{settings.topic_prefix}cli."})
    ran = subprocess.run(
        [sys.executable, "-m", "metering_pipeline.cli", "topics"],
        env={**os.environ, **settings_env(fresh)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.returncode == 0, ran.stderr

    async def listed() -> set[str]:
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
        await admin.start()
        try:
            return {name for name in await admin.list_topics() if name.startswith(fresh.topic_prefix)}
        finally:
            await admin.close()

    topics = Topics.of(fresh)
    assert asyncio.run(listed()) == {spec.name for spec in public_topics(fresh)}
    assert not {topics.routed, topics.rollup_changelog, topics.layout} & asyncio.run(listed())
