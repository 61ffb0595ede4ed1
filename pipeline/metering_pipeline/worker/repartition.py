"""Growing the workers' internal topics to more partitions, each subject's state moved to its new partition.

A subject's partition is crc32 of its key modulo the partition count, and its state lives in the
changelog partition of that number, so a larger count moves most subjects. With every worker
stopped this
1. fences the rollup stage's transactional producers (a killed worker's open transaction is aborted);
2. adds the partitions to the routed topic and the changelog;
3. sends the routed records no worker has counted yet to their subjects' new partitions, and
   commits the rollup group past the originals, in one transaction per partition;
4. copies each moved subject's changelog entries (rollups, distinct values, alert markers, the
   identities that de-duplicate its records) to its new partition and tombstones them in the old
   one, each copy in the same transaction as its tombstone;
5. records the new count in the layout topic, the last step: until then workers refuse to start
   (the count it started from is recorded there before anything changes).

A run stopped anywhere leaves every record and entry in exactly one partition; running the same
command again finishes the move. Workers' local state stores stay valid: a store replays the
changelog from the offset it reflects, tombstones and copies included.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions
from aiokafka.structs import OffsetAndMetadata

from metering_pipeline.logs import get_logger
from metering_pipeline.settings import Settings
from metering_pipeline.topics import (
    Topics,
    ensure_topics,
    internal_topics,
    record_partitions,
    recorded_partitions,
    rollup_group,
    router_group,
    until_led,
)
from metering_pipeline.usage.routed_record import CountedRecord
from metering_pipeline.worker import changelog, routing
from metering_pipeline.worker.rollup_partition import transactional_ids

log = get_logger(__name__)

ENTRIES_PER_TRANSACTION = 5_000  # changelog entries moved per transaction, each with its tombstone
TRANSACTION_TIMEOUT_MS = 15 * 60 * 1000  # a partition's uncounted tail travels in one transaction

Write = tuple[int, bytes, bytes | None]  # (changelog partition, key, value or None for a tombstone)


class RepartitionError(RuntimeError):
    """The topics cannot be grown as asked; the message says why and what to do."""


@dataclass
class PartitionMove:
    """What one partition gave to the others."""

    partition: int
    rerouted_records: int = 0  # routed records not yet counted, sent to their subjects' new partitions
    moved_entries: int = 0  # changelog entries copied to another partition and tombstoned here


async def repartition(settings: Settings, partitions: int, wait: float) -> list[PartitionMove]:
    """Grows the routed topic and the changelog to `partitions`, moving state with the subjects (see the module);
    waits up to `wait` seconds for stopped workers to leave their groups."""
    if settings.processing_guarantee != "exactly_once":
        raise RepartitionError(
            "moving state between partitions needs Kafka transactions: run with "
            "METERING_PROCESSING_GUARANTEE=exactly_once (the default) on Apache Kafka"
        )
    topics = Topics.of(settings)
    admin = AIOKafkaAdminClient(**settings.kafka_client_options())
    await admin.start()
    try:
        present = set(await admin.list_topics())
        if not {topics.routed, topics.rollup_changelog} <= present:
            raise RepartitionError(
                f"{topics.routed} and {topics.rollup_changelog} do not exist yet: no worker has run, so there is no "
                "state to move; set METERING_USAGE_PARTITIONS and start the workers"
            )
        described = await admin.describe_topics([topics.routed, topics.rollup_changelog])
        counts = {d["topic"]: len(d["partitions"]) for d in described}
        recorded = await recorded_partitions(settings, topics.layout) if topics.layout in present else None
        before = _count_before(counts[topics.routed], counts[topics.rollup_changelog], recorded, partitions)
        await _refuse_while_workers_run(admin, settings, wait)
        await _fence(settings, before)
        if recorded is None:  # recorded before anything changes: a run stopped midway must know where it began
            await ensure_topics(settings, [spec for spec in internal_topics(settings) if spec.name == topics.layout])
            await record_partitions(settings, topics.layout, before)
        grow = {name: NewPartitions(partitions) for name, count in counts.items() if count < partitions}
        if grow:
            await admin.create_partitions(grow)
        await _until_grown(admin, [topics.routed, topics.rollup_changelog], partitions)
    finally:
        await admin.close()
    log.info("internal topics grown", topics=sorted(counts), partitions_before=before, partitions=partitions)
    moves = await _move(settings, topics, before, partitions)
    await record_partitions(settings, topics.layout, partitions)
    log.info("partition count recorded; workers may start", partitions=partitions, topic=topics.layout)
    return moves


def _count_before(routed: int, changelog_count: int, recorded: int | None, partitions: int) -> int:
    """The count the state is laid out for. Topics already at `partitions` with an older count recorded are an
    earlier run of this that stopped before its end: it continues."""
    before = recorded if recorded is not None else min(routed, changelog_count)
    grown = {routed, changelog_count} - {before}
    if grown and grown != {partitions}:
        raise RepartitionError(
            f"the internal topics have {routed} and {changelog_count} partitions and the workers last ran with "
            f"{before}; only an unfinished move to {max(grown)} can continue: run this with --partitions {max(grown)}"
        )
    if not grown and partitions <= before:
        raise RepartitionError(
            f"the internal topics have {before} partitions; Kafka can only add partitions: give a larger count"
        )
    return before


async def _refuse_while_workers_run(admin: AIOKafkaAdminClient, settings: Settings, wait: float) -> None:
    """A running router would keep routing by the old count, and a rollup stage would count against moving state.
    A killed worker stays a member until its session times out: this waits up to `wait` seconds for that."""
    deadline = time.monotonic() + wait
    while True:
        running = await _group_members(admin, [router_group(settings), rollup_group(settings)])
        if not running:
            return
        if time.monotonic() >= deadline:
            raise RepartitionError(
                "stop every worker first; members are still in "
                + "; ".join(f"{group} (from {', '.join(hosts)})" for group, hosts in sorted(running.items()))
            )
        log.info(
            "waiting for the workers' groups to empty", members=running, seconds_left=round(deadline - time.monotonic())
        )
        await asyncio.sleep(min(5.0, max(0.5, deadline - time.monotonic())))


async def _group_members(admin: AIOKafkaAdminClient, groups: list[str]) -> dict[str, list[str]]:
    """Per group with members: their hosts."""
    running = {}
    for name in groups:  # one at a time: aiokafka misreads an answer that describes two groups
        for response in await admin.describe_consumer_groups([name]):
            for group in response.to_object()["groups"]:
                if group["members"]:
                    running[group["group"]] = sorted({member["client_host"] for member in group["members"]})
    return running


async def _until_grown(admin: AIOKafkaAdminClient, names: list[str], partitions: int, timeout: float = 30.0) -> None:
    """Until the brokers' metadata has every new partition, each with a leader that serves it: a write to a partition
    missing from a producer's metadata fails."""
    deadline = time.monotonic() + timeout
    while not all(len(d["partitions"]) >= partitions for d in await admin.describe_topics(names)):
        if time.monotonic() >= deadline:
            raise RepartitionError(f"the brokers did not show {partitions} partitions of {', '.join(names)} in time")
        await asyncio.sleep(0.2)
    await until_led(admin, names)


async def _fence(settings: Settings, before: int) -> None:
    """Start and stop each partition's transactional producers: a killed worker's open transaction is aborted, so
    that what this reads (read_committed) is all there will be."""
    group, topics = rollup_group(settings), Topics.of(settings)
    for partition in range(before):
        for transactional_id in transactional_ids(group, topics.routed, partition):
            producer = AIOKafkaProducer(**settings.kafka_client_options(), transactional_id=transactional_id)
            await producer.start()
            try:
                await producer.begin_transaction()  # waits for the producer id: the fence itself
                await producer.abort_transaction()
            finally:
                await producer.stop()


async def _move(settings: Settings, topics: Topics, before: int, partitions: int) -> list[PartitionMove]:
    producer = AIOKafkaProducer(
        **settings.kafka_client_options(),
        acks="all",
        transactional_id=f"{settings.consumer_group_prefix}-repartition",  # fences an earlier run still going
        transaction_timeout_ms=TRANSACTION_TIMEOUT_MS,
        max_batch_size=1024 * 1024,
    )
    reader = AIOKafkaConsumer(
        **settings.kafka_client_options(),
        enable_auto_commit=False,
        isolation_level="read_committed",
        # A committed offset that retention has passed reads from the log's start, never from its end: the uncounted
        # tail must all be re-routed, or a worker would later count what is left of it in the old partition.
        auto_offset_reset="earliest",
    )
    admin = AIOKafkaAdminClient(**settings.kafka_client_options())
    await asyncio.gather(producer.start(), reader.start(), admin.start())
    try:

        def partition_of(subject_type: str, subject_id: str) -> int:
            return routing.subject_partition(subject_type, subject_id, partitions)

        routed = [TopicPartition(topics.routed, p) for p in range(before)]
        committed = await admin.list_consumer_group_offsets(rollup_group(settings), partitions=routed)
        moves = []
        for partition in range(before):
            move = PartitionMove(partition)
            tp = TopicPartition(topics.routed, partition)
            counted = committed.get(tp)
            uncounted = None if counted is None or counted.offset < 0 else counted.offset
            move.rerouted_records = await _reroute_tail(
                producer, reader, tp, uncounted, rollup_group(settings), partition_of
            )
            source = TopicPartition(topics.rollup_changelog, partition)
            move.moved_entries = await _move_entries(producer, reader, source, partition_of)
            log.info(
                "partition moved",
                partition=partition,
                rerouted_records=move.rerouted_records,
                moved_entries=move.moved_entries,
            )
            moves.append(move)
        return moves
    finally:
        await asyncio.gather(producer.stop(), reader.stop(), admin.close())


async def _reroute_tail(
    producer: AIOKafkaProducer,
    reader: AIOKafkaConsumer,
    tp: TopicPartition,
    uncounted: int | None,
    group: str,
    partition_of: Callable[[str, str], int],
) -> int:
    """The rollup group's uncounted routed records of `tp`, each to its subject's partition (those that stay, to the
    end of this one), and the group's offset past them, in one transaction; returns how many records."""
    records = 0
    messages = _committed_messages(reader, tp, uncounted)
    first = await anext(messages, None)
    if first is None:
        return 0
    async with producer.transaction():
        end = first.offset + 1
        message: ConsumerRecord | None = first
        while message is not None:
            by_partition: dict[int, list[CountedRecord]] = {}
            for record in routing.decode(message.value):
                by_partition.setdefault(partition_of(record.subject_type, record.subject_id), []).append(record)
                records += 1
            for partition, part in by_partition.items():
                await producer.send(tp.topic, routing.encode(part), partition=partition, headers=list(message.headers))
            end = message.offset + 1
            message = await anext(messages, None)
        await producer.send_offsets_to_transaction({tp: OffsetAndMetadata(end, "")}, group)
    return records


async def _move_entries(
    producer: AIOKafkaProducer, reader: AIOKafkaConsumer, tp: TopicPartition, partition_of: Callable[[str, str], int]
) -> int:
    """Copies the changelog entries of `tp` whose subjects belong elsewhere and tombstones them here (`plan_moves`);
    returns how many copies."""
    latest: dict[bytes, bytes] = {}
    async for message in _committed_messages(reader, tp, None):
        if message.value is None:
            latest.pop(message.key, None)
        else:
            latest[message.key] = message.value
    moves = plan_moves(tp.partition, latest, partition_of)
    moved = 0
    for start in range(0, len(moves), ENTRIES_PER_TRANSACTION):
        async with producer.transaction():
            for writes in moves[start : start + ENTRIES_PER_TRANSACTION]:
                for target, written, entry in writes:
                    await producer.send(tp.topic, entry, key=written, partition=target)
                    moved += target != tp.partition
    return moved


def plan_moves(
    partition: int, latest: dict[bytes, bytes], partition_of: Callable[[str, str], int]
) -> list[list[Write]]:
    """The writes that move a changelog partition's live entries (`latest`) whose subjects belong elsewhere, one list
    per move, written in one transaction. All entries are judged before anything is written: an entry of an unknown
    kind raises RepartitionError. An identity entry lists many subjects: it is tombstoned and written again as one
    entry per partition its identities go to, under keys of their own (a later tombstone of one must not delete the
    others' identities)."""
    moves: list[list[Write]] = []
    for key, value in latest.items():
        try:
            subject = changelog.entry_subject(key)
        except ValueError as error:
            raise RepartitionError(f"changelog partition {partition}: {error}; nothing was moved from it") from None
        if subject is not None:
            target = partition_of(*subject)
            if target != partition:
                moves.append([(target, key, value), (partition, key, None)])
        elif key.startswith(changelog.IDENTITIES_PREFIX):
            parts = changelog.split_identities(value, partition_of)
            if set(parts) != {partition}:
                # The tombstone first: it deletes the identities its entry listed, the part that stays among them.
                renamed = [(target, key + f"/{partition}>{target}".encode(), part) for target, part in parts.items()]
                moves.append([(partition, key, None), *renamed])
    return moves


async def _committed_messages(
    reader: AIOKafkaConsumer, tp: TopicPartition, start: int | None
) -> AsyncIterator[ConsumerRecord]:
    """The committed messages of `tp` from `start` (None: its beginning) to its end as it is now."""
    reader.assign([tp])
    if start is None:
        await reader.seek_to_beginning(tp)
    else:
        reader.seek(tp, start)
    end = (await reader.end_offsets([tp]))[tp]
    while await reader.position(tp) < end:
        for message in (await reader.getmany(tp, timeout_ms=1000)).get(tp, []):
            if message.offset < end:
                yield message
