"""Definitions topics of any shape, as users' clusters have them: created by an operator or by the
broker's auto-create (the local broker's `num.partitions` is 4), created only after the reader
started, or given more partitions while it runs. Every definition on every partition takes effect.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from structlog.testing import capture_logs

from metering_pipeline.definitions import DefinitionWriter, followed, read_all
from metering_pipeline.invoicing.settlement import processed_through
from metering_pipeline.settings import Settings
from metering_pipeline.topics import Topics, ensure_topics, partitions_of, public_topics
from metering_pipeline.warehouse.client import connect
from metering_schemas import MetricDefinition
from support import create_topics, eventually, metric, publish, read_json, running_api, settings_env, threshold, usage

pytestmark = pytest.mark.integration

AUTO_CREATED_PARTITIONS = 4  # the local broker's num.partitions


async def put_on_every_partition(settings: Settings, topic: str, partitions: int, prefix: str) -> list[str]:
    """One metric definition on each partition, each keyed by its id (as the wire contract says)."""
    ids = [f"{prefix}{p}" for p in range(partitions)]
    await publish(settings, [(i.encode(), orjson.dumps(metric(i, "SUM")), p) for p, i in enumerate(ids)], topic)
    return ids


async def partition_count(settings: Settings, topic: str) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        [described] = await admin.describe_topics([topic])
        return len(described["partitions"])
    finally:
        await admin.close()


async def auto_create(settings: Settings, topic: str) -> None:
    """What a user's producer does to a topic that does not exist yet: the broker creates it with its defaults."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    await producer.start()
    try:
        await producer.partitions_for(topic)
    finally:
        await producer.stop()


async def all_found(found: dict, ids: list[str], timeout: float) -> None:
    """Until the feed has every one of `ids` (waiting in a thread: the feed fills `found` on this event loop)."""
    await asyncio.to_thread(
        eventually,
        lambda: found.keys() >= set(ids),
        timeout,
        interval=0.2,
        message=lambda: f"missing: {sorted(set(ids) - found.keys())}",
    )


@pytest.mark.parametrize(
    "partitions, made_by", [(1, "operator"), (3, "operator"), (4, "operator"), (AUTO_CREATED_PARTITIONS, "auto-create")]
)
async def test_a_feed_loads_and_follows_every_partition_of_an_existing_topic(
    apache_stack, unique_name, partitions, made_by
):
    settings = apache_stack.settings()
    topic = f"{unique_name}.metering.metrics"
    if made_by == "operator":
        await create_topics(settings.kafka_bootstrap, [topic], partitions=partitions)
    else:
        await auto_create(settings, topic)
    assert await partition_count(settings, topic) == partitions
    before = await put_on_every_partition(settings, topic, partitions, "before-")

    async with followed(settings, topic, MetricDefinition) as (feed, found):
        async with asyncio.timeout(15):
            await feed.loaded()
        assert sorted(found) == sorted(before), "everything the topic held is loaded before `ready`"
        during = await put_on_every_partition(settings, topic, partitions, "during-")
        await all_found(found, during, timeout=5)
    assert sorted(await read_all(settings, topic, MetricDefinition)) == sorted(before + during)


async def test_a_feed_of_a_topic_created_later_by_a_producer_reads_it_and_creates_nothing(apache_stack, unique_name):
    settings = apache_stack.settings()
    topic = f"{unique_name}.metering.metrics"
    async with followed(settings, topic, MetricDefinition) as (feed, found):
        async with asyncio.timeout(15):
            await feed.loaded()  # an absent topic holds nothing: ready at once
        assert found == {}
        await asyncio.sleep(3)  # more than one partition check
        probe = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
        await probe.start()
        try:
            assert topic not in await probe.list_topics(), "a reader must not auto-create a definitions topic"
        finally:
            await probe.close()
        assert sorted(await read_all(settings, topic, MetricDefinition)) == []

        ids = await put_on_every_partition(settings, topic, AUTO_CREATED_PARTITIONS, "late-")
        assert await partition_count(settings, topic) == AUTO_CREATED_PARTITIONS
        await all_found(found, ids, timeout=10)


async def test_a_feed_reads_partitions_added_while_it_runs_from_their_start(apache_stack, unique_name):
    settings = apache_stack.settings()
    topic = f"{unique_name}.metering.metrics"
    await create_topics(settings.kafka_bootstrap, [topic], partitions=1)
    first = await put_on_every_partition(settings, topic, 1, "first-")
    async with followed(settings, topic, MetricDefinition) as (feed, found):
        await feed.loaded()
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
        await admin.start()
        try:
            await admin.create_partitions({topic: NewPartitions(total_count=3)})
        finally:
            await admin.close()
        # Written right away, possibly before the feed notices the partitions: read from their beginning.
        added = await put_on_every_partition(settings, topic, 3, "added-")
        await all_found(found, first + added, timeout=10)


async def test_partitions_of_names_each_partition_and_none_for_an_absent_topic(apache_stack, unique_name):
    settings = apache_stack.settings()
    topic = f"{unique_name}.t"
    await create_topics(settings.kafka_bootstrap, [topic], partitions=3)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap)
    await consumer.start()
    try:
        assert await partitions_of(consumer, topic) == {0, 1, 2}
        assert await partitions_of(consumer, f"{unique_name}.absent") is None
    finally:
        await consumer.stop()


def monthly_totals(settings: Settings, subject_type: str, subject_id: str) -> dict[str, Decimal]:
    with connect(settings) as client:
        rows = client.query(
            "SELECT metric_key, total_quantity FROM usage_summary WHERE subject_type = {t:String} "
            "AND subject_id = {i:String} AND period_type = 'MONTHLY'",
            parameters={"t": subject_type, "i": subject_id},
        ).result_rows
    return {key: Decimal(total) for key, total in rows}


def cli(settings: Settings, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "metering_pipeline.cli", *args],
        env={**os.environ, **settings_env(settings)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


async def test_definitions_on_auto_created_multi_partition_topics_all_take_effect_in_worker_cli_and_api(
    apache_stack, unique_name, tmp_path, isolated
):
    """The reported case: definitions published before any worker ran, onto topics the broker auto-created
    with 4 partitions; then more, and a partition added, while the worker and the API run."""
    prefix = f"{unique_name}."
    early = apache_stack.settings(topic_prefix=prefix)
    topics = Topics.of(early)
    metric_ids = await put_on_every_partition(early, topics.metrics, AUTO_CREATED_PARTITIONS, "m")
    limits = [threshold(f"t{p}", f"m{p}", f"org:o{p}", "10") for p in range(AUTO_CREATED_PARTITIONS)]
    await publish(early, [(t["id"].encode(), orjson.dumps(t), p) for p, t in enumerate(limits)], topics.thresholds)
    assert await partition_count(early, topics.metrics) == await partition_count(early, topics.thresholds) == 4

    pipeline = isolated(apache_stack, unique_name, tmp_path)
    settings, new_worker = await asyncio.to_thread(pipeline.__enter__)  # it runs its own event loop
    try:
        assert (Topics.of(settings).metrics, Topics.of(settings).thresholds) == (topics.metrics, topics.thresholds)
        topics = Topics.of(settings)
        worker = new_worker().start()
        worker.wait_healthy()
        with running_api(settings, tmp_path) as api:
            # Usage of every metric crosses its subject's threshold: counted, and each alerts twice.
            await publish(
                settings, [usage(f"u{p}", f"m{p}", f"org:o{p}", "11") for p in range(AUTO_CREATED_PARTITIONS)]
            )
            alerts = await read_json(
                settings.kafka_bootstrap, topics.alerts, 2 * AUTO_CREATED_PARTITIONS, timeout=60, settle=1
            )
            assert sorted((a["thresholdId"], a["type"]) for a in alerts) == sorted(
                (f"t{p}", kind)
                for p in range(AUTO_CREATED_PARTITIONS)
                for kind in ("threshold.approaching", "threshold.exceeded")
            )

            # While everything runs: a definition on every partition, and one on a partition added now.
            more = await put_on_every_partition(settings, topics.metrics, AUTO_CREATED_PARTITIONS, "n")
            admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
            await admin.start()
            try:
                await admin.create_partitions({topics.metrics: NewPartitions(total_count=6)})
            finally:
                await admin.close()
            await publish(settings, [(b"added", orjson.dumps(metric("added", "COUNT")), 5)], topics.metrics)
            everything = sorted(metric_ids + more + ["added"])

            def listed() -> list[str]:
                ids = sorted(m["id"] for m in api.client().get("/v1/metrics").json()["metrics"])
                assert ids == everything, "the API follows every partition"
                return ids

            await asyncio.to_thread(eventually, listed, 15)
            cli_listed = await asyncio.to_thread(cli, settings, "metric", "list", "--json")
            assert sorted(json.loads(line)["id"] for line in cli_listed.splitlines()) == everything
            assert len(cli(settings, "threshold", "list", "--json").splitlines()) == AUTO_CREATED_PARTITIONS

            # The worker counts the newest metrics too: nothing is dead-lettered as unknown_metric.
            await asyncio.sleep(3)  # past the worker's partition check
            await publish(settings, [usage("v-added", "added", "org:o9"), usage("v-n3", "n3", "org:o9", "2")])

            def counted() -> dict:
                found = monthly_totals(settings, "org", "o9")
                assert found == {"added": Decimal(1), "n3": Decimal(2)}
                return found

            await asyncio.to_thread(eventually, counted, 30)
            letters = await read_json(settings.kafka_bootstrap, topics.dead_letters, 0, settle=1)
            assert letters == []
    finally:
        await asyncio.to_thread(pipeline.__exit__, None, None, None)


async def topic_policy(settings: Settings, topic: str) -> str:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        [response] = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic, {"cleanup.policy": None})]
        )
        [(_code, _message, _type, _name, entries)] = response.resources
        return next(entry[1] for entry in entries if entry[0] == "cleanup.policy")
    finally:
        await admin.close()


async def test_definitions_topics_are_created_compacted_by_writers_and_an_uncompacted_one_is_named(
    apache_stack, unique_name
):
    settings = apache_stack.settings(topic_prefix=f"{unique_name}.")
    topics = Topics.of(settings)
    async with DefinitionWriter(settings, topics.metrics) as writer:  # what `metering metric define` and the API use
        await writer.put("m", MetricDefinition.model_validate(metric("m", "SUM")))
    assert await topic_policy(settings, topics.metrics) == "compact"

    await auto_create(settings, topics.thresholds)  # a user's producer came first
    assert await topic_policy(settings, topics.thresholds) == "delete"
    with capture_logs() as logs:
        await ensure_topics(settings, public_topics(settings))
    assert [(entry["topic"], entry["cleanup_policy"]) for entry in logs if "not compacted" in entry["event"]] == [
        (topics.thresholds, "delete")
    ]


async def test_settlement_sees_unrouted_usage_on_a_topic_its_client_never_read(pipeline):
    """Invoices turn FINAL on `processed_through`: it must find the partitions of usage.recorded from the broker,
    not from a client cache that knows no topic yet (which read as 'nothing pending')."""
    settings, new_worker = pipeline
    worker = new_worker().start()
    worker.wait_healthy()  # the groups exist, as in any deployment that bills
    worker.stop()
    await publish(settings, [usage("pending", "m", "org:o1")], None)  # no worker runs now: the record stays unrouted
    assert not await processed_through(settings, datetime.now(UTC) + timedelta(days=1), wait=1)
