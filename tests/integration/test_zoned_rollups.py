"""Rollups in subjects' time zones (issue 28) through the real worker, Kafka and ClickHouse, with a SIGKILL mid-stream:
subjects in Kolkata (+05:30), Kathmandu (+05:45), New York (across both DST changes), Lord Howe (30-minute DST) and one
whose zone changes mid-month each get local hourly, daily and monthly rows (time_zone = the zone) instead of UTC ones,
and every row equals sums computed here from the published records, grouped by the wall clock of each record's zone
with the standard library (not the worker's period arithmetic); invoices on anniversary cycles in a subject's zone
bill exactly the records of each cycle."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import orjson
import pytest

from metering_pipeline.billing.selection import Selection
from metering_pipeline.invoicing.preview import invoice_for
from metering_pipeline.invoicing.quantities import Source, priced_quantities
from metering_pipeline.topics import Topics
from metering_pipeline.warehouse.client import connect
from metering_pipeline.warehouse.queries import usage_summaries
from metering_schemas import PeriodType, Plan, SubjectSettings, Subscription
from support import define, eventually, metric, publish, usage, while_running

pytestmark = pytest.mark.integration

METRIC = "zoned_tokens"
ENV = {"METERING_ALLOWED_LATENESS": "P400D"}  # the records below are of this year's traps, months old
SINCE = datetime(2026, 1, 1, tzinfo=UTC)  # the zones below took effect before every record
CHANGE = datetime(2026, 3, 15, 18, 30, tzinfo=UTC)  # midnight in Kolkata: org:mover moves to New York there
SUBJECTS = {  # subject id -> (zone, previous zone, effective from); None: no settings (UTC)
    "kolkata": ("Asia/Kolkata", "UTC", SINCE),
    "kathmandu": ("Asia/Kathmandu", "UTC", SINCE),
    "new-york": ("America/New_York", "UTC", SINCE),
    "lord-howe": ("Australia/Lord_Howe", "UTC", SINCE),
    "mover": ("America/New_York", "Asia/Kolkata", CHANGE),
    "utc": None,
}
# Instants near the traps: local midnights, New York's 23-hour (8 March) and 25-hour (1 November) days and its repeated
# hour, Lord Howe's 30-minute shift (5 April, 02:00 → 01:30 local), 29 February absent in 2026 (28 Feb → 1 Mar).
MOMENTS = [
    datetime(2026, 2, 28, 18, 29, 59, tzinfo=UTC),
    datetime(2026, 2, 28, 18, 30, tzinfo=UTC),
    datetime(2026, 2, 28, 18, 15, tzinfo=UTC),
    datetime(2026, 3, 8, 6, 59, tzinfo=UTC),
    datetime(2026, 3, 8, 7, 0, tzinfo=UTC),
    datetime(2026, 3, 15, 18, 29, tzinfo=UTC),
    datetime(2026, 3, 15, 18, 31, tzinfo=UTC),
    datetime(2026, 3, 31, 23, 59, tzinfo=UTC),
    datetime(2026, 4, 4, 14, 45, tzinfo=UTC),
    datetime(2026, 4, 4, 15, 15, tzinfo=UTC),
    datetime(2026, 4, 4, 15, 45, tzinfo=UTC),
    datetime(2026, 11, 1, 5, 30, tzinfo=UTC),
    datetime(2026, 11, 1, 6, 30, tzinfo=UTC),
    datetime(2026, 11, 1, 23, 0, tzinfo=UTC),
]


def zone_at(subject: str, at: datetime) -> str:
    settings = SUBJECTS[subject]
    if settings is None:
        return "UTC"
    zone, previous, effective = settings
    return previous if at < effective else zone


def local_groups(
    records: list[tuple[str, datetime, Decimal]], zone: str | None = None
) -> dict[tuple[str, str, str, object], Decimal]:
    """(subject, zone, period type, wall-clock label) -> sum, by each record's local clock (of its subject's zone at
    its time, or of `zone`)."""
    sums: dict[tuple[str, str, str, object], Decimal] = defaultdict(Decimal)
    for subject, at, quantity in records:
        cut_in = zone or zone_at(subject, at)
        local = at.astimezone(ZoneInfo(cut_in))
        for period, label in (
            # An hour starts when the wall clock shows a whole hour: the offset in force then names it, so New York's
            # repeated 01:00 is two hours, and Lord Howe's 01:30–02:00 said twice stays in the one 01:00 hour.
            ("HOURLY", (local.date(), local.hour, local.replace(minute=0, second=0, microsecond=0).utcoffset())),
            ("DAILY", local.date()),
            ("MONTHLY", (local.year, local.month)),
        ):
            sums[(subject, cut_in, period, label)] += quantity
    return dict(sums)


def row_label(period: str, start: datetime, zone: str) -> object:
    local = start.astimezone(ZoneInfo(zone))
    if period == "HOURLY":
        return (local.date(), local.hour, local.utcoffset())
    return local.date() if period == "DAILY" else (local.year, local.month)


def stored_groups(settings) -> dict[tuple[str, str, str, object], Decimal]:
    with connect(settings) as client:
        rows = client.query(
            "SELECT subject_id, time_zone, period_type, period_start, total_quantity FROM usage_summary "
            "WHERE metric_key = {m:String} AND empty(dimensions)",
            parameters={"m": METRIC},
        ).result_rows
    found: dict[tuple[str, str, str, object], Decimal] = {}
    for subject, zone, period, start, total in rows:
        start = start.replace(tzinfo=UTC)
        key = (subject, zone, period, row_label(period, start, zone))
        assert key not in found, f"two rows for {key}"
        found[key] = Decimal(total)
    return found


def test_a_sigkilled_worker_keeps_every_subjects_local_rollups_exact(pipeline):
    settings, new_worker = pipeline
    topics = Topics.of(settings)
    asyncio.run(define(settings, metric(METRIC, "SUM", reset="DAILY")))
    entries = [
        (
            f"org:{subject}".encode(),
            orjson.dumps(
                {
                    "subjectType": "org",
                    "subjectId": subject,
                    "timeZone": zone,
                    "previousTimeZone": previous,
                    "effectiveFrom": effective.isoformat(),
                }
            ),
            None,
        )
        for subject, found in SUBJECTS.items()
        if found is not None
        for zone, previous, effective in [found]
    ]
    asyncio.run(publish(settings, entries, topics.subjects))
    records = [
        (subject, at + timedelta(seconds=n), Decimal(f"{n + 1}.25"))
        for n, at in enumerate(MOMENTS)
        for subject in SUBJECTS
    ]
    messages = [
        usage(f"{subject}-{n}", METRIC, f"org:{subject}", str(quantity), at)
        for n, (subject, at, quantity) in enumerate(records)
    ]
    half = len(messages) // 2
    first = new_worker(**ENV).start()
    first.wait_healthy()
    asyncio.run(publish(settings, messages[:half]))

    def counted_some() -> bool:
        return bool(stored_groups(settings))

    eventually(while_running(first, counted_some), 60, interval=0.5, message=first.log_tail)
    first.kill()
    # The rest, and the first half again (a producer retrying after the crash): each record counts once.
    asyncio.run(publish(settings, messages[half:] + messages[:half]))
    second = new_worker(**ENV).start()
    second.wait_healthy()
    expected = local_groups(records)

    def exact() -> bool:
        return stored_groups(settings) == expected

    eventually(
        while_running(second, exact),
        90,
        interval=0.5,
        message=lambda: f"{set(stored_groups(settings).items()) ^ set(expected.items())}\n{second.log_tail()}",
    )
    # getSummary in the subject's zone, from its local rollups, equals the same summary summed from the records.
    with connect(settings) as client:
        for period in PeriodType:
            args = (client, METRIC, "org", "kolkata", period, SINCE, datetime(2027, 1, 1, tzinfo=UTC))
            from_rollups = usage_summaries(*args, zone_name="Asia/Kolkata", zone_rollups_from=SINCE)
            from_records = usage_summaries(*args, zone_name="Asia/Kolkata", zone_rollups_from=None)
            assert [(s.period_start, s.total_quantity) for s in from_rollups] == [
                (s.period_start, s.total_quantity) for s in from_records
            ]
            assert from_rollups
            # In UTC, which its rollups were not cut in: from the records, equal to sums by UTC clock.
            in_utc = usage_summaries(*args, zone_name="UTC", zone_rollups_from=None)
            expected_utc = local_groups([(s, at, q) for s, at, q in records if s == "kolkata"], zone="UTC")
            assert {
                ("kolkata", "UTC", period.value, row_label(period.value, s.period_start, "UTC")): s.total_quantity
                for s in in_utc
            } == {key: total for key, total in expected_utc.items() if key[2] == period.value}
    invoices_in_the_subjects_cycles(settings, records)


def invoices_in_the_subjects_cycles(settings, records: list[tuple[str, datetime, Decimal]]) -> None:
    """org:kolkata billed per unit on anniversary cycles anchored on the 31st in its zone: February's cycle runs from
    28 February to 31 March, local midnights (18:30 UTC the evening before). Each cycle's quantity, from the local
    rollups (the invoice) and from the records, equals the records' sum over the cycle computed here."""
    plan = Plan(
        key="per-unit",
        name="Per unit",
        currency="USD",
        prices=[{"metricKey": METRIC, "model": "PER_UNIT", "unitPrice": "1"}],
    )
    subscription = Subscription(
        id="kolkata-31",
        subject_type="org",
        subject_id="kolkata",
        plan_key="per-unit",
        start_at=SINCE,
        time_zone="Asia/Kolkata",
        billing_time="anniversary",
        billing_anchor=31,
    )
    subjects = {
        f"org:{subject}": SubjectSettings(
            subject_type="org", subject_id=subject, time_zone=zone, previous_time_zone=previous, effective_from=since
        )
        for subject, found in SUBJECTS.items()
        if found is not None
        for zone, previous, since in [found]
    }
    cycles = {
        "2026-02": (datetime(2026, 2, 27, 18, 30, tzinfo=UTC), datetime(2026, 3, 30, 18, 30, tzinfo=UTC)),
        "2026-03": (datetime(2026, 3, 30, 18, 30, tzinfo=UTC), datetime(2026, 4, 29, 18, 30, tzinfo=UTC)),
    }
    with connect(settings) as client:

        async def query(function, *args):
            return await asyncio.to_thread(function, client, *args)

        for period, (start, end) in cycles.items():
            expected = sum((q for s, at, q in records if s == "kolkata" and start <= at < end), Decimal(0))
            assert expected  # the cycle holds records near its bounds
            invoice = asyncio.run(
                invoice_for(
                    settings, query, {"per-unit": plan}, [subscription], "org", "kolkata", period, subjects=subjects
                )
            )
            assert (invoice.period_start, invoice.period_end, invoice.time_zone) == (start, end, "Asia/Kolkata")
            assert invoice.local_period_start == start.astimezone(ZoneInfo("Asia/Kolkata")).isoformat()
            [line] = invoice.lines
            assert (line.quantity, line.amount) == (expected, expected.quantize(Decimal("0.01")))
            selection = Selection.of(plan.prices[0])
            for source in (Source("Asia/Kolkata"), Source("Asia/Kolkata", rollups=False)):
                found = priced_quantities(client, "org", "kolkata", start, end, [selection], source)
                assert found == {selection: expected}, source
        # A UTC calendar month of the same subject, whose rollups are all local: from the records.
        march = (datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 4, 1, tzinfo=UTC))
        expected = sum((q for s, at, q in records if s == "kolkata" and march[0] <= at < march[1]), Decimal(0))
        found = priced_quantities(client, "org", "kolkata", *march, [selection], Source("UTC", rollups=False))
        assert found == {selection: expected}
