"""What a real worker emits, read as a consumer reads it: every metric.defined, usage.aggregated and
threshold alert validates against its shipped JSON Schema file and is exactly what its model writes."""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from decimal import Decimal

import jsonschema
import pytest
from aiokafka import AIOKafkaConsumer
from pydantic import BaseModel

from metering_pipeline.topics import Topics
from metering_schemas import MetricDefined, ThresholdAlert, UsageAggregated
from metering_schemas.json_schema import SCHEMA_DIR
from support import define, eventually, metric, publish, set_thresholds, summary_rows, threshold, usage

pytestmark = pytest.mark.integration

BIG = "12345678901234567890.123456789012345678"  # the largest quantity a UsageRecord carries


class TopicReader:
    """Reads whole topics from the start, as a consumer of the product would (read_committed), by topic."""

    def __init__(self, bootstrap: str, topics: list[str]) -> None:
        self.consumer = AIOKafkaConsumer(
            *topics, bootstrap_servers=bootstrap, auto_offset_reset="earliest", isolation_level="read_committed"
        )
        self.values: dict[str, list[bytes]] = defaultdict(list)

    async def __aenter__(self) -> TopicReader:
        await self.consumer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.consumer.stop()

    async def _poll(self) -> None:
        for tp, messages in (await self.consumer.getmany(timeout_ms=300)).items():
            self.values[tp.topic].extend(m.value for m in messages)

    async def until(self, topic: str, count: int, timeout: float = 90) -> list[bytes]:
        """Wait until `topic` has at least `count` values; all of them so far."""
        async with asyncio.timeout(timeout):
            while len(self.values[topic]) < count:
                await self._poll()
        return self.values[topic]

    async def settle(self, seconds: float) -> None:
        """Keep reading for a while, so that anything emitted beyond what was awaited is counted too."""
        deadline = asyncio.get_running_loop().time() + seconds
        while asyncio.get_running_loop().time() < deadline:
            await self._poll()


def conforming(raw: list[bytes], model: type[BaseModel], schema_file: str) -> list[dict]:
    """Each value validated against the JSON Schema file and byte-identical to its model's serialization."""
    validator = jsonschema.Draft202012Validator(json.loads((SCHEMA_DIR / schema_file).read_text()))
    events = []
    for value in raw:
        event = json.loads(value)
        validator.validate(event)
        assert model.model_validate_json(value).to_json() == value
        events.append(event)
    return events


async def test_every_emitted_event_matches_its_json_schema_file(pipeline):
    settings, new_worker = pipeline
    topics = Topics.of(settings)
    await define(settings, metric("tokens", "SUM"), metric("calls", "COUNT", reset="DAILY"))
    await set_thresholds(settings, threshold("t1", "tokens", "org:org-1", "100"))
    worker = new_worker().start()
    worker.wait_healthy()

    async with TopicReader(settings.kafka_bootstrap, [topics.events, topics.usage_aggregated, topics.alerts]) as reader:
        await reader.until(topics.events, 2)
        # One record per step, awaited: each step is one checkpoint with one change per period (hour, day, month).
        await publish(settings, [usage("r1", "tokens", "org:org-1", "50")])
        await reader.until(topics.usage_aggregated, 3)
        await publish(settings, [usage("r2", "tokens", "org:org-1", BIG)])  # past 80 and 100 at once
        await reader.until(topics.usage_aggregated, 6)
        await reader.until(topics.alerts, 2)
        await reader.settle(3)

    defined = conforming(reader.values[topics.events], MetricDefined, "metric-defined.schema.json")
    aggregated = conforming(reader.values[topics.usage_aggregated], UsageAggregated, "usage-aggregated.schema.json")
    alerts = conforming(reader.values[topics.alerts], ThresholdAlert, "threshold-alert.schema.json")

    assert sorted((e["type"], e["metric"]["id"]) for e in defined) == [
        ("metric.defined", "calls"),
        ("metric.defined", "tokens"),
    ]
    total = (
        "12345678901234567940.123456789012345678"  # 50 + BIG, every digit (more than a default Decimal context keeps)
    )
    assert sorted((e["periodType"], e["recordCount"], e["totalQuantity"]) for e in aggregated) == [
        ("DAILY", 1, "50"),
        ("DAILY", 2, total),
        ("HOURLY", 1, "50"),
        ("HOURLY", 2, total),
        ("MONTHLY", 1, "50"),
        ("MONTHLY", 2, total),
    ]
    assert {e["type"] for e in aggregated} == {"usage.aggregated"}
    assert [(a["type"], a["thresholdId"], a["value"], a["threshold"]) for a in alerts] == [
        ("threshold.approaching", "t1", total, "100"),
        ("threshold.exceeded", "t1", total, "100"),
    ]
    assert len({a["id"] for a in alerts}) == 2


async def test_usage_aggregated_can_be_turned_off_and_everything_else_still_flows(pipeline):
    settings, new_worker = pipeline
    topics = Topics.of(settings)
    await define(settings, metric("tokens", "SUM"))
    await set_thresholds(settings, threshold("t1", "tokens", "org:org-1", "100"))
    worker = new_worker(METERING_PUBLISH_USAGE_AGGREGATED="false").start()
    worker.wait_healthy()

    def summary() -> list[tuple[str, Decimal, int]]:
        return sorted((key[2], total, count) for key, (total, count) in summary_rows(settings, ["tokens"]).items())

    summed = [("DAILY", Decimal(110), 2), ("HOURLY", Decimal(110), 2), ("MONTHLY", Decimal(110), 2)]
    async with TopicReader(settings.kafka_bootstrap, [topics.usage_aggregated, topics.alerts]) as reader:
        await publish(settings, [usage("r1", "tokens", "org:org-1", "50"), usage("r2", "tokens", "org:org-1", "60")])
        await reader.until(topics.alerts, 2)
        await asyncio.to_thread(eventually, lambda: summary() == summed, 60, message=lambda: repr(summary()))
        await reader.settle(3)

    assert reader.values[topics.usage_aggregated] == []
    assert sorted(json.loads(a)["type"] for a in reader.values[topics.alerts]) == [
        "threshold.approaching",
        "threshold.exceeded",
    ]
