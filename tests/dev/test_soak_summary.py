"""The soak run's arithmetic without I/O: RSS slope and verdict, lag percentiles, error lines, /metrics parsing."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from decimal import Decimal

import pytest

from metering_dev.bench.soak import SoakPlan, expected_alerts, soak_thresholds
from metering_dev.bench.soak_summary import (
    Sample,
    count_error_lines,
    counter,
    is_error_line,
    lag_by_stage,
    samples_csv,
    slope_per_second,
    summarise,
    warmup_seconds,
)
from metering_dev.bench.workload import Expected
from metering_pipeline.worker.stats import WorkerStats

MINUTES_30 = 1800.0


def series(
    rss_at: Callable[[float], float],
    duration: float = MINUTES_30,
    every: float = 5.0,
    lag_at: Callable[[float], int] = lambda t: 0,
    errors_at: Callable[[float], int] = lambda t: 0,
) -> list[Sample]:
    samples = []
    t = 0.0
    while t <= duration:
        samples.append(
            Sample(t, "soak", rss_at(t), lag_at(t), lag_at(t) * 2, int(t * 1000), int(t * 990), 990.0, 0, errors_at(t))
        )
        t += every
    return samples


def test_a_flat_series_is_flat_even_with_a_climb_during_warm_up() -> None:
    summary = summarise(series(lambda t: 200 + min(t, 60) * 2 + (3 if int(t) % 10 else -3)), MINUTES_30)
    assert summary.warmup_s == 60
    assert summary.rss_start_mb == pytest.approx(317)  # first sample at 60 s, after the climb
    assert summary.rss_max_mb == pytest.approx(323)
    assert abs(summary.rss_slope_mb_per_10_min) < 1
    assert summary.rss_verdict == "flat"


def test_a_slow_leak_in_the_second_half_is_growing_and_measured_per_10_minutes() -> None:
    summary = summarise(series(lambda t: 300 + 0.02 * t), MINUTES_30)  # 0.02 MB/s = 12 MB per 10 min
    assert summary.rss_slope_mb_per_10_min == pytest.approx(12)
    assert summary.rss_verdict == "growing"
    assert summary.rss_start_mb == pytest.approx(301.2)
    assert summary.rss_middle_mb == pytest.approx(318)
    assert summary.rss_end_mb == pytest.approx(336)


def test_rss_falling_is_no_leak() -> None:
    assert summarise(series(lambda t: 800 - 0.05 * t), MINUTES_30).rss_verdict == "flat"


def test_a_run_too_short_for_a_slope_says_so() -> None:
    summary = summarise(series(lambda t: 100 + t, duration=30, every=5), 30)
    assert summary.rss_verdict == "too short"


def test_lag_percentiles_skip_warm_up_and_drain_samples_count_for_max_rss_only() -> None:
    samples = series(lambda t: 100.0, duration=600, lag_at=lambda t: 10_000 if t < 60 else int(t) % 100)
    samples.append(Sample(605, "drain", 900.0, 0, 0, 600_000, 600_000, 0.0, 0, 0))
    summary = summarise(samples, 600)
    assert summary.warmup_s == 60
    assert summary.router_lag_max < 100  # the warm-up backlog is not steady-state lag
    assert summary.rollups_lag_max == 2 * summary.router_lag_max
    assert 40 <= summary.router_lag_p50 <= 60
    assert summary.router_lag_p99 >= 90
    assert summary.rss_end_mb == 100.0  # end of publishing, not of the drain
    assert summary.rss_max_mb == 900.0


def test_the_error_count_is_the_last_one_seen() -> None:
    assert summarise(series(lambda t: 1.0, errors_at=lambda t: int(t // 600)), MINUTES_30).error_lines == 3


def test_no_samples_is_an_error() -> None:
    with pytest.raises(ValueError):
        summarise([], 60)


def test_slope_and_warm_up() -> None:
    assert slope_per_second([(0, 1), (10, 21)]) == pytest.approx(2)
    assert slope_per_second([(5, 1)]) is None
    assert slope_per_second([(5, 1), (5, 3)]) is None
    assert warmup_seconds(120) == 12
    assert warmup_seconds(1800) == 60


def test_error_lines_structured_and_plain() -> None:
    lines = [
        '{"event": "stage failed; stopping the worker", "level": "error", "timestamp": "2026-11-26T10:00:00Z"}',
        '{"event": "worker started", "level": "info"}',
        '{"event": "router commit refused", "level": "warning"}',
        '{"event": "boom", "level": "critical"}',
        '{"event": "oops", "level": "exception"}',
        '{"truncated json',
        # Faust's format, as found in a worker's log: with the cursor escape it writes even into a file.
        "\x1b[?25l[2026-11-26 06:44:50,429] [9621] [ERROR] Group Coordinator Request failed: [Error 15] "
        "GroupCoordinatorNotAvailableError ",
        "\x1b[?25h[2026-11-26 06:45:13,122] [9621] [WARNING] Got error produce response on topic-partition "
        "TopicPartition(topic='t', partition=11), retrying. Error: <class 'aiokafka.errors.NotEnoughReplicasError'> ",
        "[2026-11-26 06:45:13,122] [9621] [CRITICAL] [^Worker]: crashed",
        "2026-11-26 10:00:00,000 ERROR faust.worker crashed",
        "2026-11-26 10:00:00,000 WARNING aiokafka an [ERROR] somewhere in the message text",
        "Traceback (most recent call last):",
        "ERROR in a continuation line of a message",
        "\x1b[?25h",
        "",
    ]
    assert [is_error_line(line) for line in lines] == [
        True,
        False,
        False,
        True,
        True,
        False,
        True,
        False,
        True,
        True,
        False,
        False,
        False,
        False,
        False,
    ]
    assert count_error_lines(lines) == 6


def test_metrics_text_parsing() -> None:
    text = "\n".join(
        [
            "# TYPE metering_records_counted_total counter",
            "metering_records_counted_total 12345",
            "metering_alerts_total 7",
            "# TYPE metering_consumer_lag gauge",
            'metering_consumer_lag{stage="router",partition="0"} 3',
            'metering_consumer_lag{stage="router",partition="1"} 4',
            'metering_consumer_lag{stage="rollups",partition="0"} 10',
        ]
    )
    assert counter(text, "metering_records_counted_total") == 12345
    assert counter(text, "metering_alerts_total") == 7
    assert counter(text, "metering_flushes_total") == 0
    assert lag_by_stage(text) == {"router": 7, "rollups": 10}


def test_metrics_parsing_reads_what_the_worker_exposes() -> None:
    stats = WorkerStats()
    stats.counted, stats.alerts = 12345, 7
    stats.lag.update({"router/0": 3, "router/1": 4, "rollups/0": 10})
    text = stats.prometheus().decode()
    assert counter(text, "metering_records_counted_total") == 12345
    assert counter(text, "metering_alerts_total") == 7
    assert lag_by_stage(text) == {"router": 7, "rollups": 10}


def test_samples_csv_has_a_header_and_one_row_per_sample() -> None:
    rows = list(csv.DictReader(io.StringIO(samples_csv(series(lambda t: 123.456, duration=10)))))
    assert len(rows) == 3
    assert rows[1]["t_s"] == "5.0" and rows[1]["rss_mb"] == "123.5" and rows[1]["phase"] == "soak"


def test_thresholds_spread_over_the_run_and_the_alerts_they_imply() -> None:
    plan = SoakPlan(minutes=10, subjects=100)
    thresholds = soak_thresholds(plan, rate=100)  # 60,000 records: 120 per subject per metric, ~60,000 tokens each
    assert [t["threshold"] for t in thresholds] == ["15000", "30000", "45000"]
    assert all(t["subjectId"] == "*" and t["metricKey"] == "bench_tokens" for t in thresholds)
    expected = Expected()
    expected.add(
        "bench_tokens", "s1", Decimal(40_000)
    )  # approaching + exceeded 15000 and 30000, approaching 45000 (36000)
    expected.add("bench_tokens", "s2", Decimal(12_000))  # approaching 15000 only
    expected.add("bench_calls", "s1", Decimal(10**9))  # another metric: no threshold
    assert expected_alerts(expected, thresholds, Decimal("0.8")) == 6
