"""The subject-routed stream between the router and the rollup stage.

Every record of a subject goes to one partition of the internal routed topic, whatever key
(or none) its producer used; that is what lets each partition own its subjects' rollups and
de-duplication. Records travel many to a message, so the rollup stage pays Kafka's
per-message cost once per batch rather than once per record.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import msgspec
from aiokafka.structs import ConsumerRecord

from metering_pipeline.usage.routed_record import AcceptedRecord, CountedRecord, RoutedRecord


def subject_partition(subject_type: str, subject_id: str, partitions: int) -> int:
    return zlib.crc32(f"{subject_type}:{subject_id}".encode()) % partitions


class SubjectPartitions:
    """`subject_partition` remembered per subject for one partition count: the router asks once per record."""

    # Subjects remembered; then it starts over. ~150 B each: more would pay only where it thrashes anyway.
    LIMIT = 65_536

    def __init__(self, partitions: int) -> None:
        self.partitions = partitions
        self._chosen: dict[tuple[str, str], int] = {}

    def of(self, subject_type: str, subject_id: str) -> int:
        subject = (subject_type, subject_id)
        chosen = self._chosen.get(subject)
        if chosen is None:
            if len(self._chosen) >= self.LIMIT:
                self._chosen.clear()
            chosen = self._chosen[subject] = subject_partition(subject_type, subject_id, self.partitions)
        return chosen


ROUTED_BATCH = 2_000  # records per routed message
ROUTED_BATCH_BYTES = 512 * 1024  # and about this many bytes, far under Kafka's default 1 MiB message size
_RECORD_OVERHEAD = 200  # bytes of a routed record besides its metadata, generously


def batches(records: Sequence[AcceptedRecord]) -> Iterator[Sequence[AcceptedRecord]]:
    """Consecutive runs of at most ROUTED_BATCH records and about ROUTED_BATCH_BYTES (metadata can be 256 KiB)."""
    start = size = 0
    for end, record in enumerate(records):
        own = len(record.metadata_json) + _RECORD_OVERHEAD
        if record.dimensions or record.distinct is not None:
            own += _read_size(record)
        grown = size + own
        if end > start and (end - start >= ROUTED_BATCH or grown > ROUTED_BATCH_BYTES):
            yield records[start:end]
            start, grown = end, own
        size = grown
    if start < len(records):
        yield records[start:]


def _read_size(record: AcceptedRecord) -> int:
    """What a record's metric read from its payload adds to a routed message besides its metadata: dimension values
    and a distinct value are copies of metadata, as long as it again at worst."""
    size = sum(len(name) + len(value) + 4 for name, value in record.dimensions)
    return size + (0 if record.distinct is None else len(record.distinct))


# A routed message is this version byte and a MessagePack array of record arrays (the one layout of
# `usage.routed_record`). Version 1 was a JSON array of the same arrays (first byte `[`): a worker still reads those
# left on the topic by an older one.
ROUTED_V2 = b"\x02"
_encoder = msgspec.msgpack.Encoder()
_decode_v2 = msgspec.msgpack.Decoder(list[CountedRecord]).decode
_decode_v1 = msgspec.json.Decoder(list[CountedRecord]).decode


def encode(records: Sequence[RoutedRecord[Any]]) -> bytes:
    """Accepted records travel as they are, the quantity as its exact text; the rollup stage reads them as
    CountedRecords (one layout: `usage.routed_record`). A CountedRecord's Decimal is written as its exact text too."""
    return ROUTED_V2 + _encoder.encode(records)


# Kafka time (epoch ms) of the oldest usage.recorded message routed in the same router poll as a routed
# message's records: what the rollup stage measures record age and alert latency from. A header, so the
# routed message's own time (and with it time-based retention) stays the router's.
PUBLISHED_HEADER = "metering-published-ms"


def published_headers(oldest_ms: int) -> list[tuple[str, bytes]]:
    return [(PUBLISHED_HEADER, str(oldest_ms).encode())]


def published_at(message: ConsumerRecord) -> float:
    """Epoch seconds of the oldest usage message routed with `message` (a routed ConsumerRecord); its own
    Kafka time when it was routed before the header existed."""
    for key, value in message.headers:
        if key == PUBLISHED_HEADER:
            return int(value) / 1000
    timestamp_ms: int = message.timestamp  # aiokafka has no types
    return timestamp_ms / 1000


def decode(value: bytes) -> list[CountedRecord]:
    if value[:1] == ROUTED_V2:
        return _decode_v2(memoryview(value)[1:])
    if value[:1] == b"[":
        return _decode_v1(value)
    raise ValueError(f"routed message of an unknown encoding (first byte {value[:1]!r})")
