"""A partition's checkpoints, written in order behind the consuming loop.

The loop takes a checkpoint (what changed, frozen as of the offset it reached) and hands it
to the partition's writer; the writer puts the new usage records into ClickHouse, commits
the checkpoint's Kafka transaction (changelog, events, consumer offset), then writes the
changed rollups. A committed checkpoint goes to the partition's state store at once (`committed`);
once its rollups are in ClickHouse too, `sunk_before` moves past its changelog entries (a
restore writes again only the rollups it replays from there). So a ClickHouse outage holds up
only the writer: the loop keeps consuming and alerting until `max_buffered_records` wait in the
writer (queued, or committed with their rollups not yet in ClickHouse), then pauses its
partitions (backpressure) instead of growing without bound. A crash loses only checkpoints
that were not committed, and those are replayed from the committed offset. Only transient
write errors are retried (`failing` says since when, for /health); a permanent one fails the
writer before its commit, and the stage stops the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from metering_pipeline.retry import FailingStreak, until_success
from metering_pipeline.settings import Settings
from metering_pipeline.usage.rollups import Checkpoint, RollupChange, RollupKey
from metering_pipeline.warehouse.errors import is_transient
from metering_pipeline.warehouse.sink import ClickHouseSink
from metering_pipeline.worker.stats import WorkerStats

# Checkpoints that fit in METERING_MAX_BUFFERED_RECORDS at once: one filling while the writers write the others.
CHECKPOINTS_IN_FLIGHT = 4


def checkpoint_due(elapsed: float, pending: int, settings: Settings) -> bool:
    """Every METERING_FLUSH_INTERVAL, and sooner once the records waiting for one fill a share of
    METERING_MAX_BUFFERED_RECORDS: then the loop goes on counting while the writers write, and the bound need not
    hold a whole interval's records (at 15k records/s, one second and its write are 30k)."""
    return elapsed >= settings.flush_interval or pending >= settings.max_buffered_records // CHECKPOINTS_IN_FLIGHT


@dataclass(frozen=True)
class Snapshot:
    """One checkpoint of one partition, up to (not including) `offset`."""

    offset: int
    changes: Checkpoint
    expired: list[bytes]  # changelog keys to tombstone

    @property
    def records(self) -> int:
        return len(self.changes.records)


@dataclass(frozen=True)
class Committed:
    """What a committed checkpoint wrote to its partition's changelog, for the partition's state store."""

    entries: list[tuple[bytes, bytes | None]]  # in log order
    end_offset: int | None  # the changelog offset after its last entry (None: it wrote none)
    generation: int  # of the state's checkpoints


class Committer(Protocol):
    async def commit(self, snapshot: Snapshot) -> Committed:
        """One Kafka transaction: the changelog, the events and the consumer offset of `snapshot`."""
        ...


def merged(snapshots: list[Snapshot]) -> Snapshot:
    """Consecutive checkpoints as one: a writer that fell behind catches up in one round trip, not one per
    checkpoint."""
    if len(snapshots) == 1:
        return snapshots[0]
    rollups = {change.key: change for snapshot in snapshots for change in snapshot.changes.rollups}  # the latest wins
    changes = Checkpoint(
        list(rollups.values()),
        [record for snapshot in snapshots for record in snapshot.changes.records],
        [identity for snapshot in snapshots for identity in snapshot.changes.identities],
        [record for snapshot in snapshots for record in snapshot.changes.closed],
        [value for snapshot in snapshots for value in snapshot.changes.distinct],
        [record for snapshot in snapshots for record in snapshot.changes.limited],
        snapshots[-1].changes.generation,
    )
    return Snapshot(snapshots[-1].offset, changes, [key for snapshot in snapshots for key in snapshot.expired])


class PartitionWriter:
    def __init__(self, sink: ClickHouseSink, committer: Committer, stats: WorkerStats) -> None:
        self.sink = sink
        self.committer = committer
        self.stats = stats
        self.queue: deque[Snapshot] = deque()
        self.unsunk: dict[RollupKey, RollupChange] = {}  # committed, not yet in ClickHouse
        self.committed: list[Committed] = []  # for the state store, in order
        self.sunk_before: int | None = None  # a changelog offset before which every rollup entry is in ClickHouse
        self.buffered = 0  # counted records queued, or committed with their rollups not yet in ClickHouse
        self._unsunk_records = 0
        self._unsunk_end: int | None = None  # the changelog end of the last commit
        # ClickHouse writes retrying since (for /health); cleared by a write that succeeds.
        self.failing = FailingStreak()
        self._task: asyncio.Task[None] | None = None
        self._progress = asyncio.Event()  # set after each commit and each rollups write: `settle` looks again

    def submit(self, snapshot: Snapshot) -> None:
        self.queue.append(snapshot)
        self.buffered += snapshot.records
        self._kick()

    def resink(self, changes: list[RollupChange], restored_to: int) -> None:
        """Rollups committed by an earlier owner that may not have reached ClickHouse before it stopped; once they are
        written, ClickHouse has every rollup of the changelog before `restored_to` (where the restore ended)."""
        self.unsunk.update((change.key, change) for change in changes if change.reported)
        self._unsunk_end = restored_to
        if self.unsunk:
            self._kick()
        else:
            self.sunk_before = restored_to

    @property
    def busy(self) -> bool:
        """A checkpoint is still being written."""
        return bool(self.queue)

    def unsettled_keys(self) -> set[RollupKey]:
        """Rollups whose latest value is not in ClickHouse yet (their changelog entries must stay)."""
        return set(self.unsunk).union(*({c.key for c in s.changes.rollups} for s in self.queue))

    def failure(self) -> BaseException | None:
        if self._task is None or not self._task.done() or self._task.cancelled():
            return None
        return self._task.exception()

    async def settle(self, timeout: float, rollups: bool = True) -> bool:
        """Wait until everything submitted is committed and, with `rollups`, its rollups are in ClickHouse; False (and
        the rest abandoned) after `timeout`. A partition handed to another owner needs only the commits: the next
        owner restores the committed rollups from the changelog and writes them again itself."""
        deadline = time.monotonic() + timeout
        while self._task is not None and not self._task.done() and self._pending(rollups):
            self._progress.clear()
            progress = asyncio.ensure_future(self._progress.wait())
            done, _ = await asyncio.wait({self._task, progress}, timeout=max(0.0, deadline - time.monotonic()))
            progress.cancel()
            if not done:
                await self.stop()
        return not self._pending(rollups)

    def _pending(self, rollups: bool) -> bool:
        """What a failed write leaves here too: a checkpoint stays queued until committed, a rollup until written."""
        return bool(self.queue or (rollups and self.unsunk))

    async def stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.failure()  # seen: when another writer's failure stopped the stage, this one's is not "never retrieved"

    def _kick(self) -> None:
        if self._task is None or (self._task.done() and self.failure() is None):  # a failure stays for the stage to see
            self._task = asyncio.create_task(self._write())

    async def _write(self) -> None:
        while self.queue or self.unsunk:
            if self.queue:
                taken = len(self.queue)
                snapshot = merged(list(self.queue))
                started = time.monotonic()
                # Records before the commit: a replay of this checkpoint rewrites the same rows.
                await until_success(
                    lambda: self.sink.write_records(snapshot.changes.records),  # noqa: B023 - awaited in this iteration
                    "write usage_records",
                    transient=is_transient,
                    streak=self.failing,
                )
                committed = await self.committer.commit(snapshot)
                self.committed.append(committed)
                self._unsunk_end = committed.end_offset if committed.end_offset is not None else self._unsunk_end
                for _ in range(taken):
                    self.queue.popleft()
                self._unsunk_records += snapshot.records
                self.unsunk.update((c.key, c) for c in snapshot.changes.rollups if c.reported)
                self.stats.flushes += 1
                self.stats.flush_seconds.observe(time.monotonic() - started)
            if self.unsunk:
                changes = list(self.unsunk.values())
                await until_success(
                    lambda: self.sink.write_rollups(changes),  # noqa: B023 - awaited in this iteration
                    "write usage_rollups",
                    transient=is_transient,
                    streak=self.failing,
                )
                for change in changes:
                    if self.unsunk.get(change.key) is change:  # not replaced by a newer value meanwhile
                        del self.unsunk[change.key]
            if not self.unsunk:
                self.sunk_before = self._unsunk_end
                self.buffered -= self._unsunk_records
                self._unsunk_records = 0
            self._progress.set()
