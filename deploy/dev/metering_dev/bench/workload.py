"""The benchmark's synthetic usage: deterministic records and the totals they must roll up to.

Subjects × metrics of every aggregation type; quantities are decimal strings with two places,
timestamps spread over the last hours, so the exact expected rollups are known in advance.
`DimensionWorkload` is the dimensions phase's: a SUM metric read from the payload and grouped by
two dimensions of ten values each, and a UNIQUE_COUNT metric, with its expected rows likewise.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import orjson

ZONES = ("Asia/Kolkata", "America/New_York", "Asia/Kathmandu", "Europe/Berlin")  # of zoned subjects
METRICS = (
    ("bench_calls", "COUNT"),
    ("bench_tokens", "SUM"),
    ("bench_latency", "AVG"),
    ("bench_peak", "MAX"),
    ("bench_floor", "MIN"),
)
# Mean quantity of a workload record: quantities are (n * 7919 + seed) % 100000 / 100, spread evenly.
MEAN_QUANTITY = Decimal(500)


@dataclass
class Expected:
    """Per (metric, subject): the monthly totals the pipeline must reach, computed independently."""

    count: dict[tuple[str, str], int] = field(default_factory=dict)
    sum: dict[tuple[str, str], Decimal] = field(default_factory=dict)
    low: dict[tuple[str, str], Decimal] = field(default_factory=dict)
    high: dict[tuple[str, str], Decimal] = field(default_factory=dict)

    def add(self, metric: str, subject: str, quantity: Decimal) -> None:
        key = (metric, subject)
        self.count[key] = self.count.get(key, 0) + 1
        self.sum[key] = self.sum.get(key, Decimal(0)) + quantity
        self.low[key] = min(self.low.get(key, quantity), quantity)
        self.high[key] = max(self.high.get(key, quantity), quantity)

    def total(self, metric: str, subject: str, aggregation: str) -> Decimal:
        key = (metric, subject)
        if aggregation == "COUNT":
            return Decimal(self.count[key])
        if aggregation == "SUM":
            return self.sum[key]
        if aggregation == "MAX":
            return self.high[key]
        if aggregation == "MIN":
            return self.low[key]
        return (self.sum[key] / self.count[key]).quantize(Decimal("1e-18"))

    def records(self) -> int:
        return sum(self.count.values())


@dataclass(frozen=True)
class Workload:
    records: int
    subjects: int
    start: datetime  # records are spread over the hours before `start` (same calendar month)
    seed: int = 1

    spread_hours: int = 3
    zoned_share: float = 0.0  # of subjects in a time zone other than UTC (`subject_settings`)

    @classmethod
    def recent(cls, records: int, subjects: int, seed: int = 1, zoned_share: float = 0.0) -> Workload:
        """Records over the last few hours, all inside this calendar month so the monthly check sees each one."""
        now = datetime.now(UTC) - timedelta(minutes=1)
        month_start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        spread = min(3, int((now - month_start).total_seconds() // 3600))
        return cls(records, subjects, now, seed, spread, zoned_share)

    def subject_settings(self) -> list[dict]:
        """metering.subjects entries putting every (1 / zoned_share)-th subject in a zone other than UTC, since long
        before the records (the rest stay in UTC)."""
        if not self.zoned_share:
            return []
        step = max(1, round(1 / self.zoned_share))
        return [
            {
                "subjectType": "org",
                "subjectId": f"s{n}",
                "timeZone": ZONES[(n // step) % len(ZONES)],
                "previousTimeZone": "UTC",
                "effectiveFrom": "2000-01-01T00:00:00Z",
            }
            for n in range(0, self.subjects, step)
        ]

    @staticmethod
    def definitions() -> tuple[dict, ...]:
        return tuple(
            {"id": key, "key": key, "name": key, "aggregationType": aggregation, "resetPeriod": "MONTHLY"}
            for key, aggregation in METRICS
        )

    @staticmethod
    def expectation() -> Expected:
        return Expected()

    def record(self, n: int) -> tuple[str, str, Decimal, dict]:
        metric = METRICS[(n // self.subjects) % len(METRICS)][0]
        subject = f"s{(n * 7 + self.seed) % self.subjects}"
        quantity = Decimal((n * 7919 + self.seed) % 100_000) / 100
        at = self.start - timedelta(hours=(n * 13) % (self.spread_hours + 1))
        return (
            metric,
            subject,
            quantity,
            {
                "id": f"b{self.seed}-{n}",
                "metricKey": metric,
                "subjectType": "org",
                "subjectId": subject,
                "quantity": str(quantity),
                "timestamp": at.isoformat(),
            },
        )

    def messages(self, batch: int, expected: Expected | None = None) -> Iterator[tuple[bytes | None, bytes]]:
        """(key, value) messages of `batch` records each (1: plain UsageRecords)."""

        def records() -> Iterator[tuple[str, dict]]:
            for n in range(self.records):
                metric, subject, quantity, record = self.record(n)
                if expected is not None:
                    expected.add(metric, subject, quantity)
                yield subject, record

        return as_messages(records(), batch)


# The dimensions phase: a SUM metric read from the payload and split by two dimensions of ten values each, and a
# UNIQUE_COUNT metric (distinct users). Records alternate between the two; every record carries the same metadata.
MODELS = tuple(f"model-{n}" for n in range(10))
REGIONS = tuple(f"region-{n}" for n in range(10))
DIMENSION_METRICS: tuple[dict, ...] = (
    # tokens: the quantity is read at $.metadata.tokens (the record's own `quantity` is 1 and must not be summed)
    {
        "id": "bench_dim_tokens",
        "key": "bench_dim_tokens",
        "name": "bench_dim_tokens",
        "aggregationType": "SUM",
        "resetPeriod": "MONTHLY",
        "valueProperty": "$.metadata.tokens",
        "groupBy": {"model": "$.metadata.model", "region": "$.metadata.region"},
    },
    {
        "id": "bench_active_users",
        "key": "bench_active_users",
        "name": "bench_active_users",
        "aggregationType": "UNIQUE_COUNT",
        "resetPeriod": "MONTHLY",
        "valueProperty": "$.metadata.user",
    },
)
DimensionKey = tuple[tuple[str, str], ...]  # (name, value) pairs sorted by name; () is the total row


def _mix(n: int) -> int:
    """A cheap deterministic scramble of a record number (32-bit multiplicative hash and xor-shift): with plain
    `n * prime % users` a subject's records (every `subjects`-th n) would meet only a handful of users."""
    x = (n * 0x9E3779B1) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x85EBCA6B) & 0xFFFFFFFF
    return x ^ (x >> 13)


@dataclass
class DimensionExpected:
    """What usage_summary must hold for the dimensions workload, from the records alone.

    Monthly: every row, the total rows (`dimensions = {}`) and the grouped metric's row per (model, region), as
    (total_quantity, record_count). For the UNIQUE_COUNT metric also the hourly and daily total rows, keyed by the
    period's start (epoch seconds): its distinct count over a day is counted over the day, not added up from hours.
    """

    monthly: dict[tuple[str, str, DimensionKey], tuple[Decimal, int]] = field(default_factory=dict)
    periods: dict[tuple[str, str, str, int], tuple[Decimal, int]] = field(default_factory=dict)
    _sums: dict[tuple[str, str, DimensionKey], Decimal] = field(default_factory=dict)
    _counts: dict[tuple, int] = field(default_factory=dict)
    _distinct: dict[tuple, set[str]] = field(default_factory=dict)

    def add(self, metric: str, subject: str, at: datetime, metadata: dict) -> None:
        if metric == "bench_dim_tokens":
            tokens = Decimal(metadata["tokens"])
            for dims in ((), (("model", metadata["model"]), ("region", metadata["region"]))):
                key = (metric, subject, dims)
                self._sums[key] = self._sums.get(key, Decimal(0)) + tokens
                self._counts[key] = self._counts.get(key, 0) + 1
            return
        hour = int(at.replace(minute=0, second=0, microsecond=0).timestamp())
        day = int(at.replace(hour=0, minute=0, second=0, microsecond=0).timestamp())
        for key in ((metric, subject, ()), (metric, subject, "HOURLY", hour), (metric, subject, "DAILY", day)):
            self._counts[key] = self._counts.get(key, 0) + 1
            self._distinct.setdefault(key, set()).add(metadata["user"])

    def finish(self) -> DimensionExpected:
        """Fill `monthly` and `periods` from what was added (call once all records are in)."""
        for key, count in self._counts.items():
            if key in self._sums:
                self.monthly[key] = (self._sums[key], count)  # type: ignore[index]
            elif len(key) == 3:
                self.monthly[key] = (Decimal(len(self._distinct[key])), count)  # type: ignore[index]
            else:
                self.periods[key] = (Decimal(len(self._distinct[key])), count)  # type: ignore[index]
        return self

    def records(self) -> int:
        return sum(count for (metric, _, dims), (_, count) in self.monthly.items() if dims == ())


@dataclass(frozen=True)
class DimensionWorkload:
    """Records of the two DIMENSION_METRICS, alternating, each with metadata {model, region, user, tokens}: one of
    10 models and 10 regions (100 combinations), one of `users` user ids, 1..4000 tokens (a JSON integer)."""

    records: int
    subjects: int
    users: int
    start: datetime
    seed: int = 3
    spread_hours: int = 3

    @classmethod
    def recent(cls, records: int, subjects: int, users: int, seed: int = 3) -> DimensionWorkload:
        base = Workload.recent(0, 1)
        return cls(records, subjects, users, base.start, seed, base.spread_hours)

    @staticmethod
    def definitions() -> tuple[dict, ...]:
        return DIMENSION_METRICS

    @staticmethod
    def expectation() -> DimensionExpected:
        return DimensionExpected()

    def record(self, n: int) -> tuple[str, str, datetime, dict]:
        metric = DIMENSION_METRICS[n % 2]["key"]
        subject = f"s{(n // 2 * 7 + self.seed) % self.subjects}"
        mixed = _mix(n + self.seed)
        metadata = {
            "model": MODELS[mixed % 10],
            "region": REGIONS[(mixed // 10) % 10],
            "user": f"u{(mixed // 100) % self.users}",
            "tokens": 1 + (n * 7919 + self.seed) % 4000,
        }
        at = self.start - timedelta(hours=(n * 13) % (self.spread_hours + 1))
        return (
            metric,
            subject,
            at,
            {
                "id": f"d{self.seed}-{n}",
                "metricKey": metric,
                "subjectType": "org",
                "subjectId": subject,
                "quantity": "1",
                "timestamp": at.isoformat(),
                "metadata": metadata,
            },
        )

    def messages(self, batch: int, expected: DimensionExpected | None = None) -> Iterator[tuple[bytes | None, bytes]]:
        """(key, value) messages of `batch` records each (1: plain UsageRecords); `expected` is finished at the end."""

        def records() -> Iterator[tuple[str, dict]]:
            for n in range(self.records):
                metric, subject, at, record = self.record(n)
                if expected is not None:
                    expected.add(metric, subject, at, record["metadata"])
                yield subject, record
            if expected is not None:
                expected.finish()

        return as_messages(records(), batch)


def as_messages(records: Iterable[tuple[str, dict]], batch: int) -> Iterator[tuple[bytes | None, bytes]]:
    """(key, value) messages of `batch` records each: 1 sends plain UsageRecords keyed by subject, more sends
    usage.recordBatch envelopes without a key."""
    chunk: list[dict] = []
    for subject, record in records:
        if batch == 1:
            yield f"org:{subject}".encode(), orjson.dumps(record)
            continue
        chunk.append(record)
        if len(chunk) == batch:
            yield None, orjson.dumps({"records": chunk})
            chunk = []
    if chunk:
        yield None, orjson.dumps({"records": chunk})
