"""A partition's state on local disk: a RocksDB store that follows the rollup changelog.

The store holds what the partition's changelog holds, materialized for lookups: rollups under
their changelog keys with the end of their period in front (so rollups past the allowed
lateness, and those of current periods, are one range each), distinct values and threshold
markers under their changelog keys, and de-duplication identities one key each (a changelog
entry carries thousands) with an index of identity entries by their newest time (so expiry
is a range too).

It never leads the changelog: a checkpoint reaches the store in one atomic write batch
after its Kafka transaction committed (and its rollups reached ClickHouse), together with
`replay_from`, a changelog offset before which every committed entry is in the store. A
restart replays the changelog from there; entries are last-writer-wins per key, so
replaying some twice changes nothing. Anything unusable (another format, another
partition, too old to trust, unreadable) is wiped and rebuilt from the changelog.
"""

from __future__ import annotations

import shutil
import struct
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path

import orjson
from rocksdict import BlockBasedOptions, Cache, Options, Rdict, WriteBatch, WriteBufferManager

from metering_pipeline.usage.dedup import RecordIdentity
from metering_pipeline.usage.periods import period_end
from metering_pipeline.usage.rollups import KEY_NAME, LIFETIME, Rollup, RollupKey, key_period, values_rollup
from metering_pipeline.usage.thresholds import Marker, MarkerKey
from metering_pipeline.worker import changelog

FORMAT = b"1"  # of the keys and values below; a store of another format is rebuilt
_META = b"m|"
_FORMAT_KEY, _OWNER_KEY, _REPLAY_KEY, _WRITTEN_KEY = b"m|format", b"m|owner", b"m|replay_from", b"m|written_at"
_SUNK_KEY = b"m|sunk_before"
IDENTITY_PREFIX = b"i|"  # one key per remembered record identity
EXPIRY_PREFIX = b"t|"  # identity entries by their newest time (8 bytes, big-endian seconds): oldest first
ROLLUP_PREFIX = b"R|"  # + the end of the rollup's period (8 bytes, big-endian seconds) + its changelog key's body
_ABSENT = b""
_SECONDS = struct.Struct(">q")
_NEVER_ENDS = 2**62  # an all-time rollup's end
_HEAD = len(ROLLUP_PREFIX) + _SECONDS.size  # a stored rollup key's bytes before its changelog key's body
_BODY = len(changelog.ROLLUP_PREFIX)  # a changelog rollup key's bytes before its body
# Compaction drops a changelog tombstone once delete.retention.ms (topics.CHANGELOG_TOMBSTONES_MS, 24 h) has passed: a
# store not written for longer might have missed one, and would bring back what it deleted.
STALE_AFTER = 20 * 3600.0


def identity_key(identity: RecordIdentity) -> bytes:
    return IDENTITY_PREFIX + orjson.dumps(identity)


def rollup_key(key: RollupKey) -> bytes:
    """A rollup's key in the store."""
    return _head(KEY_NAME[key[3]], key[4]) + changelog.rollup_tombstone(key)[_BODY:]


def _stored_rollup_key(changelog_key: bytes) -> bytes:
    """The store's key of a rollup from its changelog key: only the period and its start are read from it."""
    fields = orjson.loads(changelog_key[_BODY:])
    return _head_at(fields[3], fields[4]) + changelog_key[_BODY:]


@lru_cache(maxsize=8192)  # a few periods at a time: hours, days and months
def _head_at(period: str, start: int) -> bytes:
    return _head(period, datetime.fromtimestamp(start, tz=UTC))


@lru_cache(maxsize=8192)
def _head(period: str, start: datetime) -> bytes:
    """What a stored rollup's key starts with: the prefix and the end of its period."""
    end = _NEVER_ENDS if period == LIFETIME.value else int(period_end(key_period(period), start).timestamp())
    return ROLLUP_PREFIX + _SECONDS.pack(end)


class StateStoreError(RuntimeError):
    """A partition's state store cannot be opened or written (a full or read-only disk): the worker stops rather than
    fall behind its changelog, and a restart with room replays it."""


@dataclass(frozen=True)
class StoreResources:
    """What all of a worker's stores share, so that their memory is one budget: the block cache and the write
    buffers (memtables)."""

    cache: Cache
    write_buffers: WriteBufferManager

    @classmethod
    def of_size(cls, cache_bytes: int, write_buffer_bytes: int) -> StoreResources:
        cache = Cache(cache_bytes)
        return cls(cache, WriteBufferManager(write_buffer_bytes, False))

    def options(self) -> Options:
        options = Options(raw_mode=True)
        options.create_if_missing(True)
        table = BlockBasedOptions()
        table.set_block_cache(self.cache)
        table.set_bloom_filter(10, False)  # most identity lookups are of new records: answered without a read
        table.set_cache_index_and_filter_blocks(True)  # their memory counts in the cache, not beside it
        options.set_block_based_table_factory(table)
        options.set_write_buffer_manager(self.write_buffers)
        options.set_write_buffer_size(8 << 20)
        options.set_max_write_buffer_number(2)
        options.set_max_open_files(256)
        return options


class PartitionStore:
    """One partition's store; see the module's docstring. Reads answer as of the last write."""

    def __init__(self, db: Rdict, path: Path) -> None:
        self.db = db
        self.path = path

    @classmethod
    def open(cls, path: Path, owner: str, resources: StoreResources) -> tuple[PartitionStore, str | None]:
        """The store at `path`, and why it had to start empty (None: reused, or new)."""
        why = None
        if path.exists():
            try:
                store = cls(Rdict(str(path), options=resources.options()), path)
            except Exception as error:  # RocksDB reports corruption (and a held lock) as a plain exception
                if f"{path / 'LOCK'}: " in str(error):  # open here or in another process: not ours to wipe
                    raise RuntimeError(
                        f"the state store {path} is in use (by another worker on the same METERING_STATE_DIR, or "
                        f"not closed yet): {error}"
                    ) from error
                if "No space left on device" in str(error):  # a good store on a full disk: room, not a rebuild
                    raise StateStoreError(f"the state store {path} could not be opened: {error}") from error
                why = f"unreadable ({error})"
            else:
                why = store._unusable(owner)
                if why is None:
                    return store, None
                store.close()
            shutil.rmtree(path, ignore_errors=True)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            store = cls(Rdict(str(path), options=resources.options()), path)
            store.db.put(_FORMAT_KEY, FORMAT)
            store.db.put(_OWNER_KEY, owner.encode())
        except Exception as error:
            raise StateStoreError(f"the state store {path} could not be created: {error}") from error
        return store, why

    def _unusable(self, owner: str) -> str | None:
        found = self.db.get(_FORMAT_KEY)
        if found is None:
            return "it has no format marker (a store interrupted while created, or not ours)"
        if found != FORMAT:
            return f"it has format {found.decode(errors='replace')}, this worker writes {FORMAT.decode()}"
        held = bytes(self.db.get(_OWNER_KEY) or b"").decode(errors="replace")
        if held != owner:
            return f"it holds {held}, not {owner}"
        written = self.written_at
        if written is not None and time.time() - written > STALE_AFTER:
            hours = (time.time() - written) / 3600
            return f"it was last written {hours:.1f} h ago (compaction may have dropped tombstones since)"
        return None

    def wipe(self, owner: str, resources: StoreResources) -> PartitionStore:
        """An empty store in place of this one (its offsets do not fit the changelog)."""
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)
        store, _ = PartitionStore.open(self.path, owner, resources)
        return store

    def close(self) -> None:
        self.db.close()

    @property
    def replay_from(self) -> int | None:
        """The changelog offset to replay from (None: from the start)."""
        value = self.db.get(_REPLAY_KEY)
        return None if value is None else int(value)

    @property
    def sunk_before(self) -> int | None:
        """The changelog offset before which every rollup entry was in ClickHouse when the store was last written
        (None: not known)."""
        value = self.db.get(_SUNK_KEY)
        return None if value is None else int(value)

    @property
    def written_at(self) -> float | None:
        value = self.db.get(_WRITTEN_KEY)
        return None if value is None else float(value)

    def write(
        self, entries: Iterable[tuple[bytes, bytes | None]], replay_from: int | None, sunk_before: int | None = None
    ) -> None:
        """Apply changelog entries, in log order, in one atomic batch with the offset to replay from next time (and
        the one before which ClickHouse has every rollup)."""
        batch = WriteBatch(raw_mode=True)
        identities: dict[bytes, bytes] = {}  # identity entries written in this batch (a tombstone may follow)
        put, rollup, body, loads, head = batch.put, changelog.ROLLUP_PREFIX, _BODY, orjson.loads, _head_at
        for key, value in entries:
            if value is not None and key.startswith(rollup):  # most entries: `_materialize`'s first case, inlined
                fields = loads(key[body:])
                put(head(fields[3], fields[4]) + key[body:], value)
            else:
                _materialize(self.db, batch, identities, key, value)
        if replay_from is not None:
            batch.put(_REPLAY_KEY, str(replay_from).encode())
        if sunk_before is not None:
            batch.put(_SUNK_KEY, str(sunk_before).encode())
        batch.put(_WRITTEN_KEY, repr(time.time()).encode())
        try:
            self.db.write(batch)
        except Exception as error:
            raise StateStoreError(
                f"the state store at {self.path} could not be written ({error}); its changelog holds everything "
                "committed: once METERING_STATE_DIR has room, a restart replays it"
            ) from error

    # Lookups

    def rollup(self, key: RollupKey) -> Rollup | None:
        value = self.db.get(rollup_key(key))
        if value is None:
            return None
        rollup = changelog.decode_rollup(orjson.loads(value))
        values = self.distinct_values(key)
        if values:
            rollup = values_rollup(rollup)
            rollup.values = values
        return rollup

    def seen(self, identity: RecordIdentity) -> bool:
        return self.db.get(IDENTITY_PREFIX + orjson.dumps(identity)) is not None  # identity_key, inlined: per record

    def distinct_values(self, key: RollupKey) -> set[str]:
        prefix = changelog.distinct_prefix(key)
        return {orjson.loads(found[len(changelog.DISTINCT_PREFIX) :])[-1] for found in self._keys(prefix)}

    def dimension_rows(self, total_key: RollupKey) -> int:
        """Dimension rows stored for a total row's (metric, subject, period)."""
        return sum(1 for _ in self._keys(rollup_key(total_key)[:-1] + b","))

    def subjects(self, metric_key: str, subject_type: str, ending_after: datetime) -> set[str]:
        """Subject ids with a rollup of the metric whose period ends after `ending_after` (current periods)."""
        body = orjson.dumps([metric_key, subject_type])[:-1] + b","
        return {
            orjson.loads(found[_HEAD:])[2]
            for found in self._keys(ROLLUP_PREFIX, ROLLUP_PREFIX + _SECONDS.pack(int(ending_after.timestamp())))
            if found.startswith(body, _HEAD)
        }

    def rollups_ending_before(self, horizon: datetime) -> Iterator[RollupKey]:
        """Rollups whose period ended before `horizon`, soonest first."""
        bound = ROLLUP_PREFIX + _SECONDS.pack(int(horizon.timestamp()))
        for found in self._keys(ROLLUP_PREFIX):
            if found >= bound:
                return
            yield changelog.decode_rollup_key(found[_HEAD:])

    def identity_entries_before(self, horizon: datetime) -> Iterator[bytes]:
        """Changelog keys of identity entries whose newest identity was seen before `horizon`."""
        bound = EXPIRY_PREFIX + _SECONDS.pack(int(horizon.timestamp()))
        for found in self._keys(EXPIRY_PREFIX):
            if found >= bound:
                return
            yield found[len(EXPIRY_PREFIX) + 8 :]

    def rollups(self, limit: int) -> list[tuple[RollupKey, Rollup]] | None:
        """Every stored rollup with its distinct values, or None if there are more than `limit`."""
        found: dict[bytes, tuple[RollupKey, Rollup]] = {}
        for key, value in self._items(ROLLUP_PREFIX):
            if len(found) >= limit:
                return None
            body = key[_HEAD:]
            found[body[:-1]] = (changelog.decode_rollup_key(body), changelog.decode_rollup(orjson.loads(value)))
        for key, _ in self._items(changelog.DISTINCT_PREFIX):
            *fields, dimensions, value = orjson.loads(key[len(changelog.DISTINCT_PREFIX) :])
            body = orjson.dumps([*fields, dimensions] if dimensions else fields)[:-1]
            held = found.get(body)
            if held is not None:
                rollup = values_rollup(held[1])
                rollup.values.add(value)
                found[body] = (held[0], rollup)
        return list(found.values())

    def markers(self) -> list[tuple[MarkerKey, Marker]]:
        return [
            changelog.decode_marker(key, value)
            for key, value in self._items(changelog.MARKER_PREFIX)
            if value is not None
        ]

    def _keys(self, prefix: bytes, start: bytes | None = None) -> Iterator[bytes]:
        for key, _ in self._items(prefix, start):
            yield key

    def _items(self, prefix: bytes, start: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        """Entries whose key starts with `prefix`, from `start` (or the first) on."""
        iterator = self.db.iter()
        iterator.seek(start or prefix)
        while iterator.valid():
            key = iterator.key()
            if not key.startswith(prefix):
                return
            yield key, iterator.value()
            iterator.next()


def _materialize(db: Rdict, batch: WriteBatch, identities: dict[bytes, bytes], key: bytes, value: bytes | None) -> None:
    """One changelog entry into the batch: the entry itself, and what the lookups and indexes need of it."""
    if key.startswith(changelog.ROLLUP_PREFIX):
        if value is None:
            batch.delete(_stored_rollup_key(key))
        else:
            batch.put(_stored_rollup_key(key), value)
    elif key.startswith(changelog.IDENTITIES_PREFIX):
        if value is None:
            held = identities.pop(key, None) or db.get(key)
            if held is not None:
                listed, newest = _identities_of(held)
                for identity in listed:
                    batch.delete(identity)
                batch.delete(EXPIRY_PREFIX + _SECONDS.pack(newest) + key)
            batch.delete(key)
        else:
            listed, newest = _identities_of(value)
            put = batch.put
            for identity in listed:
                put(identity, _ABSENT)
            batch.put(EXPIRY_PREFIX + _SECONDS.pack(newest) + key, _ABSENT)
            batch.put(key, value)
            identities[key] = value
    elif key.startswith((_META, ROLLUP_PREFIX, EXPIRY_PREFIX, IDENTITY_PREFIX)):
        raise ValueError(f"a changelog key in the store's own namespace: {key!r}")
    elif value is None:  # distinct values and threshold markers: stored as they are
        batch.delete(key)
    else:
        batch.put(key, value)


def _identities_of(value: bytes) -> tuple[list[bytes], int]:
    """An identity entry's identity keys and the newest time (epoch seconds) among them."""
    listed = orjson.loads(value)
    return [IDENTITY_PREFIX + orjson.dumps(item[:3]) for item in listed], max((item[3] for item in listed), default=0)
