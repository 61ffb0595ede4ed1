"""A partition's state store (issue 25), on a real RocksDB in tmp_path: what a write of changelog entries makes
findable and what tombstones take away (index keys included), replays that change nothing, the expiry indexes, a
PartitionRollups whose RAM is a bounded cache over the store, what `open` reuses and what it wipes, and what a cached
rollup costs in RAM."""

from __future__ import annotations

import gc
import random
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from counted_records import counted as record, view

from metering_pipeline.settings import Settings
from metering_pipeline.topics import Topics, internal_topics
from metering_pipeline.usage.meter import Dimensions
from metering_pipeline.usage.periods import EPOCH, period_end, starts_of_hour
from metering_pipeline.usage.rollups import (
    LIFETIME,
    Checkpoint,
    PartitionRollups,
    Rollup,
    RollupChange,
    RollupKey,
    ValuesRollup,
)
from metering_pipeline.usage.routed_record import CountedRecord
from metering_pipeline.usage.thresholds import Marker
from metering_pipeline.worker import changelog
from metering_pipeline.worker.rollup_partition import CACHED_ROLLUP_BYTES
from metering_pipeline.worker.state_store import (
    EXPIRY_PREFIX,
    FORMAT,
    IDENTITY_PREFIX,
    STALE_AFTER,
    PartitionStore,
    StateStoreError,
    StoreResources,
)
from metering_schemas import AggregationType, PeriodType

UTC = UTC
SUM, LATEST, UNIQUE = AggregationType.SUM, AggregationType.LATEST, AggregationType.UNIQUE_COUNT
HOURLY, DAILY, MONTHLY = PeriodType.HOURLY, PeriodType.DAILY, PeriodType.MONTHLY
OWNER = "metering.rollup-changelog/0"
NOW = datetime(2026, 11, 24, 12, 30, tzinfo=UTC)
DAY = datetime(2026, 11, 24, tzinfo=UTC)
NOVEMBER = datetime(2026, 11, 1, tzinfo=UTC)
WINDOW = timedelta(days=2)  # dedup window
A, B = (("model", "a"),), (("model", "b"),)
WRITTEN_AT = b"m|written_at"
Entries = list[tuple[bytes, bytes | None]]


def open_store(path: Path, owner: str = OWNER) -> tuple[PartitionStore, str | None]:
    return PartitionStore.open(path, owner, StoreResources.of_size(8 << 20, 8 << 20))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[PartitionStore]:
    opened, why = open_store(tmp_path / "p0")
    assert why is None
    yield opened
    opened.close()


def key(
    period: PeriodType, start: datetime, dimensions: Dimensions = (), metric: str = "m", subject: str = "o"
) -> RollupKey:
    return (metric, "org", subject, period, start, dimensions)


def checkpoint_entries(checkpoint: Checkpoint, offset: int) -> Entries:
    """A checkpoint's changelog entries, as the worker's commit writes them."""
    return [
        *(changelog.rollup_entry(change) for change in checkpoint.rollups),
        *changelog.distinct_entries(checkpoint.distinct),
        *changelog.identities_entries(offset, checkpoint.identities),
    ]


def contents(store: PartitionStore) -> dict[bytes, bytes]:
    """Every key and value of the store but the time of its last write."""
    return {found: value for found, value in store.db.items() if found != WRITTEN_AT}


def expiry_keys_of(store: PartitionStore, entry_key: bytes) -> list[bytes]:
    """The expiry index's keys (its prefix, 8 bytes of time, the identity entry's changelog key) of an entry."""
    head = len(EXPIRY_PREFIX) + 8
    return [found for found in store.db.keys() if found.startswith(EXPIRY_PREFIX) and found[head:] == entry_key]


def stored_rollup_keys(store: PartitionStore) -> list[RollupKey]:
    return [key for key, _ in store.rollups(limit=1 << 40) or ()]


# --- What a write makes findable, and what tombstones take away -------------------------------------------------------


def test_entries_of_every_kind_are_found_by_the_lookups_and_tombstones_remove_them_and_their_index_keys(store):
    at = DAY.replace(hour=9, minute=15)
    state = PartitionRollups(WINDOW)
    state.apply(
        [
            record("s1", at, "2.5"),  # a plain SUM: hour, day, month and all time
            record("g1", at, "3", metric="grouped", dimensions=A),  # a dimension row beside its total row
            record("u1", at, metric="users", aggregation=UNIQUE, distinct="alice"),
            record("u2", at, metric="users", aggregation=UNIQUE, distinct="bob"),
            record("l1", at, "7", metric="last", aggregation=LATEST),
            record("l2", at - timedelta(minutes=1), "8", metric="last", aggregation=LATEST),  # older: l1 stays latest
        ],
        0,
        NOW - timedelta(minutes=5),
    )
    first = state.checkpoint()
    state.apply([record("s2", at + timedelta(days=1), "1", subject="p")], 1, NOW)
    second = state.checkpoint()
    marker_key = ("threshold-1", "org", "o", NOVEMBER)
    marker = Marker(Decimal("10.5"), approaching=True)
    entries = [
        *checkpoint_entries(first, 1),
        *checkpoint_entries(second, 2),
        changelog.marker_entry(marker_key, marker),
    ]
    store.write(entries, replay_from=3)

    assert len(state.rollups) == 6 * 4  # o's m, grouped (total and row A), users and last; p's m
    assert {k: view(store.rollup(k)) for k in state.rollups} == {k: view(r) for k, r in state.rollups.items()}
    assert {k: view(r) for k, r in store.rollups(limit=24) or ()} == {k: view(r) for k, r in state.rollups.items()}
    assert store.rollups(limit=23) is None  # more than fit
    users_day, grouped_day, row_day = (
        key(DAILY, DAY, metric="users"),
        key(DAILY, DAY, metric="grouped"),
        key(DAILY, DAY, A, metric="grouped"),
    )
    assert store.distinct_values(users_day) == {"alice", "bob"} and store.rollup(users_day).total() == 2
    last = store.rollup(key(DAILY, DAY, metric="last"))
    assert isinstance(last, ValuesRollup) and (last.latest_id, last.latest, last.total()) == ("l1", 7, 7)
    assert (store.dimension_rows(grouped_day), store.dimension_rows(users_day)) == (1, 0)
    assert store.subjects("m", "org", DAY) == {"o", "p"} and store.subjects("grouped", "org", DAY) == {"o"}
    assert store.subjects("m", "team", DAY) == set()
    identities = [identity for identity, _ in (*first.identities, *second.identities)]
    assert len(identities) == 7 and all(store.seen(identity) for identity in identities)
    assert not store.seen(("org", "o", "never"))
    assert store.markers() == [(marker_key, marker)]
    ending = sorted(k for k in state.rollups if k[3] is not LIFETIME)
    assert sorted(store.rollups_ending_before(datetime(2027, 1, 1, tzinfo=UTC))) == ending
    [first_entry] = [k for k, _ in changelog.identities_entries(1, first.identities)]
    [second_entry] = [k for k, _ in changelog.identities_entries(2, second.identities)]
    assert list(store.identity_entries_before(NOW + timedelta(seconds=1))) == [first_entry, second_entry]

    # Tombstones: a UNIQUE_COUNT rollup with its distinct values, a dimension row, an identity entry, the marker.
    store.write(
        [
            *((k, None) for k in changelog.evicted_entries(users_day, state.rollups[users_day])),
            (changelog.rollup_tombstone(row_day), None),
            (first_entry, None),
            (changelog.marker_entry(marker_key, None)[0], None),
        ],
        replay_from=4,
    )
    assert store.rollup(users_day) is None and store.distinct_values(users_day) == set()
    assert store.rollup(row_day) is None and store.dimension_rows(grouped_day) == 0
    assert sorted(stored_rollup_keys(store)) == sorted(set(state.rollups) - {users_day, row_day})
    assert sorted(store.rollups_ending_before(datetime(2027, 1, 1, tzinfo=UTC))) == sorted(
        set(ending) - {users_day, row_day}
    )
    assert [store.seen(identity) for identity in identities] == [False] * 6 + [True]  # the first entry's are gone
    assert expiry_keys_of(store, first_entry) == []
    assert list(store.identity_entries_before(NOW + timedelta(seconds=1))) == [second_entry]
    assert store.markers() == []
    # What was not tombstoned is as it was: the users' hour keeps its values, the grouped total row its total.
    assert store.distinct_values(key(HOURLY, at.replace(minute=0), metric="users")) == {"alice", "bob"}
    assert view(store.rollup(grouped_day)) == view(state.rollups[grouped_day])

    # Tombstones of every entry leave nothing but the store's own keys: no index or identity key outlives its entry.
    store.write([(entry_key, None) for entry_key, _ in entries], None)
    assert {found[:2] for found in store.db.keys()} == {b"m|"}


def test_an_identity_entry_tombstoned_in_the_batch_that_wrote_it_leaves_no_identity_keys(store):
    entries = changelog.identities_entries(5, [(("org", "o", "r1"), NOW), (("org", "o", "r2"), NOW)])
    kept = changelog.identities_entries(6, [(("org", "o", "r3"), NOW)])
    store.write([*entries, *kept, *((k, None) for k, _ in entries)], replay_from=7)
    assert [store.seen(("org", "o", r)) for r in ("r1", "r2", "r3")] == [False, False, True]
    assert sorted(found[:2] for found in store.db.keys() if not found.startswith(b"m|")) == [
        b"d|",
        IDENTITY_PREFIX,
        EXPIRY_PREFIX,
    ]


# --- Replays ----------------------------------------------------------------------------------------------------------


def _log() -> list[Entries]:
    """A partition's changelog, one list per transaction: rollups of every kind, identities and markers, and tombstones
    of each (evicted rollups with their distinct values, an expired identity entry, a re-armed marker), and a key
    written again after its tombstone."""
    october = datetime(2026, 10, 10, 9, tzinfo=UTC)
    state = PartitionRollups(timedelta(days=40))
    marker_key = ("threshold-1", "org", "o", NOVEMBER)
    rounds: list[list[CountedRecord]] = [
        [
            record("o1", october, "4", all_time=False),
            record("o2", october, metric="users", aggregation=UNIQUE, distinct="zed", all_time=False),
            record("g1", NOW, "2", metric="grouped", dimensions=A),
        ],
        [
            record("u1", NOW, metric="users", aggregation=UNIQUE, distinct="alice", dimensions=B),
            record("l1", NOW, "7", metric="last", aggregation=LATEST),
            record("g2", NOW, "5", metric="grouped", dimensions=B),
        ],
        [record("u2", NOW, metric="users", aggregation=UNIQUE, distinct="bob"), record("s1", NOW, "0.25")],
        [record("l2", NOW + timedelta(minutes=1), "1", metric="last", aggregation=LATEST)],
    ]
    log: list[Entries] = []
    identity_entries: list[bytes] = []
    for offset, records in enumerate(rounds):
        state.apply(records, offset, NOW + timedelta(minutes=offset))
        entries = checkpoint_entries(state.checkpoint(), offset)
        identity_entries += [k for k, _ in entries if k.startswith(changelog.IDENTITIES_PREFIX)]
        if offset == 1:
            entries.append(changelog.marker_entry(marker_key, Marker(Decimal(10), approaching=True)))
        if offset == 2:  # October's rollups evicted, the first identity entry expired, the marker re-armed
            evicted = state.evict_before(NOVEMBER)
            entries += [(k, None) for evicted_key, r in evicted for k in changelog.evicted_entries(evicted_key, r)]
            entries += [(identity_entries[0], None), (changelog.marker_entry(marker_key, None)[0], None)]
        log.append(entries)
    # An evicted rollup's key written again after its tombstones (the changelog allows it; the store must follow).
    again = key(DAILY, datetime(2026, 10, 10, tzinfo=UTC), metric="users")
    log.append([changelog.rollup_entry(RollupChange.of(again, ValuesRollup(UNIQUE, 1, Decimal(1), version=9)))])
    return log


def test_replaying_any_suffix_of_the_log_again_leaves_exactly_the_same_store(tmp_path):
    log = _log()
    flat = [entry for entries in log for entry in entries]
    assert {k[:2] for k, value in flat if value is None} == {b"r|", b"u|", b"d|", b"a|"}  # tombstones of each kind
    reference, _ = open_store(tmp_path / "reference")
    reference.write(flat, replay_from=len(flat))
    expected = contents(reference)
    reference.close()
    assert expected[b"m|replay_from"] == str(len(flat)).encode()

    store, _ = open_store(tmp_path / "p0")
    offset = 0
    for entries in log:  # as the worker stores its checkpoints: replay_from is each one's first changelog offset
        store.write(entries, replay_from=offset)
        offset += len(entries)
    assert store.replay_from == len(flat) - len(log[-1])
    for start in range(len(flat) - 1, -1, -1):  # then replays from ever earlier offsets, in chunks as a restore does
        for at in range(start, len(flat), 3):
            store.write(flat[at : at + 3], replay_from=min(at + 3, len(flat)))
        assert store.replay_from == len(flat)
        assert contents(store) == expected, f"replayed from offset {start}"
    store.close()


class _FailingWrite:
    """A store's db whose batch write fails (a crash as the batch reaches RocksDB); every other use is recorded."""

    def __init__(self, db: Any) -> None:
        self._db = db
        self.used: list[str] = []

    def get(self, found: bytes) -> bytes | None:
        return self._db.get(found)

    def write(self, batch: Any) -> None:
        raise OSError("the disk went away")

    def __getattr__(self, name: str) -> Any:
        self.used.append(name)
        return getattr(self._db, name)


def test_replay_from_is_written_in_one_batch_with_the_entries_or_not_at_all(tmp_path):
    store, _ = open_store(tmp_path / "p0")
    store.write(changelog.identities_entries(1, [(("org", "o", "r1"), NOW)]), replay_from=10)
    entry = changelog.rollup_entry(RollupChange.of(key(DAILY, DAY), Rollup(SUM, 1, Decimal(1), version=11)))
    db = store.db
    failing = store.db = _FailingWrite(db)  # type: ignore[assignment]
    with pytest.raises(StateStoreError, match=r"could not be written \(the disk went away\)"):
        store.write([entry, *changelog.identities_entries(11, [(("org", "o", "r2"), NOW)])], replay_from=12)
    assert failing.used == []  # nothing written beside the batch
    store.db = db
    assert store.replay_from == 10 and store.rollup(key(DAILY, DAY)) is None and not store.seen(("org", "o", "r2"))
    with pytest.raises(ValueError, match="own namespace"):  # an entry refused halfway through: nothing of it either
        store.write([entry, (b"m|replay_from", b"99")], replay_from=12)
    assert store.replay_from == 10 and store.rollup(key(DAILY, DAY)) is None
    store.write([entry], replay_from=None)  # a write without an offset keeps the last one
    assert store.replay_from == 10 and store.rollup(key(DAILY, DAY)) is not None
    store.write([], replay_from=12)
    store.close()
    reopened, why = open_store(tmp_path / "p0")
    try:
        assert (why, reopened.replay_from, reopened.seen(("org", "o", "r1"))) == (None, 12, True)
    finally:
        reopened.close()


def test_a_write_survives_a_sigkill_of_the_process_right_after_it(tmp_path):
    """A worker SIGKILLed after storing a checkpoint: a restart finds the checkpoint and its replay offset."""
    script = f"""
import os, signal
from datetime import UTC, datetime
from pathlib import Path
from metering_pipeline.worker import changelog
from metering_pipeline.worker.state_store import PartitionStore, StoreResources
store, _ = PartitionStore.open(Path({str(tmp_path / "p0")!r}), {OWNER!r}, StoreResources.of_size(8 << 20, 8 << 20))
at = datetime(2026, 11, 24, tzinfo=UTC)
store.write(changelog.identities_entries(7, [(("org", "o", f"r{{n}}"), at) for n in range(1000)]), replay_from=8)
os.kill(os.getpid(), signal.SIGKILL)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == -9, done.stderr
    store, why = open_store(tmp_path / "p0")
    try:
        assert (why, store.replay_from) == (None, 8)
        assert all(store.seen(("org", "o", f"r{n}")) for n in range(1000))
    finally:
        store.close()


# --- The expiry indexes -----------------------------------------------------------------------------------------------


def test_rollups_ending_before_a_horizon_are_exactly_those_whose_period_ended_before_it_soonest_first(store):
    keys = [
        key(MONTHLY, datetime(2026, 10, 1, tzinfo=UTC)),
        key(HOURLY, datetime(2026, 11, 24, 10, tzinfo=UTC), metric="b"),
        key(DAILY, datetime(2026, 11, 23, tzinfo=UTC), A),  # a dimension row
        key(HOURLY, datetime(2026, 11, 23, 23, tzinfo=UTC)),  # ends with the day before: at 24th 00:00
        key(DAILY, datetime(2026, 11, 23, tzinfo=UTC), subject="z"),
        key(HOURLY, datetime(2026, 11, 24, 9, tzinfo=UTC), subject="a"),
        key(MONTHLY, datetime(2026, 11, 1, tzinfo=UTC)),
        key(HOURLY, datetime(1999, 12, 31, 23, tzinfo=UTC)),
        ("m", "org", "o", LIFETIME, EPOCH, ()),  # all time: never ends
    ]
    store.write(
        [changelog.rollup_entry(RollupChange.of(k, Rollup(SUM, 1, Decimal(1), version=0))) for k in keys],
        replay_from=None,
    )

    def ends(found: list[RollupKey]) -> list[datetime]:
        return [period_end(k[3], k[4]) for k in found]

    horizons = sorted({period_end(k[3], k[4]) for k in keys if k[3] is not LIFETIME})
    horizons += [h + timedelta(seconds=1) for h in horizons] + [datetime(1990, 1, 1, tzinfo=UTC)]
    for horizon in horizons:
        found = list(store.rollups_ending_before(horizon))
        expected = [k for k in keys if k[3] is not LIFETIME and period_end(k[3], k[4]) < horizon]
        assert sorted(found) == sorted(expected), horizon  # exactly these, each once
        assert ends(found) == sorted(ends(found)), horizon  # soonest first


def test_identity_entries_before_a_horizon_are_exactly_those_whose_newest_identity_is_before_it_oldest_first(store):
    def at(minute: int) -> datetime:
        return NOW + timedelta(minutes=minute)

    # Each entry's time is its newest identity's: the one of offset 3 holds an old identity and a newer one.
    listed = {
        5: [at(10)],
        3: [at(-30), at(20)],
        9: [at(-10)],
        1: [at(20)],  # the same newest time as offset 3's
        7: [at(0), at(0)],
    }
    entries = {
        offset: changelog.identities_entries(offset, [(("org", "o", f"{offset}-{n}"), t) for n, t in enumerate(times)])
        for offset, times in listed.items()
    }
    store.write([entry for written in entries.values() for entry in written], replay_from=None)
    newest = {written[0][0]: max(listed[offset]) for offset, written in entries.items()}
    for horizon in sorted({*newest.values(), *(t + timedelta(seconds=1) for t in newest.values()), at(-60)}):
        found = list(store.identity_entries_before(horizon))
        assert sorted(found) == sorted(k for k, t in newest.items() if t < horizon), horizon
        assert [newest[k] for k in found] == sorted(newest[k] for k in found), horizon


# --- PartitionRollups over a store: RAM is a cache --------------------------------------------------------------------


def _traffic(count: int, keys: int) -> list[list[CountedRecord]]:
    """`count` records over `keys` (metric, subject) keys drawn at random (consecutive batches share keys: a rollup
    changed in a checkpoint not stored yet is changed again), in batches of 50, timestamps over three days: sums, a
    grouped metric, UNIQUE_COUNT and LATEST; every fifth batch also sends again two records of the first batches."""
    draw = random.Random(25)
    kinds: list[dict[str, Any]] = [
        {"metric": "sum"},
        {"metric": "grouped"},
        {"metric": "users", "aggregation": UNIQUE},
        {"metric": "last", "aggregation": LATEST},
    ]
    records = []
    for n in range(count):
        which = draw.randrange(keys)
        fields = dict(kinds[which % len(kinds)])
        if fields["metric"] == "grouped":
            fields["dimensions"] = (A, B)[n % 2]
        if fields["metric"] == "users":
            fields["distinct"] = f"user-{n % 7}"
        at = DAY - timedelta(days=2) + timedelta(minutes=draw.randrange(3 * 24 * 60))
        records.append(record(f"r{n}", at, f"{n % 9}.{n % 4}", subject=f"s{which // len(kinds)}", **fields))
    batches = [records[start : start + 50] for start in range(0, count, 50)]
    for n in range(4, len(batches), 5):
        batches[n] = [*batches[n], records[n], records[n + 50]]  # sent again: duplicates
    return batches


def test_a_partition_state_over_a_store_with_a_small_cache_counts_exactly_what_one_in_ram_counts(store):
    capacity = 10
    state = PartitionRollups(WINDOW, stored=store, capacity=capacity)
    plain = PartitionRollups(WINDOW)
    pending: tuple[Checkpoint, int] | None = None  # taken, not stored yet: the writer is one checkpoint behind
    for offset, batch in enumerate(_traffic(1_000, 200)):
        seen = NOW + timedelta(seconds=offset)
        assert state.apply(batch, offset, seen) == plain.apply(batch, offset, seen)
        plain.checkpoint()
        checkpoint = state.checkpoint()
        if pending is not None:
            stored, at = pending
            store.write(checkpoint_entries(stored, at), replay_from=at)
            state.stored_through(stored.generation)
            assert len(state.rollups) <= capacity + len(state._unstored)
        pending = checkpoint, offset
    assert pending is not None
    store.write(checkpoint_entries(pending[0], pending[1]), replay_from=pending[1])
    state.stored_through(pending[0].generation)
    assert len(state.rollups) <= capacity

    assert len(plain.rollups) > 500  # (so that the cache of 10 held a small part of them)
    assert sorted(stored_rollup_keys(store)) == sorted(plain.rollups)
    assert {k: view(state.get(k)) for k in plain.rollups} == {k: view(r) for k, r in plain.rollups.items()}
    assert {k: r.total() for k in plain.rollups if (r := state.get(k)) is not None} == {
        k: r.total() for k, r in plain.rollups.items()
    }

    # A duplicate of a record whose identity only the store remembers now is refused.
    first = _traffic(1_000, 200)[0][0]
    identity = (first.subject_type, first.subject_id, first.record_id)
    assert identity not in state.dedup._seen and identity in state.dedup
    lifetime = (first.metric_key, "org", first.subject_id, LIFETIME, EPOCH, first.dimensions)
    before = view(state.get(lifetime))
    assert state.apply([first], 1_000, NOW + timedelta(minutes=30)) == (0, 1)
    assert view(state.get(lifetime)) == before


# --- Opening: reused, or wiped with a reason -------------------------------------------------------------------------


def _good(path: Path) -> None:
    store, _ = open_store(path)
    store.write(changelog.identities_entries(1, [(("org", "o", "r1"), NOW)]), replay_from=2)
    store.close()


def _of_another_format(path: Path) -> None:
    _good(path)
    store, _ = open_store(path)
    store.db.put(b"m|format", b"0")
    store.close()


def _of_another_owner(path: Path) -> None:
    _good(path)
    store, _ = open_store(path)
    store.db.put(b"m|owner", b"metering.rollup-changelog/3")
    store.close()


def _stale(path: Path) -> None:
    _good(path)
    store, _ = open_store(path)
    store.db.put(WRITTEN_AT, repr(time.time() - STALE_AFTER - 60).encode())
    store.close()


def _corrupt(path: Path) -> None:
    """A directory of garbage files named as RocksDB names its files."""
    path.mkdir(parents=True)
    (path / "CURRENT").write_bytes(b"MANIFEST-000905\n")
    for name in ("MANIFEST-000905", "000907.sst", "000904.log", "OPTIONS-000908", "IDENTITY"):
        (path / name).write_bytes(bytes(range(256)) * 17)


def _garbage_only(path: Path) -> None:
    """A directory of files that are not a store at all."""
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("not a store")


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (_of_another_format, f"it has format 0, this worker writes {FORMAT.decode()}"),
        (_of_another_owner, f"it holds metering.rollup-changelog/3, not {OWNER}"),
        (_stale, "it was last written 20.0 h ago"),
        (_corrupt, "unreadable (Corruption"),
        (_garbage_only, "it has no format marker"),
    ],
    ids=["another format", "another owner", "stale", "corrupt", "garbage"],
)
def test_open_wipes_an_unusable_store_and_says_why(tmp_path: Path, make: Callable[[Path], None], reason: str):
    path = tmp_path / "p0"
    make(path)
    store, why = open_store(path)
    try:
        assert why is not None and why.startswith(reason), why
        assert contents(store) == {b"m|format": FORMAT, b"m|owner": OWNER.encode()}  # empty, and ours now
        assert store.replay_from is None and not store.seen(("org", "o", "r1"))
        assert not {"notes.txt", "000907.sst", "000904.log", "MANIFEST-000905"} & {file.name for file in path.iterdir()}
    finally:
        store.close()
    reopened, why = open_store(path)  # and usable from then on
    reopened.close()
    assert why is None


def test_open_reuses_a_good_store_and_says_nothing(tmp_path: Path):
    path = tmp_path / "p0"
    _good(path)
    store, why = open_store(path)
    store.db.put(WRITTEN_AT, repr(time.time() - STALE_AFTER + 60).encode())  # not quite stale
    store.close()
    store, why = open_store(path)
    try:
        assert why is None
        assert (store.replay_from, store.seen(("org", "o", "r1"))) == (2, True)
    finally:
        store.close()
    new, why = open_store(tmp_path / "absent" / "p1")  # none yet: a new one, nothing to say
    new.close()
    assert why is None


def test_open_of_a_store_open_elsewhere_in_the_process_refuses_and_leaves_it_intact(store, tmp_path):
    store.write(changelog.identities_entries(1, [(("org", "o", "r1"), NOW)]), replay_from=2)
    with pytest.raises(RuntimeError, match="in use"):
        open_store(tmp_path / "p0")
    assert (store.replay_from, store.seen(("org", "o", "r1"))) == (2, True)
    assert (tmp_path / "p0" / "CURRENT").exists()


def test_open_of_a_store_another_process_holds_refuses_and_leaves_it_intact(tmp_path):
    """Two workers given one METERING_STATE_DIR: the second must not wipe the first one's store under it."""
    _good(tmp_path / "p0")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from rocksdict import Rdict; db = Rdict(sys.argv[1]); print('open', flush=True); "
            "sys.stdin.read()",
            str(tmp_path / "p0"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "open\n"
        with pytest.raises(RuntimeError, match="in use"):
            open_store(tmp_path / "p0")
    finally:
        holder.communicate("", timeout=30)
    store, why = open_store(tmp_path / "p0")
    try:
        assert (why, store.replay_from, store.seen(("org", "o", "r1"))) == (None, 2, True)
    finally:
        store.close()


# --- RAM --------------------------------------------------------------------------------------------------------------


def _bytes_per_cached_rollup(state: PartitionRollups) -> float:
    """RAM that dropping the state's cached rollups gives back, per rollup."""
    gc.collect()
    held = tracemalloc.get_traced_memory()[0]
    count = len(state.rollups)
    state.rollups.clear()
    gc.collect()
    return (held - tracemalloc.get_traced_memory()[0]) / count


def test_a_cached_rollup_takes_at_most_cached_rollup_bytes_of_ram(store, capsys):
    """20k keys of a record each in 3 periods (60k rollups), cached three ways: as counted (a rollup of one record holds
    its record's quantity as sum, min and max: one Decimal), as read back from the store (three Decimals decoded from
    text), and as read back and counted again (a new sum, the new quantity the max)."""
    keys = 20_000
    at = DAY.replace(hour=9, minute=30)
    hour = int(at.timestamp()) // 3600
    measured: dict[str, float] = {}
    tracemalloc.start()
    try:
        for round_, how in enumerate(("as counted", "read back", "read back and counted")):
            state = PartitionRollups(WINDOW, stored=store, capacity=10**6)
            seen = NOW + timedelta(minutes=round_)
            if how == "read back":  # keys as `apply` makes them: one string object per subject, shared by its rollups
                for n in range(keys):
                    subject = sys.intern(f"customer-{n:06d}")
                    for period, start in starts_of_hour(hour):
                        state.get(("m", "org", subject, period, start, ()))
            else:
                batch = [
                    record(f"r{round_}-{n}", at, f"{n % 1000}.{round_}", subject=f"customer-{n:06d}", all_time=False)
                    for n in range(keys)
                ]
                state.apply(batch, round_, seen)
                del batch
                checkpoint = state.checkpoint()
                store.write(checkpoint_entries(checkpoint, round_), replay_from=round_)
                state.stored_through(checkpoint.generation)
                del checkpoint
            assert len(state.rollups) == 3 * keys and len(state.dedup) == 0
            measured[how] = _bytes_per_cached_rollup(state)
    finally:
        tracemalloc.stop()
    with capsys.disabled():
        print("\nRAM per cached rollup: " + ", ".join(f"{bytes_:.0f} B {how}" for how, bytes_ in measured.items()))
    assert max(measured.values()) <= CACHED_ROLLUP_BYTES, measured


def test_a_35_day_dedup_window_refuses_ids_seen_within_it_from_the_store_and_forgets_the_older_ones(store):
    """METERING_DEDUP_WINDOW of 35 days (issue 25, target 5): ids seen across 40 days, a checkpoint a day stored as the
    worker stores it. RAM holds none of them once stored; the store refuses the ids of the last 35 days, and expiry
    (identity entries older than the window, tombstoned) forgets the rest, which count again."""
    window = timedelta(days=35)
    start = datetime(2026, 10, 1, tzinfo=UTC)
    state = PartitionRollups(window, stored=store, capacity=100)
    state.warm([])
    for day in range(40):
        seen = start + timedelta(days=day)
        state.apply([record(f"r{day}", seen)], day, seen)
        checkpoint = state.checkpoint()
        store.write(checkpoint_entries(checkpoint, day), day + 1)
        state.stored_through(checkpoint.generation)
    assert len(state.dedup) == 0  # every id is in the store only

    now = start + timedelta(days=39, hours=1)
    expired = list(store.identity_entries_before(now - window))  # seen before day 4, 01:00: days 0 to 4
    store.write([(entry, None) for entry in expired], 41)

    counted, duplicates = state.apply([record(f"r{day}", now) for day in range(40)], 41, now)
    assert (counted, duplicates) == (5, 35)


def test_identities_leave_ram_once_the_checkpoint_that_carries_them_is_stored_even_with_no_records_after_it(store):
    """A partition that goes quiet kept its last second of identities in RAM until its next records came (buckets of
    time: 14k identities per partition in `metering bench --phase memory`). Identities admitted after a checkpoint was
    taken go out with the next one, and stay in RAM (refused from there) until that one is stored."""
    state = PartitionRollups(WINDOW, stored=store, capacity=100)
    state.warm([])
    state.apply([record(f"a{n}", NOW) for n in range(50)], 0, NOW)
    first = state.checkpoint()
    state.apply([record(f"b{n}", NOW) for n in range(20)], 1, NOW)  # the same second, after the checkpoint
    store.write(checkpoint_entries(first, 0), replay_from=1)
    state.stored_through(first.generation)
    assert len(state.dedup) == 20  # the later ones are not in the store yet: RAM still refuses them
    assert state.apply([record("b3", NOW), record("a7", NOW)], 2, NOW) == (0, 2)

    second = state.checkpoint()
    store.write(checkpoint_entries(second, 1), replay_from=3)
    state.stored_through(second.generation)
    assert len(state.dedup) == 0
    assert state.apply([record("b3", NOW), record("a7", NOW)], 3, NOW) == (0, 2)  # the store refuses them now


def test_a_store_is_stale_before_the_changelog_topic_the_worker_creates_can_have_dropped_a_tombstone():
    """A store older than STALE_AFTER is rebuilt: that rule holds only while compaction keeps tombstones longer."""
    settings = Settings()
    changelog_spec = next(s for s in internal_topics(settings) if s.name == Topics.of(settings).rollup_changelog)
    assert changelog_spec.config["cleanup.policy"] == "compact"
    assert STALE_AFTER * 1000 < int(changelog_spec.config["delete.retention.ms"])


def test_a_record_that_reads_its_payload_asks_the_store_about_its_identity_once(store, monkeypatch):
    """Its identity is looked up before the cardinality bounds are checked; admitting it does not read the store
    again (one RocksDB read per new record of a grouped, UNIQUE_COUNT or LATEST metric, not two)."""
    asked: list[tuple[str, str, str]] = []
    seen = store.seen
    monkeypatch.setattr(store, "seen", lambda identity: asked.append(identity) or seen(identity))
    state = PartitionRollups(WINDOW, stored=store, capacity=100)
    grouped = record("g1", NOW, "2", dimensions=(("model", "a"),))
    unique = record("u1", NOW, aggregation=AggregationType.UNIQUE_COUNT, distinct="user-1")
    assert state.apply([grouped, unique], 0, NOW) == (2, 0)
    assert asked == [("org", "o", "g1"), ("org", "o", "u1")]
    assert state.apply([grouped], 1, NOW) == (0, 1)  # a duplicate still: RAM holds it
