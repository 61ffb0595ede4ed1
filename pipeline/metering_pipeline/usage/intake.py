"""From a Kafka message's bytes to usage records ready to count, or dead letters saying why not.

Numbers are parsed as Decimal straight from the JSON text (jiter's decimal mode), so a
quantity like 0.12345678901234567 is never squeezed through a binary float. A batch message
is checked record by record: one bad record goes to the DLQ, the others count.

Most records take a typed fast path (record_decoder); the pydantic model reads every record that path cannot vouch
for, and explains every refusal, so what is accepted or dead-lettered does not depend on which path read it.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import jiter
import msgspec
import orjson
from pydantic import ValidationError

from metering_pipeline.usage.meter import TOTAL, UnreadableRecord
from metering_pipeline.usage.metrics import MetricCatalog, record_org
from metering_pipeline.usage.periods import EPOCH
from metering_pipeline.usage.record_decoder import DecodedRecord, decode_message, parse_record
from metering_pipeline.usage.routed_record import AcceptedRecord
from metering_schemas import (
    DeadLetter,
    FieldError,
    MetricDefinition,
    RejectReason,
    ResetPeriod,
    SourcePosition,
    UsageRecord,
)


@dataclass(frozen=True, slots=True)
class IntakeRules:
    allowed_lateness: timedelta = timedelta(days=35)
    future_skew: timedelta = timedelta(minutes=5)
    max_message_bytes: int = 8 * 1024 * 1024
    # A counted record travels on in a routed batch and is stored in ClickHouse: its metadata must stay well under
    # Kafka's default 1 MiB message size (the routed batches are cut at ROUTED_BATCH_BYTES).
    max_metadata_bytes: int = 256 * 1024
    _windows: dict[datetime, tuple[datetime, datetime]] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    def window(self, received_at: datetime) -> tuple[datetime, datetime]:
        """The earliest and latest timestamp a record received at `received_at` may have. Remembered per receive
        time: a poll's messages share few distinct milliseconds, and the arithmetic costs more than the lookup."""
        window = self._windows.get(received_at)
        if window is None:
            if len(self._windows) >= 4096:
                self._windows.clear()
            window = self._windows[received_at] = (received_at - self.allowed_lateness, received_at + self.future_skew)
        return window


EVIDENCE_BYTES = 64 * 1024  # of a large rejected message kept in its dead letter
_MILLISECOND = timedelta(milliseconds=1)  # integer arithmetic: a float's `timestamp() * 1000` can lose one
_NEVER = ResetPeriod.NEVER


class Message(msgspec.Struct, gc=False):
    """What intake needs of a consumed Kafka message (a struct: the router makes one per message, and a NamedTuple's
    constructor runs in Python)."""

    topic: str
    partition: int
    offset: int
    timestamp: datetime
    key: bytes | None
    value: bytes | None

    def source(self) -> SourcePosition:
        key = None
        if self.key is not None:
            try:
                key = self.key.decode()
            except UnicodeDecodeError:
                key = None
        return SourcePosition(
            topic=self.topic, partition=self.partition, offset=self.offset, timestamp=self.timestamp, key=key
        )


class Filtered:
    """A valid record its metric's filter leaves out: neither counted nor dead-lettered, only counted as filtered."""


FILTERED = Filtered()
_new_tuple = tuple.__new__


class Intake(NamedTuple):
    """A message's records: accepted (in record order), dead-lettered, and how many the metrics' filters left out."""

    accepted: list[AcceptedRecord]
    rejected: list[DeadLetter]
    filtered: int = 0


def read_message(message: Message, catalog: MetricCatalog, rules: IntakeRules) -> Intake:
    """What `read_message_by_model` returns, faster.

    Records the decoder decides and the rules accept (or filter out) are settled here; any other batch record, and
    any other message as a whole, is read by the model, which words the dead letter.
    """
    value = message.value or b""
    decoded = decode_message(value) if len(value) <= rules.max_message_bytes else None
    if decoded is None:
        return read_message_by_model(message, catalog, rules)
    if isinstance(decoded, DecodedRecord):
        outcome: AcceptedRecord | Refusal | DeadLetter | Filtered | None = _settle(
            message, None, decoded, catalog, rules
        )
        if isinstance(outcome, AcceptedRecord):  # most messages: built in C, not by the NamedTuple's __new__
            return _new_tuple(Intake, ([outcome], [], 0))
        return Intake([], [], 1) if outcome is FILTERED else read_message_by_model(message, catalog, rules)
    accepted: list[AcceptedRecord] = []
    rejected: list[DeadLetter] = []
    filtered = 0
    for index, record in enumerate(decoded.records):
        outcome = None if record is None else _settle(message, index, record, catalog, rules)
        if outcome is None or isinstance(outcome, Refusal):  # the model words why
            try:
                raw = parse_record(decoded.texts[index])
            except ValueError:  # not JSON after all: the model's path dead-letters the whole message
                return read_message_by_model(message, catalog, rules)
            outcome = _read_record(message, index, raw, catalog, rules)
        if outcome is FILTERED:
            filtered += 1
        else:
            # The list matches the outcome; mypy narrows through neither the conditional nor `is FILTERED`, and an
            # isinstance that told it would cost every record.
            (accepted if isinstance(outcome, AcceptedRecord) else rejected).append(outcome)  # type: ignore[arg-type]
    return Intake(accepted, rejected, filtered)


def read_message_by_model(message: Message, catalog: MetricCatalog, rules: IntakeRules) -> Intake:
    """Every record through jiter and the pydantic model: the reference `read_message` agrees with, and its fallback."""
    accepted: list[AcceptedRecord] = []
    rejected: list[DeadLetter] = []
    filtered = 0
    value = message.value or b""
    if len(value) > rules.max_message_bytes:
        return Intake(
            [],
            [
                _whole_message(
                    message, RejectReason.TOO_LARGE, f"message of {len(value)} bytes exceeds {rules.max_message_bytes}"
                )
            ],
        )
    try:
        document = jiter.from_json(value, float_mode="decimal", allow_inf_nan=False, cache_mode="keys")
    except ValueError as error:
        return Intake([], [_whole_message(message, RejectReason.INVALID_JSON, f"not valid JSON: {error}")])
    for index, raw in _records_of(document):
        outcome = _read_record(message, index, raw, catalog, rules)
        if outcome is FILTERED:
            filtered += 1
        else:
            # As in read_message: the list matches the outcome, which mypy does not narrow here.
            (accepted if isinstance(outcome, AcceptedRecord) else rejected).append(outcome)  # type: ignore[arg-type]
    return Intake(accepted, rejected, filtered)


_ENVELOPE_HINT = 'expected a UsageRecord object or {"records": [UsageRecord, ...]} with at least one record'
_NULL_IN_BATCH = "null where a batch needs a UsageRecord object"


def _records_of(document: Any) -> Iterator[tuple[int | None, Any]]:
    """(index in batch or None, record) pairs; (None, None) when the envelope itself is wrong."""
    if isinstance(document, dict) and "records" in document:
        records = document["records"]
        if not isinstance(records, list) or not records:
            yield None, None
            return
        yield from enumerate(records)
    elif isinstance(document, dict):
        yield None, document
    else:
        yield None, None


def _read_record(
    message: Message, index: int | None, raw: Any, catalog: MetricCatalog, rules: IntakeRules
) -> AcceptedRecord | DeadLetter | Filtered:
    if raw is None:
        if index is not None:  # a null in a batch: that element, as any other bad record of a batch
            return _rejection(message, index, None, RejectReason.INVALID_RECORD, _NULL_IN_BATCH)
        return _whole_message(message, RejectReason.INVALID_RECORD, _ENVELOPE_HINT)  # a wrong envelope
    try:
        record = UsageRecord.model_validate(raw)
    except ValidationError as error:
        return _rejection(message, index, raw, RejectReason.INVALID_RECORD, _summary(error), _field_errors(error))
    settled = _settle(message, index, record, catalog, rules)
    if isinstance(settled, Refusal):
        return _rejection(message, index, raw, settled.reason, settled.message)
    return settled


def _settle(
    message: Message, index: int | None, record: UsageRecord | DecodedRecord, catalog: MetricCatalog, rules: IntakeRules
) -> AcceptedRecord | Refusal | Filtered:
    """A valid record, from the model or the fast path, accepted with its dedup id, timestamp, metric, stored
    metadata and what its metric reads from it settled; or why the rules refuse it; or FILTERED."""
    timestamp = record.timestamp or message.timestamp
    metric = judge_fields(
        record.metric_key,
        record.subject_type,
        record.subject_id,
        record.metadata,
        timestamp,
        message.timestamp,
        catalog,
        rules,
    )
    if isinstance(metric, Refusal):
        return metric
    metadata = stored_metadata_of(record.metadata, rules)
    if isinstance(metadata, Refusal):
        return metadata
    dedup_id = record.id if record.id is not None else _position(message, index)
    quantity = record.quantity if isinstance(record, DecodedRecord) else str(record.quantity)
    dimensions, distinct = TOTAL, None
    reader = catalog.readers.get(metric.id)
    if reader is not None:  # the metric reads more than `quantity`
        try:
            reading = reader.read(quantity, record.metadata)
        except UnreadableRecord as error:
            return Refusal(RejectReason.INVALID_RECORD, str(error))
        if reading is None:
            return FILTERED
        quantity, dimensions, distinct = reading
    return AcceptedRecord(
        record.subject_type,
        record.subject_id,
        dedup_id,
        record.metric_key,
        metric.id,
        metric.aggregation_type,
        quantity,
        (timestamp - EPOCH) // _MILLISECOND,
        metadata,
        metric.reset_period is _NEVER,
        dimensions,
        distinct,
    )


def _position(message: Message, index: int | None) -> str:
    """The dedup id of a record without one: it counts once per Kafka position."""
    return f"@{message.topic}/{message.partition}/{message.offset}" + ("" if index is None else f"/{index}")


def stored_metadata(record: UsageRecord, rules: IntakeRules) -> str | Refusal:
    """The record's metadata as the JSON text that is stored, or why it cannot be (shared by the worker and the API)."""
    return stored_metadata_of(record.metadata, rules)


def stored_metadata_of(metadata: dict[str, Any], rules: IntakeRules) -> str | Refusal:
    """`stored_metadata` from the metadata alone (the fast path has no model)."""
    if not metadata:
        return "{}"
    text = metadata_json(metadata)
    if text is None:
        return Refusal(RejectReason.INVALID_RECORD, "metadata cannot be stored as JSON (nested too deeply)")
    size = len(text) if text.isascii() else len(text.encode())
    if size > rules.max_metadata_bytes:
        return Refusal(RejectReason.TOO_LARGE, f"metadata of {size} bytes as JSON exceeds {rules.max_metadata_bytes}")
    return text


def metadata_json(metadata: dict[str, Any]) -> str | None:
    """The metadata as JSON text for storage, or None when it cannot be rendered.

    orjson is fast but stops at 64-bit integers and 255 levels; valid input can exceed both
    (the JSON parser keeps big integers exact), so those fall back to the standard library.
    """
    if not metadata:
        return "{}"
    try:
        return orjson.dumps(metadata, default=str).decode()
    except TypeError:  # also orjson.JSONEncodeError
        try:
            return json.dumps(metadata, default=str, ensure_ascii=False)
        except (ValueError, RecursionError):
            return None


@dataclass(frozen=True, slots=True)
class Refusal:
    reason: RejectReason
    message: str


def judge(
    record: UsageRecord, timestamp: datetime, received_at: datetime, catalog: MetricCatalog, rules: IntakeRules
) -> MetricDefinition | Refusal:
    """The metric that governs a valid record, or why it is refused (shared by the worker and the API)."""
    return judge_fields(
        record.metric_key,
        record.subject_type,
        record.subject_id,
        record.metadata,
        timestamp,
        received_at,
        catalog,
        rules,
    )


def judge_fields(
    metric_key: str,
    subject_type: str,
    subject_id: str,
    metadata: dict[str, Any],
    timestamp: datetime,
    received_at: datetime,
    catalog: MetricCatalog,
    rules: IntakeRules,
) -> MetricDefinition | Refusal:
    """`judge` from a record's fields (the fast path has no model)."""
    earliest, latest = rules.window(received_at)
    if timestamp < earliest:
        return Refusal(
            RejectReason.TOO_LATE,
            f"timestamp {timestamp.isoformat()} is more than {rules.allowed_lateness} before the message time",
        )
    if timestamp > latest:
        return Refusal(
            RejectReason.FUTURE_TIMESTAMP,
            f"timestamp {timestamp.isoformat()} is more than {rules.future_skew} after the message time",
        )
    metric = catalog.resolve(metric_key, record_org(subject_type, subject_id, metadata))
    if metric is None:
        return Refusal(
            RejectReason.UNKNOWN_METRIC,
            f"no metric definition with key {metric_key!r} for this record's org or globally",
        )
    return metric


def unreadable_payload(record: UsageRecord, metric: MetricDefinition, catalog: MetricCatalog) -> Refusal | None:
    """Why the worker would dead-letter a valid record for what its metric reads from it (the API refuses such a
    record at once instead). A record the metric's filter leaves out is not refused: it is simply not counted."""
    reader = catalog.readers.get(metric.id)
    if reader is None:
        return None
    try:
        reader.read(str(record.quantity), record.metadata)
    except UnreadableRecord as error:
        return Refusal(RejectReason.INVALID_RECORD, str(error))
    return None


def _summary(error: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'record'}: {e['msg']}" for e in error.errors())


def _field_errors(error: ValidationError) -> list[FieldError]:
    return [FieldError(loc=list(e["loc"]), msg=e["msg"], type=e["type"]) for e in error.errors(include_url=False)]


def _rejection(
    message: Message,
    index: int | None,
    raw: Any,
    reason: RejectReason,
    text: str,
    errors: list[FieldError] | None = None,
) -> DeadLetter:
    record = _jsonable(raw)
    whole = index is None
    small = len(message.value or b"") <= EVIDENCE_BYTES
    keep = small or (not whole and (_rendered_size(record) or EVIDENCE_BYTES + 1) <= EVIDENCE_BYTES)
    return _letter(
        message,
        reason,
        text,
        errors=errors or [],
        index=index,
        record=record if keep else None,
        **(_original(message) if whole else {"truncated": not keep}),
    )


def _whole_message(message: Message, reason: RejectReason, text: str) -> DeadLetter:
    return _letter(message, reason, text, **_original(message))


def _original(message: Message) -> dict[str, Any]:
    """The message's bytes as evidence, cut to EVIDENCE_BYTES: the dead-letter topic takes at most 1 MiB either."""
    value = message.value or b""
    return {
        "original_value_base64": base64.b64encode(value[:EVIDENCE_BYTES]).decode(),
        "truncated": len(value) > EVIDENCE_BYTES,
    }


def _letter(message: Message, reason: RejectReason, text: str, **fields: Any) -> DeadLetter:
    return DeadLetter(
        reason=reason,
        message=text,
        source=message.source(),
        original_size=len(message.value or b""),
        occurred_at=message.timestamp,
        **fields,
    )


def _rendered_size(value: Any) -> int | None:
    try:
        return len(orjson.dumps(value))
    except TypeError:  # big integers, deep nesting: what orjson cannot render
        try:
            return len(json.dumps(value))
        except (ValueError, RecursionError):
            return None


def _jsonable(value: Any) -> Any:
    """Decimals parsed from the input go back out as strings, digit for digit."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if hasattr(value, "as_tuple"):
        return str(value)
    return value
