"""`metering bench --hot-path`: the worker's per-record steps without Kafka or ClickHouse, µs of CPU per record.

The workload goes through the steps a poll at a time, as in the worker (garbage collector set as
the worker sets it, outputs made and dropped): read (decode and admit every message), route (encode
routed batches), decode the routed batches, roll up (de-duplicate; hour, day and month, and all time
for metrics that never reset), and at every checkpoint its outputs (changelog entries,
`usage.aggregated` events, ClickHouse rows, the state store's write batch). The state lives in a RocksDB
store in a temporary directory, as in the worker, with the cache the default METERING_STATE_CACHE_MB gives.
Each step's CPU time is summed, so the next person sees
where a record's time goes without a stack; the monthly totals are checked against the workload's
independently computed ones.

`state_costs` measures what the rollup state holds per distinct value of a UNIQUE_COUNT metric and per
dimension combination of a grouped metric (tracemalloc, in this process); `metering bench` prints it.
"""

from __future__ import annotations

import gc
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import TypeVar

from metering_dev.bench.workload import METRICS, Expected, Workload
from metering_pipeline.settings import Settings
from metering_pipeline.usage.intake import IntakeRules, Message, read_message
from metering_pipeline.usage.metrics import MetricCatalog
from metering_pipeline.usage.rollups import CardinalityLimits, Checkpoint, CountedRecord, PartitionRollups
from metering_pipeline.warehouse.sink import records_body, rollups_body
from metering_pipeline.worker import changelog, garbage, routing
from metering_pipeline.worker.rollup_partition import CACHED_ROLLUP_BYTES, aggregated_event
from metering_pipeline.worker.rollup_stage import BLOCK_CACHE_SHARE, CACHE_SHARE, WRITE_BUFFER_SHARE
from metering_pipeline.worker.state_store import PartitionStore, StoreResources
from metering_schemas import AggregationType, MetricDefinition, PeriodType, ResetPeriod

T = TypeVar("T")


@dataclass(frozen=True)
class HotPathPlan:
    records: int = 200_000
    subjects: int = 10_000
    batch: int = 1  # records per usage.recorded message
    checkpoint_every: int = 20_000  # records per checkpoint (what one flush interval holds at 20k records/s)


@dataclass
class Step:
    name: str
    cpu_seconds: float

    def per_record(self, records: int) -> float:
        return self.cpu_seconds / records * 1e6


def run_hot_path(plan: HotPathPlan) -> tuple[list[Step], int]:
    """The steps' CPU time and the number of monthly totals that differ from the workload's."""
    garbage.tune()
    expected = Expected()
    workload = Workload.recent(plan.records, plan.subjects)
    received = datetime.now(UTC)
    messages = [
        Message("usage.recorded", 0, offset, received, key, value)
        for offset, (key, value) in enumerate(workload.messages(plan.batch, expected))
    ]
    catalog = MetricCatalog(
        {
            key: MetricDefinition(
                id=key, key=key, name=key, aggregation_type=AggregationType(kind), reset_period=ResetPeriod.MONTHLY
            )
            for key, kind in METRICS
        }
    )
    rules = IntakeRules()
    with tempfile.TemporaryDirectory(prefix="hot-path-") as directory:
        settings = Settings(state_dir=Path(directory))
        budget = settings.state_cache_mb << 20
        resources = StoreResources.of_size(int(budget * BLOCK_CACHE_SHARE), int(budget * WRITE_BUFFER_SHARE))
        store, _ = PartitionStore.open(Path(directory) / "p0", "hot-path/0", resources)
        try:
            state = PartitionRollups(
                timedelta(hours=24), stored=store, capacity=int(budget * CACHE_SHARE) // CACHED_ROLLUP_BYTES
            )
            stored = store.rollups(limit=state.capacity)
            if stored is not None:  # as a worker does: an empty store fits in the cache
                state.warm(stored)
            clock = _Clock()
            _run(plan, clock, state, store, messages, catalog, rules, received)
            return [Step(name, clock.spent[name]) for name in STEPS], _mismatches(state, expected)
        finally:
            store.close()


def _run(
    plan: HotPathPlan,
    clock: _Clock,
    state: PartitionRollups,
    store: PartitionStore,
    messages: list[Message],
    catalog: MetricCatalog,
    rules: IntakeRules,
    received: datetime,
) -> None:
    garbage.freeze_survivors()
    pending = 0
    unstored: list[tuple[Checkpoint, list[tuple[bytes, bytes | None]]]] = []
    per_poll = max(1, POLL_RECORDS // plan.batch)
    for offset, start in enumerate(range(0, len(messages), per_poll)):
        poll = messages[start : start + per_poll]
        accepted = clock.time(
            READ,
            lambda: [r for message in poll for r in read_message(message, catalog, rules).accepted],  # noqa: B023
        )
        routed = clock.time(ROUTE, lambda: [routing.encode(batch) for batch in routing.batches(accepted)])  # noqa: B023
        decoded = clock.time(DECODE, lambda: [routing.decode(value) for value in routed])  # noqa: B023
        clock.time(ROLL_UP, lambda: [state.apply(records, offset, received, set()) for records in decoded])  # noqa: B023
        pending += len(accepted)
        last = start + per_poll >= len(messages)
        if pending >= plan.checkpoint_every or last:
            pending = 0
            checkpoint = clock.time(CHECKPOINT, state.checkpoint)
            unstored.append((checkpoint, _write(clock, checkpoint, offset)))
            if len(unstored) >= STORE_EVERY or last:
                clock.time(STORE, lambda: _store(state, store, unstored, offset))  # noqa: B023
                unstored = []


def _store(
    state: PartitionRollups,
    store: PartitionStore,
    unstored: list[tuple[Checkpoint, list[tuple[bytes, bytes | None]]]],
    offset: int,
) -> None:
    """What the partition does every STORE_INTERVAL: one write of the checkpoints committed meanwhile, each key once."""
    latest: dict[bytes, bytes | None] = {}
    for _, entries in unstored:
        latest.update(entries)
    store.write(latest.items(), offset)
    state.stored_through(unstored[-1][0].generation)


POLL_RECORDS = 2_000  # records per simulated poll
# Checkpoints per state store write: STORE_INTERVAL (1 s) of checkpoints of 20,000 records at about 20,000 records/s.
STORE_EVERY = 1
READ, ROUTE, DECODE, ROLL_UP, CHECKPOINT = (
    "read: decode, validate, resolve the metric",
    "route: encode routed batches",
    "decode routed batches",
    "roll up: dedup, hour/day/month rollups",
    "checkpoint: freeze changed rollups",
)
CHANGELOG, EVENTS, RECORD_ROWS, ROLLUP_ROWS, STORE = (
    "changelog entries (rollups, identities)",
    "usage.aggregated events",
    "ClickHouse rows: usage_records",
    "ClickHouse rows: usage_rollups",
    "state store: the checkpoint's write batch",
)
STEPS = (READ, ROUTE, DECODE, ROLL_UP, CHECKPOINT, CHANGELOG, EVENTS, RECORD_ROWS, ROLLUP_ROWS, STORE)


class _Clock:
    def __init__(self) -> None:
        self.spent = dict.fromkeys(STEPS, 0.0)

    def time(self, step: str, work: Callable[[], T]) -> T:
        started = time.process_time()
        result = work()
        self.spent[step] += time.process_time() - started
        return result


def _write(clock: _Clock, checkpoint: Checkpoint, checkpoint_id: int) -> list[tuple[bytes, bytes | None]]:
    """What the writer makes of a checkpoint. Kafka entries are copied into a buffer and dropped, as a producer's
    batch builder does; ClickHouse bodies are built whole, as the sink does. Returns the changelog entries (the
    state store's next write)."""
    reported = [change for change in checkpoint.rollups if change.reported]
    entries: list[tuple[bytes, bytes | None]] = clock.time(
        CHANGELOG,
        lambda: [
            *map(changelog.rollup_entry, checkpoint.rollups),
            *changelog.identities_entries(checkpoint_id, checkpoint.identities),
        ],
    )
    clock.time(CHANGELOG, lambda: _buffered_entries(entries))
    clock.time(EVENTS, lambda: _buffered(aggregated_event(change) for change in reported))
    clock.time(RECORD_ROWS, lambda: records_body(checkpoint.records))
    clock.time(ROLLUP_ROWS, lambda: rollups_body(reported))
    return entries


def _buffered_entries(entries: list[tuple[bytes, bytes | None]]) -> int:
    """Entries as a producer's batch builder takes them: key and value copied into its buffer."""
    buffer = bytearray()
    for key, value in entries:
        buffer += key
        if value is not None:
            buffer += value
    return len(buffer)


def _buffered(values: Iterable[bytes]) -> int:
    buffer = bytearray()
    for value in values:
        buffer += value
    return len(buffer)


def _mismatches(state: PartitionRollups, expected: Expected) -> int:
    kinds = dict(METRICS)
    actual = {(key[0], key[2]): rollup.total() for key, rollup in state.rollups.items() if key[3] is PeriodType.MONTHLY}
    wanted = {key: expected.total(key[0], key[1], kinds[key[0]]) for key in expected.count}
    return sum(1 for key in wanted.keys() | actual.keys() if wanted.get(key) != actual.get(key))


# What one more distinct value or dimension combination costs the rollup state (issue 15: "state per distinct value and
# per dimension combination is bounded and documented ... measure it in the bench").


def state_costs(
    distinct_values: tuple[int, ...] = (20_000, 50_000), subjects: int = 200
) -> dict[str, dict[str, float]]:
    """Bytes of rollup state (tracemalloc: Python objects, not allocator slack) that one more distinct value of a
    UNIQUE_COUNT metric, and one more (model, region) combination of a grouped SUM metric, leave in a partition's
    PartitionRollups once their checkpoint is written; each is the difference between the same number of records
    with all values (combinations) different and with one value (combination), so the records' own state (dedup
    identities, total rows) cancels out.

    Distinct values: n records of one subject in one hour, each value new to the hour's, the day's and the month's
    set (three set entries, the value's string and its interning), for each n of `distinct_values`: a set's table
    grows in steps (×4, above 50,000 values ×2), so the cost per value depends on where the set is between two steps
    (20,000 is just past one, 50,000 near the next). Combinations: `subjects` subjects × 100 records in one hour,
    each subject seeing all 10 × 10 combinations (99 more than with one); each adds a row to the hour, the day and
    the month (a key tuple, a rollup and a dict slot each)."""
    costs: dict[str, dict[str, float]] = {}
    for n in distinct_values:
        held = _state_bytes(lambda i: _unique_record(i, f"user-{i:08d}"), n) - _state_bytes(
            lambda i: _unique_record(i, f"user-{0:08d}"), n
        )
        costs[f"distinct_value@{n}"] = {"bytes": held / n, "values": n}
    added = subjects * 99
    held = _state_bytes(lambda i: _grouped_record(i, subjects, i // subjects % 100), subjects * 100) - _state_bytes(
        lambda i: _grouped_record(i, subjects, 0), subjects * 100
    )
    costs["dimension_combination"] = {"bytes": held / added, "per_row": held / added / 3, "combinations": added}
    return costs


def render_state_costs(costs: dict[str, dict[str, float]]) -> str:
    values = [cost for key, cost in costs.items() if key.startswith("distinct_value@")]
    combination = costs["dimension_combination"]
    return (
        "rollup state (tracemalloc): "
        + " / ".join(f"{cost['bytes']:,.0f}" for cost in values)
        + " bytes per distinct value of a UNIQUE_COUNT "
        "metric at " + " / ".join(f"{cost['values']:,.0f}" for cost in values) + " values (new to its hour, day and "
        f"month: three set entries and the value's string); {combination['bytes']:,.0f} bytes per dimension "
        f"combination (a row in its hour, day and month, {combination['per_row']:,.0f} per row; "
        f"{combination['combinations']:,.0f} combinations)"
    )


_HOUR_START_MS = (int(time.time()) // 3600 - 1) * 3_600_000  # the previous whole hour: one hour, day and month


def _unique_record(n: int, value: str) -> CountedRecord:
    return CountedRecord(
        "org",
        "s0",
        f"r{n}",
        "active_users",
        "active_users",
        AggregationType.UNIQUE_COUNT,
        Decimal(1),
        _HOUR_START_MS + n % 3_600_000,
        "{}",
        False,
        (),
        value,
    )


def _grouped_record(n: int, subjects: int, combination: int) -> CountedRecord:
    dimensions = (("model", f"model-{combination // 10}"), ("region", f"region-{combination % 10}"))
    return CountedRecord(
        "org",
        f"s{n % subjects}",
        f"r{n}",
        "tokens",
        "tokens",
        AggregationType.SUM,
        Decimal(n % 4000 + 1),
        _HOUR_START_MS + n % 3_600_000,
        "{}",
        False,
        dimensions,
    )


def _state_bytes(make: Callable[[int], CountedRecord], records: int) -> int:
    """Traced bytes a PartitionRollups holds after `records` records (made while tracing, then dropped) and a
    checkpoint."""
    warm = PartitionRollups(timedelta(hours=24))  # caches (periods of the hour) filled before tracing
    warm.apply([make(records + 1)], 0, datetime.now(UTC))
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        state = PartitionRollups(
            timedelta(hours=24), CardinalityLimits(combinations=1_000, distinct_values=records + 1)
        )
        seen_at = datetime.now(UTC)
        for start in range(0, records, POLL_RECORDS):
            batch = [make(n) for n in range(start, min(records, start + POLL_RECORDS))]
            state.apply(batch, start, seen_at)
        del batch
        checkpoint = state.checkpoint()
        assert not checkpoint.limited, checkpoint.limited[:1]
        del checkpoint
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    del state
    return held
