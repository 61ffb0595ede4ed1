"""Checkpoints handed to the writer: frozen as of their offset, merged when the writer fell behind."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from counted_records import counted as counted_record

from metering_pipeline.settings import Settings
from metering_pipeline.usage.rollups import PartitionRollups
from metering_pipeline.usage.routed_record import CountedRecord
from metering_pipeline.worker.checkpoints import (
    CHECKPOINTS_IN_FLIGHT,
    Committed,
    PartitionWriter,
    Snapshot,
    checkpoint_due,
    merged,
)
from metering_pipeline.worker.stats import WorkerStats
from metering_schemas import PeriodType

AT = datetime(2026, 11, 24, 10, 15, tzinfo=UTC)


def counted(record_id: str, quantity: str) -> CountedRecord:
    return counted_record(record_id, AT, quantity, metric="tokens")


def _hourly(snapshot: Snapshot) -> Decimal:
    [change] = [c for c in snapshot.changes.rollups if c.key[3] is PeriodType.HOURLY]
    return Decimal(change.total_text)


def test_a_checkpoint_keeps_its_values_while_later_records_change_the_state():
    state = PartitionRollups(timedelta(hours=24))
    state.apply([counted("a", "1.5")], 0, AT)
    first = Snapshot(1, state.checkpoint(), [])
    state.apply([counted("b", "2")], 1, AT)
    assert _hourly(first) == Decimal("1.5")  # not 3.5: the writer commits what offset 1 covers
    assert _hourly(Snapshot(2, state.checkpoint(), [])) == Decimal("3.5")


def test_merged_checkpoints_carry_every_record_and_identity_the_latest_rollups_and_the_last_offset():
    state = PartitionRollups(timedelta(hours=24))
    state.apply([counted("a", "1")], 0, AT)
    first = Snapshot(1, state.checkpoint(), [b"d|old.0"])
    state.apply([counted("b", "2"), counted("a", "1")], 2, AT)  # a second "a" is a duplicate
    second = Snapshot(3, state.checkpoint(), [b"r|evicted"])

    both = merged([first, second])

    assert both.offset == 3
    assert [r.record_id for r in both.changes.records] == ["a", "b"]
    assert [identity[2] for identity, _ in both.changes.identities] == ["a", "b"]
    assert both.expired == [b"d|old.0", b"r|evicted"]
    assert len(both.changes.rollups) == len(second.changes.rollups) == 4  # hour, day, month, all time: once each
    assert _hourly(both) == Decimal("3")
    assert both.records == 2
    assert merged([first]) is first


class _Sink:
    """Records what the writer writes; fails while `down` (as ClickHouse during an outage)."""

    def __init__(self, log: list) -> None:
        self.log = log
        self.down = False

    async def write_records(self, records) -> None:
        if self.down:
            raise ConnectionError("ClickHouse is down")
        self.log.append(("records", [r.record_id for r in records]))

    async def write_rollups(self, changes) -> None:
        if self.down:
            raise ConnectionError("ClickHouse is down")
        self.log.append(("rollups", len(changes)))


class _Committer:
    """Records each commit; raises while `fenced` (as a producer another owner fenced)."""

    def __init__(self, log: list) -> None:
        self.log = log
        self.fenced = False

    async def commit(self, snapshot: Snapshot) -> Committed:
        if self.fenced:
            raise RuntimeError("fenced")
        self.log.append(("commit", snapshot.offset))
        return Committed([], snapshot.offset, snapshot.changes.generation)


def test_the_writer_commits_after_the_records_merges_what_queued_up_meanwhile_and_keeps_a_failure_visible():
    async def scenario() -> None:
        log: list = []
        sink = _Sink(log)
        committer = _Committer(log)
        writer = PartitionWriter(sink, committer, WorkerStats())  # type: ignore[arg-type]
        state = PartitionRollups(timedelta(hours=24))
        sink.down = True
        for offset, record_id in enumerate("abc"):  # three checkpoints while ClickHouse is down
            state.apply([counted(record_id, "1")], offset, AT)
            writer.submit(Snapshot(offset + 1, state.checkpoint(), []))
            await asyncio.sleep(0.05)
        assert log == [] and writer.buffered == 3
        sink.down = False
        assert await writer.settle(5)
        # The write that was retrying goes first; what queued up behind it goes as one checkpoint.
        assert log == [
            ("records", ["a"]),
            ("commit", 1),
            ("rollups", 3),
            ("records", ["b", "c"]),
            ("commit", 3),
            ("rollups", 3),
        ]
        assert writer.buffered == 0 and writer.unsettled_keys() == set()
        # Both commits are there for the state store, in order; ClickHouse has the rollups of both.
        assert [(c.end_offset, c.generation) for c in writer.committed] == [(1, 1), (3, 3)]
        assert writer.sunk_before == 3

        committer.fenced = True
        state.apply([counted("d", "1")], 3, AT)
        writer.submit(Snapshot(4, state.checkpoint(), []))
        assert not await writer.settle(5)
        state.apply([counted("e", "1")], 4, AT)
        writer.submit(Snapshot(5, state.checkpoint(), []))  # does not hide the failure by starting over
        assert isinstance(writer.failure(), RuntimeError) and writer.buffered == 2

    asyncio.run(scenario())


def test_a_partition_handed_over_waits_for_its_commits_but_not_for_clickhouse_to_take_its_rollups():
    async def scenario() -> None:
        log: list = []
        sink = _Sink(log)

        async def hang(changes) -> None:  # ClickHouse took the records, then stopped answering
            await asyncio.Event().wait()

        sink.write_rollups = hang  # type: ignore[method-assign]
        writer = PartitionWriter(sink, _Committer(log), WorkerStats())  # type: ignore[arg-type]
        state = PartitionRollups(timedelta(hours=24))
        state.apply([counted("a", "1")], 0, AT)
        writer.submit(Snapshot(1, state.checkpoint(), []))
        assert await asyncio.wait_for(writer.settle(30, rollups=False), 1)  # the next owner writes the rollups again
        assert log == [("records", ["a"]), ("commit", 1)]
        # Committed: for the state store at once; ClickHouse lacks its rollups, so a restore would write them again.
        assert [c.end_offset for c in writer.committed] == [1] and writer.sunk_before is None
        assert not await writer.settle(0.2)  # with them: abandoned at the timeout
        assert writer.failure() is None

    asyncio.run(scenario())


def test_a_checkpoint_is_due_every_flush_interval_and_sooner_once_its_records_fill_a_share_of_the_bound():
    settings = Settings(flush_interval=1.0, max_buffered_records=40_000)
    share = 40_000 // CHECKPOINTS_IN_FLIGHT
    assert not checkpoint_due(0.2, share - 1, settings)
    assert checkpoint_due(0.2, share, settings)  # the loop need not wait out the interval with the bound filling
    assert checkpoint_due(1.0, 0, settings)
