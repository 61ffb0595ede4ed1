"""A subject's rollups in its time zone (issue 28): the rollup state counts a zoned record into its local hour, day
and month (and all time) instead of UTC ones; a change of zone takes effect at the end of the old zone's day; local
keys survive the changelog and the store's key; DAILY thresholds of a zoned subject reset at its local midnight.
Expected instants are worked out by hand from the zones' offsets."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import msgspec
from tests.unit.counted_records import counted

from metering_pipeline.usage.metrics import MetricCatalog
from metering_pipeline.usage.periods import LocalPeriod, local_period, period_end
from metering_pipeline.usage.rollups import KEY_NAME, LIFETIME, WIRE_NAME, ZONE_NAME, PartitionRollups
from metering_pipeline.usage.routed_record import AcceptedRecord
from metering_pipeline.usage.subject_zones import SubjectZones, zone_change, zone_in_force
from metering_pipeline.usage.thresholds import APPROACHING, EXCEEDED, PartitionThresholds, ThresholdBook
from metering_pipeline.worker import changelog
from metering_pipeline.worker.state_store import rollup_key
from metering_schemas import (
    AggregationType,
    MetricDefinition,
    PeriodType,
    ResetPeriod,
    SubjectSettings,
    ThresholdAction,
    UsageThreshold,
)

HOURLY, DAILY, MONTHLY = PeriodType.HOURLY, PeriodType.DAILY, PeriodType.MONTHLY
KOLKATA, KATHMANDU = "Asia/Kolkata", "Asia/Kathmandu"


def utc(*fields: int) -> datetime:
    return datetime(*fields, tzinfo=UTC)


def zoned(record_id: str, at: datetime, quantity: str = "1", zone: str = KOLKATA, subject: str = "o"):
    record = counted(record_id, at, quantity, subject=subject, all_time=False)
    record.time_zone = zone
    return record


def totals(state: PartitionRollups) -> dict[tuple[object, datetime], Decimal]:
    return {(key[3], key[4]): rollup.total() for key, rollup in state.rollups.items()}


def test_a_zoned_record_counts_in_its_local_hour_day_and_month_only():
    state = PartitionRollups(timedelta(hours=24))
    # 2026-03-31 18:40 UTC is 1 April 00:10 in Kolkata: a new local day and month, still March 31 in UTC.
    state.apply(
        [zoned("a", utc(2026, 3, 31, 18, 40), "2"), zoned("b", utc(2026, 3, 31, 18, 20), "3")], 0, utc(2026, 4, 1)
    )
    k = {period: local_period(period, KOLKATA) for period in PeriodType}
    assert totals(state) == {
        (k[HOURLY], utc(2026, 3, 31, 18, 30)): Decimal(2),  # 00:00–01:00 local
        (k[HOURLY], utc(2026, 3, 31, 17, 30)): Decimal(3),  # 23:00–24:00 local, 31 March
        (k[DAILY], utc(2026, 3, 31, 18, 30)): Decimal(2),
        (k[DAILY], utc(2026, 3, 30, 18, 30)): Decimal(3),
        (k[MONTHLY], utc(2026, 3, 31, 18, 30)): Decimal(2),
        (k[MONTHLY], utc(2026, 2, 28, 18, 30)): Decimal(3),
    }
    assert period_end(k[MONTHLY], utc(2026, 3, 31, 18, 30)) == utc(2026, 4, 30, 18, 30)
    assert period_end(k[MONTHLY], utc(2026, 1, 31, 18, 30)) == utc(2026, 2, 28, 18, 30)  # 1 Feb local to 1 Mar local


def test_a_kathmandu_hour_starts_at_a_quarter_past_utc():
    state = PartitionRollups(timedelta(hours=24))
    state.apply(
        [zoned("a", utc(2026, 6, 1, 10, 14, 59), zone=KATHMANDU), zoned("b", utc(2026, 6, 1, 10, 15), zone=KATHMANDU)],
        0,
        utc(2026, 6, 1, 11),
    )
    hourly = local_period(HOURLY, KATHMANDU)
    assert {start: total for (period, start), total in totals(state).items() if period is hourly} == {
        utc(2026, 6, 1, 9, 15): Decimal(1),
        utc(2026, 6, 1, 10, 15): Decimal(1),
    }


def test_a_zoned_subjects_records_touch_its_local_rollups_and_an_all_time_one():
    touched: set = set()
    state = PartitionRollups(timedelta(hours=24))
    forever = counted("c", utc(2026, 3, 31, 18, 40), subject="q")  # a metric that never resets
    forever.time_zone = KOLKATA
    records = [zoned("a", utc(2026, 3, 31, 18, 40)), counted("b", utc(2026, 3, 31, 18, 40), subject="p"), forever]
    state.apply(records, 0, utc(2026, 4, 1), touched)
    local = {local_period(period, KOLKATA) for period in PeriodType}
    assert {key[3] for key in touched if key[2] == "o"} == local
    assert {key[3] for key in touched if key[2] == "p"} == {*PeriodType, LIFETIME}
    assert {key[3] for key in touched if key[2] == "q"} == {*local, LIFETIME}


def test_a_record_whose_local_hour_ended_before_the_horizon_is_refused_though_its_utc_hour_is_open():
    state = PartitionRollups(timedelta(hours=24))
    # Local hour [09:30, 10:30) UTC ended before the horizon 10:45; the UTC hour [10:00, 11:00) has not.
    state.apply([zoned("late", utc(2026, 6, 1, 10, 10))], 7, utc(2026, 6, 1, 12), closed_before=utc(2026, 6, 1, 10, 45))
    checkpoint = state.checkpoint()
    assert [(offset, r.record_id) for offset, r in checkpoint.closed] == [(7, "late")]
    assert state.rollups == {}


def test_a_record_whose_local_hour_is_open_is_counted_though_its_utc_hour_ended():
    state = PartitionRollups(timedelta(hours=24))
    # Local hour [10:30, 11:30) UTC is still open at the horizon 11:10; the UTC hour [10:00, 11:00) has ended.
    state.apply([zoned("open", utc(2026, 6, 1, 10, 40))], 7, utc(2026, 6, 1, 12), closed_before=utc(2026, 6, 1, 11, 10))
    assert state.checkpoint().closed == []
    assert totals(state)[(local_period(HOURLY, KOLKATA), utc(2026, 6, 1, 10, 30))] == 1


def test_local_rollup_keys_survive_the_changelog_and_keep_utc_keys_as_they_were():
    state = PartitionRollups(timedelta(hours=24))
    records = [zoned("a", utc(2026, 3, 31, 18, 40), "2.5"), counted("b", utc(2026, 3, 31, 18, 40), "2.5", subject="u")]
    state.apply(records, 0, utc(2026, 4, 1))
    changes = state.checkpoint().rollups
    for change in changes:
        entry_key, value = changelog.rollup_entry(change)
        key = changelog.decode_rollup_key(entry_key[len(changelog.ROLLUP_PREFIX) :])
        assert key == change.key and key[3] is change.key[3]  # one LocalPeriod object per (type, zone)
        assert changelog.decode_rollup(msgspec.json.decode(value)).total() == Decimal("2.5")
    day = next(c for c in changes if c.key[3] is local_period(DAILY, KOLKATA))
    assert KEY_NAME[day.key[3]] == "DAILY@Asia/Kolkata" and WIRE_NAME[day.key[3]] == "DAILY"
    assert ZONE_NAME[day.key[3]] == KOLKATA and ZONE_NAME[DAILY] == "UTC"
    utc_day = next(c for c in changes if c.key[3] is DAILY)
    assert changelog.rollup_entry(utc_day)[0] == b'r|["m","org","u","DAILY",1774915200]'
    # The store keys a rollup by the end of its period: the local day's end, not the UTC one's.
    assert rollup_key(day.key)[2:10] == int(utc(2026, 4, 1, 18, 30).timestamp()).to_bytes(8, "big")


def _settings(zone: str, previous: str | None = None, effective: datetime | None = None) -> SubjectSettings:
    return SubjectSettings(
        subject_type="org", subject_id="o", time_zone=zone, previous_time_zone=previous, effective_from=effective
    )


def test_a_change_of_zone_takes_effect_at_the_end_of_the_old_zones_day():
    now = utc(2026, 3, 10, 12)
    change = zone_change(None, "org", "o", KOLKATA, "UTC", now)
    assert (change.previous_time_zone, change.effective_from) == ("UTC", utc(2026, 3, 11))
    # From Kolkata to New York at 12:00 UTC (17:30 local): at Kolkata's midnight, 18:30 UTC.
    again = zone_change(_settings(KOLKATA), "org", "o", "America/New_York", "UTC", now)
    assert (again.previous_time_zone, again.effective_from) == (KOLKATA, utc(2026, 3, 10, 18, 30))
    # In the last hour of the old zone's day: the end of the next day, so every worker has read it by then.
    late = zone_change(None, "org", "o", KOLKATA, "UTC", utc(2026, 3, 10, 23, 30))
    assert late.effective_from == utc(2026, 3, 12)
    # A second change before the first took effect: the zone in force now stays until the same instant.
    pending = zone_change(change, "org", "o", "Europe/Berlin", "UTC", now + timedelta(hours=1))
    assert (pending.previous_time_zone, pending.effective_from) == ("UTC", utc(2026, 3, 11))
    # Back to the zone in force: nothing to move.
    assert zone_change(change, "org", "o", "UTC", "UTC", now).effective_from is None
    assert zone_in_force(change, utc(2026, 3, 10, 23, 59), "UTC") == "UTC"
    assert zone_in_force(change, utc(2026, 3, 11), "UTC") == KOLKATA


def test_the_router_stamps_each_record_with_the_zone_in_force_at_its_time():
    zones = SubjectZones("UTC")
    assert not zones.any_zoned
    zones.put(_settings(KOLKATA, "UTC", utc(2026, 3, 11)))
    at = int(utc(2026, 3, 11).timestamp() * 1000)
    records = [
        _accepted("org", "o", at - 1),
        _accepted("org", "o", at),
        _accepted("user", "o", at),
        _accepted("org", "p", at),
    ]
    zones.stamp(records)
    assert [record.time_zone for record in records] == ["", KOLKATA, "", ""]
    assert (zones.zone_at("org", "o", at - 1), zones.zone_at("org", "o", at)) == ("", KOLKATA)
    assert zones.zones_of("org", "o") == (KOLKATA,)
    zones.delete("org:o")
    assert not zones.any_zoned
    berlin = [_accepted("org", "o", at)]
    SubjectZones("Europe/Berlin").stamp(berlin)
    assert berlin[0].time_zone == "Europe/Berlin"


def _accepted(subject_type: str, subject_id: str, timestamp_ms: int) -> AcceptedRecord:
    return AcceptedRecord(subject_type, subject_id, "r", "m", "m", AggregationType.SUM, "1", timestamp_ms, "{}", False)


def test_a_zoned_subjects_daily_threshold_resets_at_its_local_midnight():
    rollups, book = PartitionRollups(timedelta(hours=24)), ThresholdBook()
    metrics = MetricCatalog(
        {
            "m": MetricDefinition(
                id="m", key="m", name="m", aggregation_type=AggregationType.SUM, reset_period=ResetPeriod.DAILY
            )
        }
    )
    zones = SubjectZones("UTC")
    zones.put(_settings(KOLKATA))
    thresholds = PartitionThresholds(rollups, book, metrics, Decimal("0.8"), zones)
    book.put(
        UsageThreshold(
            id="t",
            metric_key="m",
            subject_type="org",
            subject_id="o",
            threshold=Decimal(10),
            action=ThresholdAction.ALERT,
        )
    )
    thresholds.after_threshold_changes(utc(2026, 3, 10, 18))
    touched: set = set()
    # 8 before Kolkata's midnight (18:30 UTC), 8 after: the same UTC day (16), two local days (8 each).
    rollups.apply([zoned("a", utc(2026, 3, 10, 18), "8")], 1, utc(2026, 3, 10, 18), touched)
    [first] = thresholds.after_records(touched, utc(2026, 3, 10, 18))
    touched.clear()
    rollups.apply([zoned("b", utc(2026, 3, 10, 19), "8")], 2, utc(2026, 3, 10, 19), touched)
    [second] = thresholds.after_records(touched, utc(2026, 3, 10, 19))
    assert [(a.type, a.value, a.window_start, a.window_end, a.time_zone) for a in (first, second)] == [
        (APPROACHING, 8, utc(2026, 3, 9, 18, 30), utc(2026, 3, 10, 18, 30), KOLKATA),
        (APPROACHING, 8, utc(2026, 3, 10, 18, 30), utc(2026, 3, 11, 18, 30), KOLKATA),
    ]
    event = second.to_event()
    assert (event.time_zone, event.local_period_start) == (KOLKATA, "2026-03-11T00:00:00+05:30")
    assert EXCEEDED not in {first.type, second.type}
    status = thresholds.status("m", ("org", "o"), utc(2026, 3, 10, 19)).to_json()
    assert (status["periodStart"], status["periodEnd"], status["timeZone"], status["value"]) == (
        "2026-03-10T18:30:00Z",
        "2026-03-11T18:30:00Z",
        KOLKATA,
        "8",
    )


def test_a_local_period_is_one_object_per_type_and_zone():
    assert local_period(DAILY, KOLKATA) is local_period(DAILY, KOLKATA)
    assert isinstance(local_period(DAILY, KOLKATA), LocalPeriod) and local_period(DAILY, KOLKATA).value == "DAILY"
