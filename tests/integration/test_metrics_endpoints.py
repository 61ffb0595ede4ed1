"""`/metrics` of a real worker and a real API, read the way Prometheus reads them (prometheus_client's parser):
counters equal to what was published, histograms that were observed, gauges, process metrics, route templates."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from metering_pipeline.topics import Topics
from support import (
    PARTITIONS,
    define,
    eventually,
    metric,
    publish,
    read_json,
    running_api,
    set_thresholds,
    threshold,
    usage,
)

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Scrape:
    """One /metrics answer, parsed: metric types by family and sample values by name and labels."""

    def __init__(self, url: str) -> None:
        with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
            self.content_type = response.headers["Content-Type"]
            families = list(text_string_to_metric_families(response.read().decode()))
        self.types = {family.name: family.type for family in families}
        self.samples: Samples = {(s.name, frozenset(s.labels.items())): s.value for f in families for s in f.samples}

    def value(self, name: str, **labels: str) -> float | None:
        return self.samples.get((name, frozenset(labels.items())))

    def label_values(self, name: str, label: str) -> set[str]:
        return {dict(labels)[label] for sample, labels in self.samples if sample == name and label in dict(labels)}


def scrape_until(url: str, done: Callable[[Scrape], bool], timeout: float = 90) -> Scrape:
    """Scrape until `done` holds (the worker is asynchronous: counters get there, not at once)."""

    def reached() -> Scrape:
        scrape = Scrape(url)
        assert done(scrape), (
            f"last scrape: {sorted((n, v) for (n, _), v in scrape.samples.items() if n.startswith('metering_'))}"
        )
        return scrape

    return eventually(reached, timeout)


async def test_worker_metrics_count_what_was_published_and_time_flushes_alerts_and_record_age(pipeline):
    settings, new_worker = pipeline
    await define(settings, metric("tokens", "SUM"))
    await set_thresholds(settings, threshold("t1", "tokens", "org:org-1", "40"))
    worker = new_worker().start()
    worker.wait_healthy()
    await asyncio.to_thread(scrape_until, worker.url, lambda s: s.value("metering_owned_partitions") == PARTITIONS)

    records = [
        usage(f"r{i}", "tokens", f"org:org-{i % 4}", "5") for i in range(40)
    ]  # 50 per org: org-1 crosses 32, then 40
    duplicates = records[:5]
    invalid = [(b"org:org-1", b"{not json", None)]
    await publish(settings, records + duplicates + invalid)

    scrape = await asyncio.to_thread(
        scrape_until,
        worker.url,
        lambda s: (
            s.value("metering_records_counted_total") == 40
            and s.value("metering_alerts_total") == 2
            and s.value("metering_records_in_total") == 46
            and s.value("metering_buffered_records") == 0
        ),
    )
    alerts = await read_json(settings.kafka_bootstrap, Topics.of(settings).alerts, 2, settle=1)

    assert scrape.content_type.startswith("text/plain; version=")
    assert scrape.value("metering_records_accepted_total") == 45
    assert scrape.value("metering_records_duplicate_total") == 5
    assert scrape.value("metering_dead_letters_total", reason="invalid_json") == 1
    assert scrape.value("metering_alerts_total") == len(alerts) == 2
    assert scrape.types["metering_records_in"] == scrape.types["metering_alerts"] == "counter"
    for histogram in ("metering_flush_seconds", "metering_alert_latency_seconds", "metering_record_age_seconds"):
        assert scrape.types[histogram] == "histogram"
        count, total = scrape.value(f"{histogram}_count"), scrape.value(f"{histogram}_sum")
        assert count > 0 and total > 0, histogram
        assert total / count < 30, f"{histogram}: a mean of {total / count} s is not in seconds"  # e.g. ms or epoch
        assert scrape.value(f"{histogram}_bucket", le="+Inf") == count
    assert scrape.value("metering_alert_latency_seconds_count") == 2  # both alerts were fired by records
    assert scrape.value("metering_flushes_total") >= scrape.value("metering_flush_seconds_count") > 0
    assert scrape.value("metering_owned_partitions") == PARTITIONS
    assert scrape.value("metering_paused_partitions") == 0 and scrape.value("metering_writer_failing") == 0
    assert scrape.label_values("metering_consumer_lag", "stage") == {"router", "rollups"}
    assert scrape.value("process_resident_memory_bytes") > 0


def test_writer_failing_buffered_and_paused_gauges_follow_a_clickhouse_outage(private_clickhouse_pipeline):
    endpoint, settings, new_worker = private_clickhouse_pipeline
    asyncio.run(define(settings, metric("tokens", "SUM")))
    worker = new_worker(METERING_MAX_BUFFERED_RECORDS="300").start()
    worker.wait_healthy()
    calm = scrape_until(worker.url, lambda s: s.value("metering_owned_partitions") == PARTITIONS)
    assert calm.value("metering_writer_failing") == calm.value("metering_paused_partitions") == 0
    assert calm.value("metering_router_holding") == 0

    endpoint.stop()
    asyncio.run(publish(settings, [usage(f"r{n}", "tokens", f"org:o{n % 50}") for n in range(1000)]))
    down = scrape_until(
        worker.url, lambda s: s.value("metering_writer_failing") == 1 and s.value("metering_paused_partitions") > 0
    )
    assert down.value("metering_buffered_records") >= 300
    scrape_until(worker.url, lambda s: s.value("metering_router_holding") == 1)  # paused 5 s: the router holds too

    endpoint.start()
    scrape_until(
        worker.url,
        lambda s: (
            s.value("metering_records_counted_total") == 1000
            and s.value("metering_buffered_records") == 0
            and s.value("metering_writer_failing") == 0
            and s.value("metering_paused_partitions") == 0
            and s.value("metering_router_holding") == 0
        ),
        timeout=120,
    )


def test_api_metrics_count_requests_by_route_template_and_status(pipeline, tmp_path):
    settings, _ = pipeline
    asyncio.run(define(settings, metric("tokens", "SUM")))
    route = "/v1/metrics/{key}"
    with running_api(settings, tmp_path) as api:
        admin = api.client()
        eventually(
            lambda: admin.get("/v1/metrics/tokens").status_code == 200, 30
        )  # the API has followed the definition
        before = Scrape(api.url)
        assert admin.get("/v1/metrics/tokens").status_code == 200
        assert admin.get("/v1/metrics/nope").status_code == 404
        assert api.client(None).get("/v1/metrics/tokens").status_code == 401
        assert admin.get("/no/such/path").status_code == 404
        after = Scrape(api.url)

    def added(name: str, **labels: str) -> float:
        return (after.value(name, **labels) or 0) - (before.value(name, **labels) or 0)

    assert after.types["metering_api_requests"] == "counter"
    assert after.types["metering_api_request_seconds"] == "histogram"
    assert added("metering_api_requests_total", method="GET", route=route, status="200") == 1
    assert added("metering_api_requests_total", method="GET", route=route, status="404") == 1
    assert added("metering_api_requests_total", method="GET", route=route, status="401") == 1
    assert added("metering_api_requests_total", method="GET", route="unmatched", status="404") == 1
    assert added("metering_api_requests_total", method="GET", route="/metrics", status="200") == 1  # the first scrape
    assert added("metering_api_request_seconds_count", method="GET", route=route, status="404") == 1
    assert added("metering_api_request_seconds_sum", method="GET", route=route, status="404") > 0
    assert after.label_values("metering_api_requests_total", "route") <= {route, "unmatched", "/health", "/metrics"}
    assert after.value("process_resident_memory_bytes") > 0
