"""The benchmark's synthetic usage: deterministic records and the totals they must roll up to.

Subjects × metrics of every aggregation type; quantities are decimal strings with two places,
timestamps spread over the last hours, so the exact expected rollups are known in advance.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import orjson

METRICS = (("bench_calls", "COUNT"), ("bench_tokens", "SUM"), ("bench_latency", "AVG"),
           ("bench_peak", "MAX"), ("bench_floor", "MIN"))


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

    @classmethod
    def recent(cls, records: int, subjects: int, seed: int = 1) -> Workload:
        """Records over the last few hours, all inside this calendar month so the monthly check sees each one."""
        now = datetime.now(timezone.utc) - timedelta(minutes=1)
        month_start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        return cls(records, subjects, now, seed, min(3, int((now - month_start).total_seconds() // 3600)))

    def record(self, n: int) -> tuple[str, str, Decimal, dict]:
        metric = METRICS[(n // self.subjects) % len(METRICS)][0]
        subject = f"s{(n * 7 + self.seed) % self.subjects}"
        quantity = Decimal((n * 7919 + self.seed) % 100_000) / 100
        at = self.start - timedelta(hours=(n * 13) % (self.spread_hours + 1))
        return metric, subject, quantity, {"id": f"b{self.seed}-{n}", "metricKey": metric, "subjectType": "org",
                                           "subjectId": subject, "quantity": str(quantity), "timestamp": at.isoformat()}

    def messages(self, batch: int, expected: Expected | None = None) -> Iterator[tuple[bytes | None, bytes]]:
        """(key, value) messages of `batch` records each (1: plain UsageRecords)."""
        chunk: list[dict] = []
        for n in range(self.records):
            metric, subject, quantity, record = self.record(n)
            if expected is not None:
                expected.add(metric, subject, quantity)
            if batch == 1:
                yield f"org:{subject}".encode(), orjson.dumps(record)
                continue
            chunk.append(record)
            if len(chunk) == batch:
                yield None, orjson.dumps({"records": chunk})
                chunk = []
        if chunk:
            yield None, orjson.dumps({"records": chunk})
