"""Metric definitions on `metering.metrics`: catalog, ClickHouse mirror, metric.defined events."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from metering_pipeline.topics import Topics
from metering_pipeline.warehouse.client import connect
from support import define, eventually, metric, publish, read_json

pytestmark = pytest.mark.integration


def mirrored(settings, metric_id: str, timeout: float = 60) -> tuple:
    """The latest mirror row of a definition, once the worker has written it."""
    with connect(settings) as client:

        def row() -> tuple | None:
            rows = client.query(
                "SELECT key, aggregation_type, org_id, deleted, version FROM metric_definitions FINAL "
                "WHERE id = {id:String}",
                parameters={"id": metric_id},
            ).result_rows
            return rows[0] if rows else None

        return eventually(row, timeout, message=f"{metric_id} never reached metric_definitions")


async def test_definitions_are_mirrored_announced_updated_and_deleted(pipeline):
    settings, new_worker = pipeline
    worker = new_worker().start()
    worker.wait_healthy()

    await define(settings, metric("tokens", "sum"))
    assert (await asyncio.to_thread(mirrored, settings, "tokens"))[:4] == ("tokens", "SUM", None, 0)
    await define(settings, metric("tokens", "MAX", org_id="org-1"))

    announced = await read_json(settings.kafka_bootstrap, Topics.of(settings).events, 2)
    assert [e["type"] for e in announced] == ["metric.defined", "metric.defined"]
    assert [e["metric"]["aggregationType"] for e in announced] == ["SUM", "MAX"]
    assert announced[0]["id"] != announced[1]["id"]
    assert announced[1]["metric"]["orgId"] == "org-1"

    await asyncio.to_thread(eventually, lambda: mirrored(settings, "tokens")[1] == "MAX", 30)
    assert (await asyncio.to_thread(mirrored, settings, "tokens"))[:3] == ("tokens", "MAX", "org-1")

    # A tombstone deletes the definition: the mirror says so, and new records for it are dead letters.
    await publish(settings, [(b"tokens", None, None)], Topics.of(settings).metrics)
    await asyncio.to_thread(eventually, lambda: mirrored(settings, "tokens")[3] == 1, 30)
    assert (await asyncio.to_thread(mirrored, settings, "tokens"))[3] == 1
    await asyncio.sleep(1)  # the tombstone has reached every worker's catalog
    record = {"id": "r1", "metricKey": "tokens", "subjectType": "org", "subjectId": "org-1", "quantity": 3}
    await publish(settings, [(None, orjson.dumps(record), 0)])
    letters = await read_json(settings.kafka_bootstrap, Topics.of(settings).dead_letters, 1, settle=1)
    assert [(d["reason"], d["record"]["id"]) for d in letters] == [("unknown_metric", "r1")]
