"""The move `metering repartition` plans for a changelog partition's state, applied to real RocksDB stores as a
restore replays it: every subject's rollups, distinct values, markers and identities end up in exactly the store of
its new partition, none lost, none left behind, and the counts a worker reads from them are the ones before the
move. Also which partition counts the command accepts."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from counted_records import counted as record, view

from metering_pipeline.usage.rollups import PartitionRollups, RollupKey
from metering_pipeline.usage.thresholds import Marker
from metering_pipeline.worker import changelog
from metering_pipeline.worker.repartition import RepartitionError, _count_before, plan_moves
from metering_pipeline.worker.routing import subject_partition
from metering_pipeline.worker.state_store import PartitionStore, StoreResources
from metering_schemas import AggregationType

BEFORE, AFTER = 2, 5
NOW = datetime(2026, 11, 24, 12, 30, tzinfo=UTC)
AT = NOW - timedelta(minutes=20)
SUBJECTS = [f"s{n}" for n in range(30)]


def partition_of(subject_type: str, subject_id: str) -> int:
    return subject_partition(subject_type, subject_id, AFTER)


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[list[PartitionStore]]:
    opened = [
        PartitionStore.open(tmp_path / f"p{p}", f"changelog/{p}", StoreResources.of_size(4 << 20, 4 << 20))[0]
        for p in range(AFTER)
    ]
    yield opened
    for store in opened:
        store.close()


def test_every_subjects_state_moves_to_its_new_partition_and_nothing_else_moves(stores):
    state = {p: PartitionRollups(timedelta(days=2)) for p in range(BEFORE)}  # each old partition's subjects
    markers: dict[int, list[tuple[bytes, bytes | None]]] = {p: [] for p in range(BEFORE)}
    for subject in SUBJECTS:
        old = subject_partition("org", subject, BEFORE)
        state[old].apply(
            [
                record(f"{subject}-1", AT, "2.5", subject=subject),
                record(f"{subject}-2", AT, "1", subject=subject),
                record(
                    f"{subject}-u",
                    AT,
                    subject=subject,
                    metric="users",
                    aggregation=AggregationType.UNIQUE_COUNT,
                    distinct=f"user-of-{subject}",
                ),
            ],
            0,
            NOW,
        )
        markers[old].append(
            changelog.marker_entry(
                ("cap", "org", subject, NOW.replace(day=1, hour=0, minute=30)), Marker(Decimal("3"), approaching=True)
            )
        )
    logs: dict[int, list[tuple[bytes, bytes | None]]] = {}
    for p in range(BEFORE):  # what each old changelog partition holds: a checkpoint's entries, its markers, sunk
        checkpoint = state[p].checkpoint()
        logs[p] = [
            *(changelog.rollup_entry(change) for change in checkpoint.rollups),
            *changelog.distinct_entries(checkpoint.distinct),
            *changelog.identities_entries(7, checkpoint.identities),
            *markers[p],
            changelog.sunk_entry(3),
        ]
    for p in range(BEFORE, AFTER):
        logs[p] = []
    for p in range(BEFORE):  # the stores a worker had before the move
        stores[p].write(logs[p], replay_from=len(logs[p]))

    for p in range(BEFORE):
        latest = {key: value for key, value in logs[p] if value is not None}
        for writes in plan_moves(p, latest, partition_of):
            for target, key, value in writes:
                logs[target].append((key, value))
    for p in range(AFTER):  # each store replays its changelog's new end, tombstones and copies included
        stores[p].write(logs[p], replay_from=len(logs[p]))

    for subject in SUBJECTS:
        old, new = subject_partition("org", subject, BEFORE), partition_of("org", subject)
        keys: list[RollupKey] = [k for k in state[old].rollups if k[2] == subject]
        assert keys and all(view(stores[new].rollup(k)) == view(state[old].rollups[k]) for k in keys), subject
        identities = [("org", subject, f"{subject}-{n}") for n in ("1", "2", "u")]
        assert all(stores[new].seen(identity) for identity in identities), subject
        users = next(k for k in keys if k[0] == "users")
        assert stores[new].distinct_values(users) == {f"user-of-{subject}"}
        for other in set(range(AFTER)) - {new}:  # nothing of it anywhere else, the partition it left included
            assert not any(stores[other].rollup(k) for k in keys), (subject, other)
            assert not any(stores[other].seen(identity) for identity in identities), (subject, other)
            assert stores[other].distinct_values(users) == set()
    for p in range(AFTER):
        assert sorted(m[0][2] for m in stores[p].markers()) == sorted(
            s for s in SUBJECTS if partition_of("org", s) == p
        )
    # Where ClickHouse stands is each partition's own offset: it stays where it was.
    assert [stores[p].db.get(changelog.SUNK_KEY) for p in range(AFTER)] == [b"3", b"3", None, None, None]

    # Planned again over the moved state: nothing more moves.
    for p in range(AFTER):
        latest: dict[bytes, bytes] = {}
        for key, value in logs[p]:
            if value is None:
                latest.pop(key, None)
            else:
                latest[key] = value
        assert plan_moves(p, latest, partition_of) == []


def test_an_entry_of_an_unknown_kind_stops_the_plan_before_anything_is_written():
    with pytest.raises(RepartitionError, match="changelog partition 1: a changelog entry of a kind"):
        plan_moves(1, {b"z|something": b"1"}, partition_of)


@pytest.mark.parametrize(
    ("routed", "changelog_count", "recorded", "partitions", "before"),
    [
        (4, 4, 4, 6, 4),  # the usual: grow from the recorded count
        (4, 4, None, 6, 4),  # no count recorded yet (workers of an older version): the topics' own
        (6, 6, 4, 6, 4),  # an earlier run grew the topics and stopped before recording: it continues
        (6, 4, 4, 6, 4),  # an earlier run stopped between growing the two topics
    ],
)
def test_the_count_the_state_is_laid_out_for(routed, changelog_count, recorded, partitions, before):
    assert _count_before(routed, changelog_count, recorded, partitions) == before


@pytest.mark.parametrize(
    ("routed", "changelog_count", "recorded", "partitions", "said"),
    [
        (4, 4, 4, 4, "Kafka can only add partitions"),
        (4, 4, 4, 3, "Kafka can only add partitions"),
        (6, 6, 4, 8, "run this with --partitions 6"),  # an unfinished move to 6 must finish first
        (5, 4, 4, 6, "run this with --partitions 5"),  # partitions added by hand to one topic
    ],
)
def test_counts_it_refuses(routed, changelog_count, recorded, partitions, said):
    with pytest.raises(RepartitionError, match=said):
        _count_before(routed, changelog_count, recorded, partitions)
