"""The soak run's arithmetic, without I/O: what a series of samples says about memory and lag.

Kept apart from the runner so the verdict (does RSS keep growing once the worker is warm?) can be
unit-tested on made-up series, and recomputed from a saved CSV.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields

import orjson

from metering_dev.bench.measure import percentile

# RSS growing by more than this over 10 minutes of the second half counts as "growing". Python's
# allocator and the GC move RSS by a few MB between samples; a leak of one object per record at
# thousands of records/s is far above it.
FLAT_MB_PER_10_MIN = 5.0
# Fewer samples than this in the second half give no verdict: a slope of two points is noise.
MIN_SLOPE_SAMPLES = 5

ERROR_LEVELS = frozenset({"error", "critical", "exception", "fatal"})


@dataclass(frozen=True)
class Sample:
    """One look at the worker, about every 5 s. `phase` is "soak" while publishing, "drain" after."""

    t_s: float  # seconds since publishing started
    phase: str
    rss_mb: float
    router_lag: int  # usage.recorded messages not yet committed by the router stage
    rollups_lag: int  # routed messages not yet committed by the rollup stage
    published: int  # records sent so far
    counted: int  # records folded into rollups so far (worker's /metrics)
    counted_per_s: float  # since the previous sample
    alerts: int  # threshold alerts committed so far (worker's /metrics)
    error_lines: int  # error/critical lines in the worker's log so far


@dataclass(frozen=True)
class SoakSummary:
    warmup_s: float
    rss_start_mb: float  # first sample after warm-up
    rss_middle_mb: float  # sample nearest the middle of the publishing phase
    rss_end_mb: float  # last sample of the publishing phase
    rss_max_mb: float  # over every sample, drain included
    rss_slope_mb_per_10_min: float | None  # least squares over the publishing phase's second half
    rss_verdict: str  # flat | growing | too short
    router_lag_p50: float
    router_lag_p99: float
    router_lag_max: int
    rollups_lag_p50: float
    rollups_lag_p99: float
    rollups_lag_max: int
    counted_per_s_mean: float  # over the publishing phase after warm-up
    error_lines: int


def warmup_seconds(duration_s: float) -> float:
    """The first tenth of the run, at most a minute: the worker joins its groups and fills its caches."""
    return min(60.0, duration_s * 0.1)


def slope_per_second(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of y over x; None with fewer than two distinct x."""
    if len(points) < 2:
        return None
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    if spread == 0:
        return None
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread


def summarise(
    samples: Sequence[Sample], duration_s: float, flat_mb_per_10_min: float = FLAT_MB_PER_10_MIN
) -> SoakSummary:
    """RSS at start/middle/end, its slope over the second half, lag percentiles, errors: the soak's report."""
    if not samples:
        raise ValueError("no samples")
    warmup = warmup_seconds(duration_s)
    soak = [s for s in samples if s.phase == "soak"] or list(samples)
    warm = [s for s in soak if s.t_s >= warmup] or soak
    start, end = warm[0], warm[-1]
    middle = min(warm, key=lambda s: abs(s.t_s - duration_s / 2))
    second_half = [s for s in warm if s.t_s >= duration_s / 2]
    slope = slope_per_second([(s.t_s, s.rss_mb) for s in second_half])
    per_10_min = None if slope is None else slope * 600
    if per_10_min is None or len(second_half) < MIN_SLOPE_SAMPLES:
        verdict = "too short"
    else:
        verdict = "growing" if per_10_min > flat_mb_per_10_min else "flat"
    router = [s.router_lag for s in warm]
    rollups = [s.rollups_lag for s in warm]
    rates = [s.counted_per_s for s in warm]
    return SoakSummary(
        warmup_s=warmup,
        rss_start_mb=start.rss_mb,
        rss_middle_mb=middle.rss_mb,
        rss_end_mb=end.rss_mb,
        rss_max_mb=max(s.rss_mb for s in samples),
        rss_slope_mb_per_10_min=per_10_min,
        rss_verdict=verdict,
        router_lag_p50=percentile(router, 0.5),
        router_lag_p99=percentile(router, 0.99),
        router_lag_max=max(router),
        rollups_lag_p50=percentile(rollups, 0.5),
        rollups_lag_p99=percentile(rollups, 0.99),
        rollups_lag_max=max(rollups),
        counted_per_s_mean=sum(rates) / len(rates),
        error_lines=max(s.error_lines for s in samples),
    )


# Terminal control sequences Faust writes around its lines even into a file (cursor show/hide).
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# Faust's "[2026-11-26 06:44:50,429] [9621] [ERROR] ..." and the stdlib's "2026-11-26 06:44:50,429 ERROR name ...".
_PLAIN_LEVEL = re.compile(
    r"\[[^\]]*\]\s+\[\d+\]\s+\[(?P<faust>[A-Z]+)\]|\d{4}-\d\d-\d\d[ T][\d:,.]+\s+(?P<stdlib>[A-Z]+)\s"
)


def is_error_line(line: str) -> bool:
    """A log line at error level or above. A worker's log mixes structlog's JSON lines (the
    project's own messages) with Faust's and aiokafka's plain lines, so both forms count."""
    text = _ANSI.sub("", line).strip()
    if not text:
        return False
    if text.startswith("{"):
        try:
            document = orjson.loads(text)
        except orjson.JSONDecodeError:
            return False
        level = document.get("level") if isinstance(document, dict) else None
        return isinstance(level, str) and level.lower() in ERROR_LEVELS
    match = _PLAIN_LEVEL.match(text)
    return match is not None and (match["faust"] or match["stdlib"]).lower() in ERROR_LEVELS


def count_error_lines(lines: Iterable[str]) -> int:
    return sum(1 for line in lines if is_error_line(line))


def lag_by_stage(metrics_text: str) -> dict[str, int]:
    """Sum `metering_consumer_lag{stage=...}` over partitions, per stage, from the worker's /metrics."""
    lags: dict[str, int] = {}
    for line in metrics_text.splitlines():
        if not line.startswith("metering_consumer_lag{"):
            continue
        labels, _, value = line.rpartition(" ")
        stage = labels.split('stage="', 1)[1].split('"', 1)[0]
        lags[stage] = lags.get(stage, 0) + int(float(value))
    return lags


def counter(metrics_text: str, name: str) -> int:
    """The value of an unlabelled counter in Prometheus text; 0 when absent."""
    for line in metrics_text.splitlines():
        if line.startswith(name + " "):
            return int(float(line.split()[1]))
    return 0


def samples_csv(samples: Iterable[Sample]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, [f.name for f in fields(Sample)], lineterminator="\n")
    writer.writeheader()
    for sample in samples:
        row = asdict(sample)
        row["t_s"] = f"{sample.t_s:.1f}"
        row["rss_mb"] = f"{sample.rss_mb:.1f}"
        row["counted_per_s"] = f"{sample.counted_per_s:.1f}"
        writer.writerow(row)
    return out.getvalue()
