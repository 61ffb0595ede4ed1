"""Threshold decisions without I/O: crossings, once per window, re-arming, blocking, entitlement status,
plus the alert e-mail and how entitlement checks find a partition's owner."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment

from metering_pipeline.notification.messages import alert_email, message_id
from metering_pipeline.usage.metrics import MetricCatalog
from metering_pipeline.usage.rollups import PartitionRollups
from metering_pipeline.usage.routed_record import CountedRecord
from metering_pipeline.usage.thresholds import (
    APPROACHING,
    EXCEEDED,
    Marker,
    PartitionThresholds,
    ThresholdBook,
    ThresholdWatch,
    crossings,
)
from metering_pipeline.worker.entitlements import member_client_id, owners_from_description
from metering_schemas import AggregationType, MetricDefinition, ResetPeriod, ThresholdAction, UsageThreshold

UTC = UTC
NOW = datetime(2026, 11, 24, 12, 30, tzinfo=UTC)
EIGHTY = Decimal("0.8")


def limit(
    threshold_id: str = "t",
    subject_id: str = "o",
    value: str = "100",
    action: ThresholdAction = ThresholdAction.ALERT,
    metric_key: str = "tokens",
) -> UsageThreshold:
    return UsageThreshold(
        id=threshold_id,
        metric_key=metric_key,
        subject_type="org",
        subject_id=subject_id,
        threshold=Decimal(value),
        action=action,
    )


def test_crossings_at_the_edges():
    assert crossings(Decimal("79.99"), Decimal(100), EIGHTY, None) == []
    assert crossings(Decimal(80), Decimal(100), EIGHTY, None) == [APPROACHING]
    assert crossings(Decimal(100), Decimal(100), EIGHTY, None) == [APPROACHING]  # exactly at the limit is not over it
    assert crossings(Decimal("100.000000000000000001"), Decimal(100), EIGHTY, None) == [APPROACHING, EXCEEDED]
    assert crossings(Decimal(150), Decimal(100), EIGHTY, Marker(Decimal(100), approaching=True)) == [EXCEEDED]
    assert crossings(Decimal(150), Decimal(100), EIGHTY, Marker(Decimal(100), True, True)) == []


def test_book_matches_exact_subjects_and_wildcards_of_the_type_only():
    book = ThresholdBook()
    book.put(limit("mine", "o1"))
    book.put(limit("all", "*"))
    book.put(limit("other-metric", "o1", metric_key="calls"))
    assert {t.id for t in book.matching("tokens", "org", "o1")} == {"mine", "all"}
    assert {t.id for t in book.matching("tokens", "org", "o2")} == {"all"}
    assert book.matching("tokens", "user", "o1") == []
    book.put(limit("mine", "o2"))  # moved to another subject
    assert {t.id for t in book.matching("tokens", "org", "o1")} == {"all"}
    book.delete("all")
    assert book.matching("tokens", "org", "o3") == [] and book.changes == ["mine", "all", "other-metric", "mine", "all"]


def test_each_alert_fires_once_per_window_with_a_deterministic_id():
    watch = ThresholdWatch(EIGHTY)
    window = datetime(2026, 11, 1, tzinfo=UTC)
    first = watch.evaluate(limit(), ("org", "o"), ResetPeriod.MONTHLY, window, Decimal(120), NOW)
    assert [a.type for a in first] == [APPROACHING, EXCEEDED]
    assert watch.evaluate(limit(), ("org", "o"), ResetPeriod.MONTHLY, window, Decimal(130), NOW) == []
    again = ThresholdWatch(EIGHTY).evaluate(
        limit(), ("org", "o"), ResetPeriod.MONTHLY, window, Decimal(120), NOW + timedelta(hours=1)
    )
    assert [a.id for a in again] == [a.id for a in first]  # the same crossing replayed has the same ids
    december = watch.evaluate(
        limit(), ("org", "o"), ResetPeriod.MONTHLY, datetime(2026, 12, 1, tzinfo=UTC), Decimal(90), NOW
    )
    assert [a.type for a in december] == [APPROACHING] and december[0].id != first[0].id
    event = first[1].to_event().model_dump(mode="json", by_alias=True)  # as published
    assert (event["periodStart"], event["periodEnd"], event["value"], event["threshold"]) == (
        "2026-11-01T00:00:00Z",
        "2026-12-01T00:00:00Z",
        "120",
        "100",
    )
    assert (
        watch.evaluate(
            limit(action=ThresholdAction.NONE, threshold_id="quiet"),
            ("org", "o"),
            ResetPeriod.MONTHLY,
            window,
            Decimal(500),
            NOW,
        )
        == []
    )


def test_raising_a_limit_above_the_value_rearms_it_and_lowering_does_not():
    watch = ThresholdWatch(EIGHTY)
    window = datetime(2026, 11, 1, tzinfo=UTC)
    watch.evaluate(limit(), ("org", "o"), ResetPeriod.MONTHLY, window, Decimal(120), NOW)
    watch.rearm(limit(value="110"), lambda subject, start: Decimal(120))  # still below the value: stays fired
    assert watch.marker("t", ("org", "o"), window).exceeded
    watch.rearm(limit(value="50"), lambda subject, start: Decimal(120))  # lowered
    assert watch.marker("t", ("org", "o"), window).exceeded
    watch.rearm(limit(value="200"), lambda subject, start: Decimal(120))
    assert watch.marker("t", ("org", "o"), window) is None
    assert [(key, marker) for key, marker in watch.checkpoint()][-1][1] is None  # the removal is checkpointed
    assert [
        a.type for a in watch.evaluate(limit(value="200"), ("org", "o"), ResetPeriod.MONTHLY, window, Decimal(170), NOW)
    ] == [APPROACHING]


def partition(reset: ResetPeriod) -> tuple[PartitionRollups, ThresholdBook, PartitionThresholds]:
    rollups, book = PartitionRollups(timedelta(hours=24)), ThresholdBook()
    metrics = MetricCatalog(
        {
            "tokens": MetricDefinition(
                id="tokens", key="tokens", name="t", aggregation_type=AggregationType.SUM, reset_period=reset
            )
        }
    )
    return rollups, book, PartitionThresholds(rollups, book, metrics, EIGHTY)


def record(n: int, quantity: str, at: datetime) -> CountedRecord:
    """Record r{n}; tests apply records at routed offsets that grow with n."""
    return CountedRecord(
        "org",
        "o",
        f"r{n}",
        "tokens",
        "tokens",
        AggregationType.SUM,
        Decimal(quantity),
        int(at.timestamp() * 1000),
        "{}",
    )


def test_records_are_checked_against_the_metrics_reset_window_only():
    rollups, book, thresholds = partition(ResetPeriod.DAILY)
    book.put(limit(value="12"))
    thresholds.after_threshold_changes(NOW)
    touched: set = set()
    rollups.apply([record(1, "6", NOW - timedelta(days=1)), record(2, "6", NOW)], 2, NOW, touched)
    assert thresholds.after_records(touched, NOW) == []  # 6 a day (< 9.6), though 12 this month and all time
    touched.clear()
    rollups.apply([record(3, "5", NOW)], 3, NOW, touched)
    [alert] = thresholds.after_records(touched, NOW)
    assert (alert.type, alert.value, alert.period, alert.window_start) == (
        APPROACHING,
        Decimal(11),
        ResetPeriod.DAILY,
        datetime(2026, 11, 24, tzinfo=UTC),
    )


def test_never_resetting_metrics_use_the_all_time_total():
    rollups, book, thresholds = partition(ResetPeriod.NEVER)
    book.put(limit(value="10"))
    thresholds.after_threshold_changes(NOW)
    touched: set = set()
    rollups.apply([record(1, "6", NOW - timedelta(days=30)), record(2, "6", NOW)], 2, NOW, touched)
    assert [(a.type, a.value) for a in thresholds.after_records(touched, NOW)] == [(APPROACHING, 12), (EXCEEDED, 12)]


def test_a_new_threshold_applies_to_usage_already_recorded_and_a_deleted_one_stops():
    rollups, book, thresholds = partition(ResetPeriod.MONTHLY)
    rollups.apply([record(1, "95", NOW)], 1, NOW)
    book.put(limit(value="100", action=ThresholdAction.BLOCK))
    assert [a.type for a in thresholds.after_threshold_changes(NOW)] == [APPROACHING]
    assert thresholds.status("tokens", ("org", "o"), NOW).blocked is False
    touched: set = set()
    rollups.apply([record(2, "10", NOW)], 2, NOW, touched)
    assert [a.type for a in thresholds.after_records(touched, NOW)] == [EXCEEDED]
    status = thresholds.status("tokens", ("org", "o"), NOW)
    assert (status.value, status.blocked, status.to_json()["status"]) == (Decimal(105), True, "exceeded")
    book.put(limit(value="200", action=ThresholdAction.BLOCK))  # raised above the value: unblocked
    assert thresholds.after_threshold_changes(NOW) == []
    assert thresholds.status("tokens", ("org", "o"), NOW).blocked is False
    book.delete("t")
    thresholds.after_threshold_changes(NOW)
    touched.clear()
    rollups.apply([record(3, "500", NOW)], 3, NOW, touched)
    assert thresholds.after_records(touched, NOW) == [] and thresholds.status("tokens", ("org", "o"), NOW).limits == []


def test_alert_emails_carry_a_stable_message_id_per_address():
    event = {
        "id": "t/org:o/MONTHLY/2026-11-01T00:00:00Z/threshold.exceeded@100",
        "type": "threshold.exceeded",
        "thresholdId": "t",
        "metricKey": "tokens",
        "subjectType": "org",
        "subjectId": "o",
        "threshold": "100",
        "value": "120",
        "periodType": "MONTHLY",
        "periodStart": "2026-11-01T00:00:00Z",
        "periodEnd": "2026-12-01T00:00:00Z",
        "action": "ALERT",
        "notifyEmails": ["a@x.com"],
        "occurredAt": "2026-11-24T12:30:00Z",
    }
    email = alert_email(event, "a@x.com", "metering@x.com")
    assert (
        email["Message-ID"]
        == message_id(event["id"], "a@x.com", "metering@x.com")
        != message_id(event["id"], "b@x.com", "metering@x.com")
    )
    assert "org:o has exceeded its tokens limit (120 / 100)" in email["Subject"]
    assert event["id"] in email.as_string()


def test_partition_owners_come_from_the_group_description():
    def member(client_id: str, partitions: list[int], topic: str = "routed") -> dict:
        assignment = ConsumerProtocolMemberAssignment(0, [(topic, partitions)], b"").encode()
        return {"client_id": client_id, "member_assignment": assignment}

    description = {
        "members": [
            member(member_client_id("g", "http://w1:6066"), [0, 2]),
            member(member_client_id("g", "http://w2:6066"), [1, 3]),
            member("aiokafka-without-url", [4]),
            member(member_client_id("g", "http://w3:6066"), [5], topic="other"),
        ]
    }
    assert owners_from_description(description, "routed") == {
        0: "http://w1:6066",
        2: "http://w1:6066",
        1: "http://w2:6066",
        3: "http://w2:6066",
    }
