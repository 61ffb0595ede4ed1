"""Issue 15's read side through the real API, CLI and ClickHouse endpoint: usage.getSummary grouped by and filtered on
dimensions (exact for every aggregation type, from the right source) and in other time zones (issue 28), usage.export
filtered on dimensions, the validation of metric definitions and thresholds that name dimensions, and the dashboard's
split by a dimension.

The read-side tests set their data up by inserting usage_records and usage_rollups rows into the real ClickHouse as
the worker writes them (a total row and one row per combination of dimension values per period), so they check the
queries against a brute force over the records; the last test has the worker produce the rows from real records."""

from __future__ import annotations

import asyncio
import csv
import decimal
import io
import json
import re
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import httpx
import orjson
import pytest
from click.testing import CliRunner

from metering_pipeline.cli import main
from metering_pipeline.topics import Topics
from metering_pipeline.usage.periods import period_end, period_start
from metering_pipeline.warehouse.client import connect
from metering_pipeline.warehouse.queries import naive_utc
from metering_pipeline.warehouse.sink import RECORD_COLUMNS
from metering_schemas import PeriodType
from support import eventually, headless_chromium, read_json, running_api, settings_env

pytestmark = pytest.mark.integration

UTC = UTC
DAY = datetime(2025, 3, 10, tzinfo=UTC)
SUBJECT = ("org", "dims-1")
GROUP_BY = {"model": "$.metadata.model", "region": "$.metadata.region"}
KINDS = ("COUNT", "SUM", "AVG", "MIN", "MAX", "UNIQUE_COUNT", "LATEST")


@dataclass(frozen=True)
class Rec:
    id: str
    at: datetime
    model: str
    region: str
    user: str
    quantity: Decimal


# Chosen so that adding rows gives wrong answers: alice uses gpt-4 in eu and us (a sum of distinct counts counts her
# twice); r4 and r5 share a timestamp (LATEST takes the greater id, r5, whose quantity is not the maximum); r8 has no
# region ("").
RECORDS = [
    Rec("r1", DAY + timedelta(hours=10, minutes=5), "gpt-4", "eu", "alice", Decimal("3")),
    Rec("r2", DAY + timedelta(hours=10, minutes=20), "gpt-4", "us", "alice", Decimal("5.5")),
    Rec("r3", DAY + timedelta(hours=10, minutes=40), "mini", "eu", "bob", Decimal("2")),
    Rec("r8", DAY + timedelta(hours=10, minutes=50), "gpt-4", "", "dave", Decimal("1")),
    Rec("r4", DAY + timedelta(hours=11, minutes=10), "gpt-4", "eu", "bob", Decimal("7")),
    Rec("r5", DAY + timedelta(hours=11, minutes=10), "gpt-4", "us", "carol", Decimal("1")),
    Rec("r6", DAY + timedelta(hours=11, minutes=30), "mini", "us", "alice", Decimal("4")),
    Rec("r7", DAY + timedelta(days=1, hours=9), "gpt-4", "eu", "alice", Decimal("6")),
]


def value_of(kind: str, records: list[Rec]) -> Decimal:
    """The metric's value over these records, by brute force (the definition, not the product's code)."""
    quantities = [r.quantity for r in records]
    if kind == "COUNT":
        return Decimal(len(records))
    if kind == "SUM":
        return sum(quantities, Decimal(0))
    if kind == "AVG":
        with decimal.localcontext(decimal.Context(prec=100, rounding=decimal.ROUND_HALF_EVEN)):
            return (sum(quantities, Decimal(0)) / len(quantities)).quantize(Decimal("1e-18"))
    if kind == "MIN":
        return min(quantities)
    if kind == "MAX":
        return max(quantities)
    if kind == "UNIQUE_COUNT":
        return Decimal(len({r.user for r in records}))
    return max(records, key=lambda r: (r.at, r.id)).quantity  # LATEST


# Records on both sides of local midnights: Kathmandu's (18:15 UTC) and Kolkata's (18:30 UTC), which end March there
# too; New York's around the night its clocks went back (1:30 happened twice; that day lasted 25 hours).
ZONED_SUBJECT = ("org", "zones-1")
ZONED_FROM, ZONED_TO = datetime(2025, 2, 1, tzinfo=UTC), datetime(2025, 12, 1, tzinfo=UTC)
ZONED = [
    Rec("z1", datetime(2025, 3, 31, 18, 14, 59, 999000, tzinfo=UTC), "gpt-4", "eu", "alice", Decimal("1.5")),
    Rec("z2", datetime(2025, 3, 31, 18, 15, tzinfo=UTC), "mini", "eu", "bob", Decimal("2")),
    Rec("z3", datetime(2025, 3, 31, 18, 29, 59, 999000, tzinfo=UTC), "gpt-4", "us", "alice", Decimal("4.25")),
    Rec("z4", datetime(2025, 3, 31, 18, 30, tzinfo=UTC), "gpt-4", "eu", "carol", Decimal("8")),
    Rec("z5", datetime(2025, 11, 2, 3, 59, 59, tzinfo=UTC), "mini", "us", "alice", Decimal("16")),
    Rec("z6", datetime(2025, 11, 2, 4, tzinfo=UTC), "gpt-4", "us", "bob", Decimal("0.5")),
    Rec("z7", datetime(2025, 11, 2, 5, 30, tzinfo=UTC), "mini", "eu", "dave", Decimal("3")),
    Rec("z8", datetime(2025, 11, 2, 6, 30, tzinfo=UTC), "gpt-4", "eu", "alice", Decimal("7")),
    Rec("z9", datetime(2025, 11, 3, 4, 59, 59, tzinfo=UTC), "mini", "eu", "erin", Decimal("1")),
    Rec("z10", datetime(2025, 11, 3, 5, tzinfo=UTC), "gpt-4", "us", "bob", Decimal("9")),
]
ZONES = ["Asia/Kolkata", "Asia/Kathmandu", "America/New_York"]


def metric_key(kind: str) -> str:
    return f"dim_{kind.lower()}"


def rollup_rows(kind: str, subject: tuple[str, str], records: list[Rec]) -> list[list[object]]:
    """What the worker writes to usage_rollups for these records: per period, the total row and a row per
    combination."""
    cells: dict[tuple[PeriodType, datetime, tuple[tuple[str, str], ...]], list[Rec]] = defaultdict(list)
    for r in records:
        for period in PeriodType:
            start = period_start(period, r.at)
            cells[(period, start, ())].append(r)
            cells[(period, start, (("model", r.model), ("region", r.region)))].append(r)
    rows = []
    for (period, start, dims), members in cells.items():
        quantities = [r.quantity for r in members]
        rows.append(
            [
                metric_key(kind),
                *subject,
                period.value,
                naive_utc(start),
                naive_utc(period_end(period, start)),
                kind,
                value_of(kind, members),
                len(members),
                sum(quantities, Decimal(0)),
                min(quantities),
                max(quantities),
                1,
                dict(dims),
            ]
        )
    return rows


def record_rows(kind: str, subject: tuple[str, str], records: list[Rec]) -> list[list[object]]:
    return [
        [
            *subject,
            metric_key(kind),
            r.id,
            naive_utc(r.at),
            r.quantity,
            orjson.dumps({"model": r.model, "region": r.region, "user": r.user}).decode(),
            metric_key(kind),
            {"model": r.model, "region": r.region},
            r.user if kind == "UNIQUE_COUNT" else "",
        ]
        for r in records
    ]


def definition(kind: str) -> dict:
    body = {"key": metric_key(kind), "name": kind, "aggregationType": kind, "groupBy": GROUP_BY}
    if kind == "UNIQUE_COUNT":
        body["valueProperty"] = "$.metadata.user"
    elif kind != "COUNT":
        body["valueProperty"] = "$.metadata.amount"
    return body


def expected(
    kind: str,
    period: PeriodType,
    group_by: tuple[str, ...],
    filters: dict[str, str],
    records: list[Rec] = RECORDS,
    zone: str | None = None,
    starting_from: datetime | None = None,
) -> dict[tuple[str, tuple[tuple[str, str], ...]], tuple[Decimal, int]]:
    """{(period start, sorted dimensions): (total, records)} by brute force over the records; with `zone`, that zone's
    local periods, only those starting at or after `starting_from`."""
    cells: dict[tuple[str, tuple[tuple[str, str], ...]], list[Rec]] = defaultdict(list)
    for r in records:
        dims = {"model": r.model, "region": r.region}
        if any(dims[name] != value for name, value in filters.items()):
            continue
        labels = {**{name: dims[name] for name in group_by}, **filters}
        start = period_start(period, r.at) if zone is None else local_start(period, r.at, ZoneInfo(zone))
        if starting_from is None or start >= starting_from:
            cells[(iso(start), tuple(sorted(labels.items())))].append(r)
    return {key: (value_of(kind, members), len(members)) for key, members in cells.items()}


def local_start(period: PeriodType, at: datetime, zone: ZoneInfo) -> datetime:
    """The local period's start by the wall clock (none of ZONED is near a clock change's gap)."""
    local = at.astimezone(zone)
    floor = {"minute": 0, "second": 0, "microsecond": 0}
    if period is not PeriodType.HOURLY:
        floor["hour"] = 0
    if period is PeriodType.MONTHLY:
        floor["day"] = 1
    return local.replace(**floor).astimezone(UTC)


def iso(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def got(summaries: list[dict]) -> dict[tuple[str, tuple[tuple[str, str], ...]], tuple[Decimal, int]]:
    return {
        (
            iso(datetime.fromisoformat(s["periodStart"].replace("Z", "+00:00"))),
            tuple(sorted(s["dimensions"].items())),
        ): (Decimal(s["totalQuantity"]), s["recordCount"])
        for s in summaries
    }


def insert(settings, subject: tuple[str, str], records: list[Rec]) -> None:
    with connect(settings) as client:
        for kind in KINDS:
            client.insert(
                "usage_records",
                record_rows(kind, subject, records),
                column_names=RECORD_COLUMNS,
            )
            client.insert(
                "usage_rollups",
                rollup_rows(kind, subject, records),
                column_names=[
                    "metric_key",
                    "subject_type",
                    "subject_id",
                    "period_type",
                    "period_start",
                    "period_end",
                    "aggregation_type",
                    "total_quantity",
                    "record_count",
                    "sum_quantity",
                    "min_quantity",
                    "max_quantity",
                    "version",
                    "dimensions",
                ],
            )


@pytest.fixture(scope="module")
def api(module_pipeline, tmp_path_factory):
    settings, _ = module_pipeline
    with running_api(settings, tmp_path_factory.mktemp("api")) as started:
        admin = started.client()
        for kind in KINDS:
            created = admin.post("/v1/metrics", json=definition(kind))
            assert created.status_code == 201, created.text
        assert (
            admin.post("/v1/metrics", json={"key": "dim_plain", "name": "plain", "aggregationType": "SUM"}).status_code
            == 201
        )
        insert(settings, SUBJECT, RECORDS)
        insert(settings, ZONED_SUBJECT, ZONED)
        yield started


def summary(
    client: httpx.Client, kind: str, period: str = "DAILY", subject: tuple[str, str] = SUBJECT, **extra
) -> httpx.Response:
    params = [
        ("metricKey", metric_key(kind)),
        ("subjectType", subject[0]),
        ("subjectId", subject[1]),
        ("periodType", period),
        ("from", iso(period_start(PeriodType(period), DAY))),
        ("to", iso(DAY + timedelta(days=2))),
    ]  # periods that start in [from, to)
    for name, value in extra.items():
        params += [(name, v) for v in value] if isinstance(value, list) else [(name, value)]
    return client.get("/v1/usage/summary", params=params)


@pytest.mark.parametrize("kind", KINDS)
def test_get_summary_without_dimensions_reads_only_the_total_rows(api, kind):
    response = summary(api.client(), kind)
    assert response.status_code == 200, response.text
    assert got(response.json()["summaries"]) == expected(kind, PeriodType.DAILY, (), {})
    assert all(s["dimensions"] == {} for s in response.json()["summaries"])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("period", ["HOURLY", "DAILY", "MONTHLY"])
def test_grouping_by_every_dimension_returns_each_combination_row(api, kind, period):
    response = summary(api.client(), kind, period, groupBy=["model", "region"])
    assert response.status_code == 200, response.text
    assert got(response.json()["summaries"]) == expected(kind, PeriodType(period), ("model", "region"), {})


@pytest.mark.parametrize("kind", KINDS)
def test_grouping_by_a_subset_merges_rows_exactly_or_reads_the_records_for_unique_count_and_latest(api, kind):
    response = summary(api.client(), kind, groupBy="model")
    assert response.status_code == 200, response.text
    found = got(response.json()["summaries"])
    assert found == expected(kind, PeriodType.DAILY, ("model",), {})
    gpt4_day = found[(iso(DAY), (("model", "gpt-4"),))]
    if kind == "UNIQUE_COUNT":  # alice, bob, carol, dave: the combination rows (2 + 2 + 1) would say 5
        assert gpt4_day == (Decimal(4), 5)
    if kind == "LATEST":  # r5 (11:10, the greater id of a tie), not r4's 7, the greatest row value
        assert gpt4_day == (Decimal(1), 5)


@pytest.mark.parametrize("kind", KINDS)
def test_filter_group_by_restricts_to_a_dimension_value_with_or_without_group_by(api, kind):
    client = api.client()
    only_eu = summary(client, kind, **{"filterGroupBy[region]": "eu"})
    assert only_eu.status_code == 200, only_eu.text
    assert got(only_eu.json()["summaries"]) == expected(kind, PeriodType.DAILY, (), {"region": "eu"})
    assert {json.dumps(s["dimensions"]) for s in only_eu.json()["summaries"]} == {'{"region": "eu"}'}
    per_model = summary(client, kind, "HOURLY", groupBy="model", **{"filterGroupBy[region]": "us"})
    assert got(per_model.json()["summaries"]) == expected(kind, PeriodType.HOURLY, ("model",), {"region": "us"})
    exact = summary(
        client, kind, groupBy=["model", "region"], **{"filterGroupBy[model]": "gpt-4", "filterGroupBy[region]": ""}
    )
    assert got(exact.json()["summaries"]) == expected(
        kind, PeriodType.DAILY, ("model", "region"), {"model": "gpt-4", "region": ""}
    )
    assert len(exact.json()["summaries"]) == 1  # r8, the record without a region


def test_one_period_with_a_filter_and_no_usage_is_zero_and_a_grouped_one_is_empty(api):
    client = api.client()
    params = {
        "metricKey": "dim_sum",
        "subjectType": "org",
        "subjectId": "dims-1",
        "periodType": "DAILY",
        "periodStart": iso(DAY),
    }
    [none] = client.get("/v1/usage/summary", params={**params, "filterGroupBy[model]": "nope"}).json()["summaries"]
    assert (none["totalQuantity"], none["recordCount"], none["dimensions"]) == ("0", 0, {"model": "nope"})
    assert client.get(
        "/v1/usage/summary", params={**params, "groupBy": "model", "filterGroupBy[model]": "nope"}
    ).json() == {"summaries": []}
    [one] = client.get("/v1/usage/summary", params={**params, "filterGroupBy[model]": "mini"}).json()["summaries"]
    assert (one["totalQuantity"], one["recordCount"]) == ("6", 2)


def zoned_summary(client: httpx.Client, kind: str, period: str, zone: str, **extra) -> httpx.Response:
    params = {
        "metricKey": metric_key(kind),
        "subjectType": ZONED_SUBJECT[0],
        "subjectId": ZONED_SUBJECT[1],
        "periodType": period,
        "from": iso(ZONED_FROM),
        "to": iso(ZONED_TO),
        "timeZone": zone,
        **extra,
    }
    return client.get("/v1/usage/summary", params=params)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("zone", ZONES)
@pytest.mark.parametrize("period", ["HOURLY", "DAILY", "MONTHLY"])
def test_a_summary_in_another_zone_is_each_local_periods_records_exactly(api, kind, zone, period):
    response = zoned_summary(api.client(), kind, period, zone)
    assert response.status_code == 200, response.text
    summaries = response.json()["summaries"]
    assert got(summaries) == expected(kind, PeriodType(period), (), {}, ZONED, zone, ZONED_FROM)
    assert {s["timeZone"] for s in summaries} == {zone}
    for s in summaries:  # each period's bounds are the zone's local boundaries
        start = datetime.fromisoformat(s["periodStart"].replace("Z", "+00:00"))
        end = datetime.fromisoformat(s["periodEnd"].replace("Z", "+00:00"))
        assert local_start(PeriodType(period), start, ZoneInfo(zone)) == start
        assert local_start(PeriodType(period), end, ZoneInfo(zone)) == end > start


@pytest.mark.parametrize("kind", KINDS)
def test_a_summary_in_another_zone_groups_and_filters_by_dimensions_exactly(api, kind):
    response = zoned_summary(
        api.client(), kind, "DAILY", "Asia/Kolkata", groupBy="model", **{"filterGroupBy[region]": "eu"}
    )
    assert response.status_code == 200, response.text
    assert got(response.json()["summaries"]) == expected(
        kind, PeriodType.DAILY, ("model",), {"region": "eu"}, ZONED, "Asia/Kolkata", ZONED_FROM
    )


def test_one_local_period_by_its_start_and_an_unknown_zone(api):
    client = api.client()
    params = {"metricKey": "dim_sum", "subjectType": "org", "subjectId": "zones-1", "periodType": "DAILY"}
    # New York's 2 November 2025 lasted 25 hours: z6, z7, z8, z9.
    [day] = client.get(
        "/v1/usage/summary", params={**params, "periodStart": "2025-11-02T12:00:00Z", "timeZone": "America/New_York"}
    ).json()["summaries"]
    assert (day["periodStart"], day["periodEnd"], day["totalQuantity"], day["recordCount"], day["timeZone"]) == (
        "2025-11-02T04:00:00Z",
        "2025-11-03T05:00:00Z",
        "11.5",
        4,
        "America/New_York",
    )
    [empty] = client.get(
        "/v1/usage/summary", params={**params, "periodStart": "2025-06-01T12:00:00Z", "timeZone": "Asia/Kolkata"}
    ).json()["summaries"]
    assert (empty["periodStart"], empty["totalQuantity"], empty["recordCount"]) == ("2025-05-31T18:30:00Z", "0", 0)
    refused = client.get("/v1/usage/summary", params={**params, "timeZone": "Mars/Olympus_Mons"})
    assert refused.status_code == 422, refused.text
    assert (refused.json()["error"], [e["field"] for e in refused.json()["errors"]]) == (
        "invalid_time_zone",
        ["query.timeZone"],
    )
    assert "Mars/Olympus_Mons" in refused.json()["message"]


def test_unknown_or_malformed_dimensions_are_refused_with_a_field_error(api):
    client = api.client()
    cases = [
        ({"groupBy": "tier"}, "dim_sum", "unknown_dimension", "query.groupBy"),
        ({"filterGroupBy[tier]": "pro"}, "dim_sum", "unknown_dimension", "query.filterGroupBy[tier]"),
        ({"groupBy": "model"}, "dim_plain", "unknown_dimension", "query.groupBy"),  # a metric without groupBy
        ({"filterGroupBy": "model:gpt-4"}, "dim_sum", "validation_error", "query.filterGroupBy"),
        ({"groupBy": "has space"}, "dim_sum", "validation_error", "query.groupBy"),
        ({"groupBy": "model"}, "no_such_metric", "unknown_metric", "query.metricKey"),
    ]
    for extra, metric, code, field in cases:
        response = client.get(
            "/v1/usage/summary", params={"metricKey": metric, "subjectType": "org", "subjectId": "dims-1", **extra}
        )
        assert response.status_code == 422, (extra, response.text)
        body = response.json()
        assert (body["error"], [e["field"] for e in body["errors"]]) == (code, [field]), extra
    tier = client.get(
        "/v1/usage/summary",
        params={"metricKey": "dim_sum", "subjectType": "org", "subjectId": "dims-1", "groupBy": "tier"},
    )
    assert "model, region" in tier.json()["message"]


def test_export_filters_on_dimensions_and_ends_each_row_with_its_dimensions(api):
    client = api.client()
    window = {"from": iso(DAY), "to": iso(DAY + timedelta(days=2)), "metricKey": "dim_sum"}
    lines = client.get(
        "/v1/usage/export", params={**window, "format": "jsonl", "filterGroupBy[model]": "gpt-4"}
    ).text.splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["id"] for r in rows] == ["r1", "r2", "r8", "r4", "r5", "r7"]
    assert list(rows[0])[-1] == "dimensions" and rows[0]["dimensions"] == {"model": "gpt-4", "region": "eu"}
    both = client.get(
        "/v1/usage/export",
        params={**window, "format": "csv", "filterGroupBy[model]": "gpt-4", "filterGroupBy[region]": "us"},
    )
    table = list(csv.reader(io.StringIO(both.text)))
    assert table[0] == [
        "id",
        "metricKey",
        "subjectType",
        "subjectId",
        "quantity",
        "timestamp",
        "metadata",
        "dimensions",
    ]
    assert [(r[0], json.loads(r[-1])) for r in table[1:]] == [
        ("r2", {"model": "gpt-4", "region": "us"}),
        ("r5", {"model": "gpt-4", "region": "us"}),
    ]
    everything = client.get("/v1/usage/export", params={**window, "format": "jsonl"}).text.splitlines()
    assert len(everything) == len(RECORDS)
    # Across metrics (no metricKey) any well-formed name filters; with a metricKey the name must be its dimension.
    across = client.get(
        "/v1/usage/export",
        params={"from": iso(DAY), "to": iso(DAY + timedelta(days=2)), "format": "jsonl", "filterGroupBy[region]": "eu"},
    ).text.splitlines()
    assert len(across) == len(KINDS) * 4  # r1, r3, r4, r7 of every metric
    refused = client.get("/v1/usage/export", params={**window, "filterGroupBy[tier]": "pro"})
    assert (refused.status_code, refused.json()["error"]) == (422, "unknown_dimension")
    parquet = client.get("/v1/usage/export", params={**window, "format": "parquet", "filterGroupBy[model]": "mini"})
    assert parquet.status_code == 200 and parquet.content[:4] == b"PAR1"


def test_metric_definitions_with_value_property_group_by_and_filter(api):
    admin = api.client()
    body = {
        "key": "dim_tokens",
        "name": "Tokens",
        "aggregationType": "SUM",
        "valueProperty": "$.metadata.tokens",
        "groupBy": {"model": "$.metadata.model"},
        "filter": {"$.metadata.region": ["eu", "us"]},
    }
    created = admin.post("/v1/metrics", json=body)
    assert created.status_code == 201, created.text
    assert {k: created.json()[k] for k in ("valueProperty", "groupBy", "filter")} == {
        k: body[k] for k in ("valueProperty", "groupBy", "filter")
    }
    assert admin.get("/v1/metrics/dim_tokens").json()["groupBy"] == {"model": "$.metadata.model"}
    no_value = admin.post("/v1/metrics", json={"key": "dim_users", "name": "Users", "aggregationType": "UNIQUE_COUNT"})
    assert (no_value.status_code, no_value.json()["error"]) == (422, "validation_error")
    assert "valueProperty" in no_value.json()["message"]
    bad_path = admin.post("/v1/metrics", json={**body, "key": "dim_bad", "groupBy": {"model": "model"}})
    assert bad_path.status_code == 422 and bad_path.json()["errors"][0]["field"].startswith("body.groupBy")
    changed = admin.put(
        "/v1/metrics/dim_tokens", json={"groupBy": {"model": "$.metadata.model", "tier": "$.metadata.tier"}}
    )
    assert changed.status_code == 200 and set(changed.json()["groupBy"]) == {"model", "tier"}
    # An update is checked as a whole definition: UNIQUE_COUNT still needs a valueProperty.
    assert (
        admin.post("/v1/metrics", json={"key": "dim_calls", "name": "Calls", "aggregationType": "COUNT"}).status_code
        == 201
    )
    to_unique = admin.put("/v1/metrics/dim_calls", json={"aggregationType": "UNIQUE_COUNT"})
    assert (to_unique.status_code, to_unique.json()["error"]) == (422, "validation_error")
    assert admin.get("/v1/metrics/dim_calls").json()["aggregationType"] == "COUNT"


def test_threshold_dimensions_must_name_every_groupby_dimension_of_its_metric(api):
    admin = api.client()
    base = {"metricKey": "dim_sum", "subjectType": "org", "subjectId": "dims-1", "threshold": 10}
    for dimensions in ({"model": "gpt-4"}, {"model": "gpt-4", "region": "eu", "tier": "x"}, {"tier": "x"}):
        refused = admin.post("/v1/thresholds", json={**base, "dimensions": dimensions})
        assert refused.status_code == 422, refused.text
        assert (refused.json()["error"], refused.json()["errors"][0]["field"]) == (
            "invalid_dimensions",
            "body.dimensions",
        )
    assert "expected: model, region" in refused.json()["message"]
    plain = admin.post("/v1/thresholds", json={**base, "metricKey": "dim_plain", "dimensions": {"model": "a"}})
    assert (plain.status_code, plain.json()["error"]) == (422, "invalid_dimensions")
    created = admin.post(
        "/v1/thresholds", json={**base, "id": "dim-t1", "dimensions": {"model": "gpt-4", "region": "eu"}}
    )
    assert created.status_code == 201 and created.json()["dimensions"] == {"model": "gpt-4", "region": "eu"}
    total = admin.post("/v1/thresholds", json={**base, "id": "dim-t2"})
    assert total.status_code == 201 and total.json()["dimensions"] == {}


def cli(settings, *args: str):
    return CliRunner().invoke(main, list(args), env=settings_env(settings), catch_exceptions=False)


def test_cli_summary_groups_and_filters_like_the_api(api):
    settings = api.settings
    window = ["--from", DAY.strftime("%Y-%m-%d"), "--to", (DAY + timedelta(days=2)).strftime("%Y-%m-%d")]
    result = cli(
        settings,
        "summary",
        "--metric",
        "dim_unique_count",
        "--subject",
        "org:dims-1",
        "--period",
        "DAILY",
        *window,
        "--group-by",
        "model",
        "--json",
    )
    assert result.exit_code == 0, result.output
    assert got([json.loads(line) for line in result.stdout.splitlines()]) == expected(
        "UNIQUE_COUNT", PeriodType.DAILY, ("model",), {}
    )
    filtered = cli(
        settings,
        "summary",
        "--metric",
        "dim_latest",
        "--subject",
        "org:dims-1",
        "--period",
        "HOURLY",
        *window,
        "--group-by",
        "model",
        "--filter-group-by",
        "region=us",
        "--json",
    )
    assert got([json.loads(line) for line in filtered.stdout.splitlines()]) == expected(
        "LATEST", PeriodType.HOURLY, ("model",), {"region": "us"}
    )
    table = cli(
        settings,
        "summary",
        "--metric",
        "dim_sum",
        "--subject",
        "org:dims-1",
        "--period",
        "DAILY",
        *window,
        "--group-by",
        "model",
    ).stdout.splitlines()
    assert table[0].split() == ["period", "start", "(UTC)", "period", "end", "model", "total", "records"]
    assert table[2].split()[-3:] == ["gpt-4", "17.5", "5"]
    totals = cli(
        settings, "summary", "--metric", "dim_sum", "--subject", "org:dims-1", "--period", "DAILY", *window, "--json"
    )
    assert got([json.loads(line) for line in totals.stdout.splitlines()]) == expected("SUM", PeriodType.DAILY, (), {})
    unknown = cli(settings, "summary", "--metric", "dim_sum", "--subject", "org:dims-1", "--group-by", "tier")
    assert unknown.exit_code == 2 and "'tier' is not a dimension of metric 'dim_sum'" in unknown.stderr
    malformed = cli(settings, "summary", "--metric", "dim_sum", "--subject", "org:dims-1", "--filter-group-by", "model")
    assert malformed.exit_code == 2 and "NAME=VALUE" in malformed.stderr


def test_cli_summary_in_a_time_zone_agrees_with_the_records(api):
    settings = api.settings
    window = ["--from", "2025-02-01", "--to", "2025-12-01"]
    base = ["summary", "--metric", "dim_max", "--subject", "org:zones-1", "--period", "DAILY", *window]
    result = cli(settings, *base, "--time-zone", "America/New_York", "--json")
    assert result.exit_code == 0, result.output
    # --from is read in the zone: New York's 1 February starts at 05:00 UTC.
    starting = datetime(2025, 2, 1, 5, tzinfo=UTC)
    assert got([json.loads(line) for line in result.stdout.splitlines()]) == expected(
        "MAX", PeriodType.DAILY, (), {}, ZONED, "America/New_York", starting
    )
    table = cli(settings, *base, "--time-zone", "America/New_York")
    assert "period start (America/New_York)" in table.stdout  # local times: the 25-hour day, its maximum and records
    assert re.search(r"^2025-11-02 00:00 +2025-11-03 00:00 +7 +4$", table.stdout, re.MULTILINE), table.stdout
    refused = cli(settings, *base, "--time-zone", "Mars/Olympus_Mons")
    assert refused.exit_code == 2 and "unknown time zone 'Mars/Olympus_Mons'" in refused.output


def test_cli_defines_metrics_that_read_the_payload_and_thresholds_on_a_dimension_row(api):
    settings = api.settings
    defined = cli(
        settings,
        "metric",
        "define",
        "--key",
        "dim_cli",
        "--name",
        "CLI",
        "--aggregation",
        "unique_count",
        "--value-property",
        "$.metadata.user",
        "--group-by",
        "model=$.metadata.model",
        "--group-by",
        "region=$.metadata.region",
        "--filter",
        "$.metadata.tier=pro,team",
    )
    assert defined.exit_code == 0, defined.output
    got_back = json.loads(cli(settings, "metric", "get", "dim_cli", "--json").stdout)
    assert (got_back["valueProperty"], got_back["groupBy"], got_back["filter"]) == (
        "$.metadata.user",
        {"model": "$.metadata.model", "region": "$.metadata.region"},
        {"$.metadata.tier": ["pro", "team"]},
    )
    missing = cli(settings, "metric", "define", "--key", "dim_cli2", "--name", "x", "--aggregation", "unique_count")
    assert missing.exit_code == 2 and "valueProperty" in missing.stderr

    partial = cli(
        settings,
        "threshold",
        "create",
        "--metric",
        "dim_cli",
        "--subject",
        "org:dims-1",
        "--threshold",
        "3",
        "--dimension",
        "model=gpt-4",
    )
    assert partial.exit_code == 2 and "expected: model, region" in partial.stderr
    created = cli(
        settings,
        "threshold",
        "create",
        "--metric",
        "dim_cli",
        "--subject",
        "org:dims-1",
        "--threshold",
        "3",
        "--dimension",
        "model=gpt-4",
        "--dimension",
        "region=eu",
        "--id",
        "dim-cli-t",
    )
    assert created.exit_code == 0, created.output
    listed = [
        json.loads(line)
        for line in cli(settings, "threshold", "list", "--metric", "dim_cli", "--json").stdout.splitlines()
    ]
    assert [(t["id"], t["dimensions"]) for t in listed] == [("dim-cli-t", {"model": "gpt-4", "region": "eu"})]


def test_dashboard_splits_a_metric_by_a_dimension_in_a_real_browser(api, tmp_path):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    # The dashboard shows recent usage: a subject of its own with records of this month.
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    recent = [
        Rec(f"n{i}", now + timedelta(seconds=i), model, region, user, q)
        for i, (model, region, user, q) in enumerate(
            [("gpt-4", "eu", "a", Decimal(3)), ("gpt-4", "us", "b", Decimal(4)), ("mini", "eu", "a", Decimal(2))]
        )
    ]
    insert(api.settings, ("org", "dims-ui"), recent)
    with headless_chromium(tmp_path / "chromium") as driver:
        driver.get(f"{api.url}/ui?subject=org:dims-ui")
        driver.find_element(By.ID, "api-key").send_keys(api.keys["reader"])
        Select(driver.find_element(By.ID, "period-type")).select_by_value("HOURLY")
        driver.find_element(By.ID, "show").click()
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded"))
        assert driver.find_element(By.TAG_NAME, "body").get_attribute("data-loaded") == "ok", driver.find_element(
            By.ID, "message"
        ).text
        split = driver.find_element(By.CSS_SELECTOR, '.chart[data-metric="dim_sum"] .split')
        assert split.get_attribute("data-dimension") == "model"
        rows = {
            r.get_attribute("data-value"): r.find_element(By.CSS_SELECTOR, "td.total").text
            for r in split.find_elements(By.CSS_SELECTOR, "tbody tr")
        }
        assert rows == {"gpt-4": "7", "mini": "2"}
        Select(split.find_element(By.TAG_NAME, "select")).select_by_value("region")

        def split_by_region(d) -> bool:  # the split is drawn again: look it up afresh each time
            found = d.find_element(By.CSS_SELECTOR, '.chart[data-metric="dim_sum"] .split')
            return found.get_attribute("data-dimension") == "region" and {
                r.get_attribute("data-value") for r in found.find_elements(By.CSS_SELECTOR, "tbody tr")
            } == {"eu", "us"}

        WebDriverWait(driver, 10, ignored_exceptions=(StaleElementReferenceException,)).until(split_by_region)
        split = driver.find_element(By.CSS_SELECTOR, '.chart[data-metric="dim_sum"] .split')
        by_region = {
            r.get_attribute("data-value"): r.find_element(By.CSS_SELECTOR, "td.total").text
            for r in split.find_elements(By.CSS_SELECTOR, "tbody tr")
        }
        assert by_region == {"eu": "5", "us": "4"}
        unique = driver.find_element(By.CSS_SELECTOR, '.chart[data-metric="dim_unique_count"] .split')
        assert {
            r.get_attribute("data-value"): r.find_element(By.CSS_SELECTOR, "td.total").text
            for r in unique.find_elements(By.CSS_SELECTOR, "tbody tr")
        } == {"gpt-4": "2", "mini": "1"}
        assert not driver.find_elements(By.CSS_SELECTOR, '.chart[data-metric="dim_plain"] .split')
        driver.save_screenshot(str(tmp_path / "dashboard-split.png"))


def test_the_workers_dimension_rows_answer_grouped_and_filtered_queries_exactly(module_pipeline, api):
    """Records through the real broker and worker: what getSummary and export answer equals the brute force."""
    settings, new_worker = module_pipeline
    worker = new_worker(METERING_LOG_LEVEL="INFO").start()
    worker.wait_healthy()
    admin = api.client()
    # Two hours of records ending before now (the API refuses future timestamps), hour and tie structure kept.
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)
    subject = ("org", "dims-live")
    live = [Rec(r.id, now + (r.at - DAY) % timedelta(hours=2), r.model, r.region, r.user, r.quantity) for r in RECORDS]
    for kind in KINDS:
        # A record id is unique per subject (the worker deduplicates on it): one id per metric; ties keep their order.
        batch = {
            "records": [
                {
                    "id": f"{kind.lower()}-{r.id}",
                    "metricKey": metric_key(kind),
                    "subjectType": subject[0],
                    "subjectId": subject[1],
                    "quantity": "1",
                    "timestamp": iso(r.at),
                    "metadata": {
                        "model": r.model,
                        **({"region": r.region} if r.region else {}),
                        "user": r.user,
                        "amount": str(r.quantity),
                    },
                }
                for r in live
            ]
        }
        accepted = admin.post(
            "/v1/usage/batch", json=batch
        )  # quantity 1; the metrics read `amount` (UNIQUE_COUNT: `user`)
        assert accepted.status_code == 202, accepted.text
    window = {"from": iso(now), "to": iso(now + timedelta(hours=3))}

    def hourly(kind: str) -> list[tuple[str, str]]:
        return [
            ("metricKey", metric_key(kind)),
            ("subjectType", subject[0]),
            ("subjectId", subject[1]),
            ("periodType", "HOURLY"),
            *window.items(),
        ]

    def counted(kind: str) -> int:
        return sum(s["recordCount"] for s in admin.get("/v1/usage/summary", params=hourly(kind)).json()["summaries"])

    def why_not() -> str:
        """What the worker made of the records: its dead letters, the records and rollups it wrote, its counters."""
        dead = asyncio.run(read_json(settings.kafka_bootstrap, Topics.of(settings).dead_letters, 0, settle=3))
        with connect(settings) as client:
            stored = client.query(
                "SELECT metric_key, count(), groupUniqArray(toString(dimensions)) FROM usage_records "
                "WHERE subject_id = 'dims-live' GROUP BY metric_key"
            ).result_rows
            rolled = client.query(
                "SELECT metric_key, count() FROM usage_rollups WHERE subject_id = 'dims-live' GROUP BY metric_key"
            ).result_rows
        counters = [
            line
            for line in httpx.get(f"{worker.url}/metrics").text.splitlines()
            if line.startswith("metering_records") or "filtered" in line
        ]
        counts = {kind: counted(kind) for kind in KINDS}
        return (
            f"counted {counts} of {len(live)} each; dead letters: {dead[:3]}; records: {stored}; rollups: {rolled}; "
            f"{counters}"
        )

    eventually(lambda: all(counted(kind) >= len(live) for kind in KINDS), 90, interval=0.5, message=why_not)
    for kind in KINDS:
        params = hourly(kind)
        totals = admin.get("/v1/usage/summary", params=params).json()["summaries"]
        assert got(totals) == expected(kind, PeriodType.HOURLY, (), {}, live)
        for period in ("HOURLY", "DAILY"):
            for group_by, filters in (
                (["model", "region"], {}),
                (["model"], {}),
                ([], {"region": "eu"}),
                (["region"], {"model": "gpt-4"}),
            ):
                extra = [("groupBy", g) for g in group_by] + [(f"filterGroupBy[{k}]", v) for k, v in filters.items()]
                p = [
                    *params[:3],
                    ("periodType", period),
                    ("from", iso(period_start(PeriodType(period), now))),
                    ("to", window["to"]),
                    *extra,
                ]
                response = admin.get("/v1/usage/summary", params=p)
                assert response.status_code == 200, response.text
                assert got(response.json()["summaries"]) == expected(
                    kind, PeriodType(period), tuple(group_by), filters, live
                ), (kind, period, group_by, filters)
    exported = admin.get(
        "/v1/usage/export",
        params={
            **window,
            "format": "jsonl",
            "metricKey": "dim_sum",
            "subjectType": "org",
            "subjectId": "dims-live",
            "filterGroupBy[model]": "mini",
        },
    )
    assert sorted(json.loads(line)["id"] for line in exported.text.splitlines()) == ["sum-r3", "sum-r6"]
