"""Bringing a partition's state store up to its changelog's end, before the partition consumes.

A store that reflects the changelog up to some offset replays only what was committed after it;
a missing or unusable one is rebuilt from the changelog's start. This runs in a task of its own,
outside the rebalance callback, while the partition's input stays paused: the other partitions,
heartbeats, alerts and /health go on meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from metering_pipeline.logs import get_logger
from metering_pipeline.settings import Settings
from metering_pipeline.worker import changelog
from metering_pipeline.worker.state_store import PartitionStore, StoreResources

log = get_logger(__name__)

CHUNK = 20_000  # changelog entries fetched at a time
# Changelog bytes per store write: a write blocks the event loop, and an identity entry holds thousands of identities
# (about 100 ms per slice). Each slice is stored with its offset: progress survives a crash mid-restore.
SLICE_BYTES = 2 << 20
PROGRESS_EVERY = 10.0  # seconds between progress lines
PRUNE_AT = 100_000  # replayed rollups remembered before those already in ClickHouse are forgotten


@dataclass
class Restoration:
    """How far one partition's restore got, for /ready and /metrics."""

    partition: int
    start: int = 0  # changelog offsets replayed: from
    end: int = 0  # to (the end when the restore began)
    position: int = 0
    entries: int = 0  # replayed so far
    sunk_before: int = 0  # every rollup entry before this offset is in ClickHouse (the latest sunk entry says)
    touched: dict[bytes, int] = field(default_factory=dict)  # rollups replayed: changelog key -> its last offset

    def unsunk(self) -> list[bytes]:
        """Changelog keys of the replayed rollups ClickHouse may not have (their checkpoints' writes may not have
        reached it before the last owner stopped)."""
        return [key for key, offset in self.touched.items() if offset >= self.sunk_before]

    def note(self, key: bytes, value: bytes | None, offset: int) -> None:
        if key.startswith(changelog.ROLLUP_PREFIX):
            self.touched[key] = offset
        elif key == changelog.SUNK_KEY and value is not None:
            self.sunk_before = int(value)
            if len(self.touched) > PRUNE_AT:
                self.touched = {key: at for key, at in self.touched.items() if at >= self.sunk_before}

    @property
    def remaining(self) -> int:
        return max(0, self.end - self.position)


async def restore(
    settings: Settings,
    store: PartitionStore,
    owner: str,
    resources: StoreResources,
    tp: TopicPartition,
    progress: Restoration,
) -> PartitionStore:
    """Replay the committed changelog from where `store` stands to its end; returns the store (a new, rebuilt one if
    this one's offsets do not fit the changelog)."""
    reader = AIOKafkaConsumer(
        **settings.kafka_client_options(), enable_auto_commit=False, isolation_level="read_committed"
    )
    await reader.start()
    try:
        reader.assign([tp])
        first = (await reader.beginning_offsets([tp]))[tp]
        end = (await reader.end_offsets([tp]))[tp]
        start = store.replay_from
        if start is not None and not first <= start <= end:
            log.warning(
                "state store rebuilt from the changelog",
                partition=tp.partition,
                reason=f"it stands at changelog offset {start}, outside the changelog's {first}..{end}",
            )
            store = store.wipe(owner, resources)
            start = None
        # From where ClickHouse may lack rollups, if that is earlier: replaying entries the store has changes nothing,
        # and the rollups replayed from there are written to ClickHouse again.
        sunk = store.sunk_before
        start = first if start is None or sunk is None else max(first, min(start, sunk))
        progress.sunk_before = start
        progress.start = progress.position = start
        progress.end = end
        reader.seek(tp, start)
        began = last_said = time.monotonic()
        while progress.position < end:
            batch = await reader.getmany(tp, timeout_ms=500, max_records=CHUNK)
            for part in _slices(batch.get(tp, [])):
                for message in part:
                    progress.note(message.key, message.value, message.offset)
                store.write([(message.key, message.value) for message in part], part[-1].offset + 1)
                progress.entries += len(part)
                await asyncio.sleep(0)  # the loop's other work (heartbeats, other partitions) between slices
            progress.position = await reader.position(tp)
            if time.monotonic() - last_said >= PROGRESS_EVERY:
                last_said = time.monotonic()
                log.info(
                    "restoring partition state",
                    partition=tp.partition,
                    entries=progress.entries,
                    remaining_offsets=progress.remaining,
                )
        seconds = time.monotonic() - began
        log.info(
            "partition state restored",
            partition=tp.partition,
            entries=progress.entries,
            seconds=round(seconds, 2),
            entries_per_second=round(progress.entries / seconds) if seconds > 0 else None,
        )
        return store
    finally:
        await reader.stop()


def _slices(messages: list[ConsumerRecord]) -> Iterator[list[ConsumerRecord]]:
    part: list[ConsumerRecord] = []
    size = 0
    for message in messages:
        part.append(message)
        size += len(message.key or b"") + len(message.value or b"")
        if size >= SLICE_BYTES:
            yield part
            part, size = [], 0
    if part:
        yield part
