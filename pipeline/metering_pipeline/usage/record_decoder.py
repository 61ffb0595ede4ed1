"""From a message value's bytes to decoded usage records, fast, for the forms producers nearly always send.

A typed msgspec decode replaces the JSON parse and the pydantic model per record, but only where the result is
certain to be what `UsageRecord` would make of the same record: exactly its camelCase keys, identifiers of 1..256
characters, a quantity in a strict ASCII decimal form, a timestamp in a strict ISO form, metadata that jiter parses
as the model's path does. Any other record comes back undecided (None) and is read by the model, which also explains
why a record is refused: this module never refuses anything.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

import jiter
import msgspec
from msgspec import UNSET, UnsetType

from metering_schemas._base import as_utc  # the model's own conversion, so both paths give the same UTC instant

_Identifier = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
_ABSENT = msgspec.Raw()  # an empty Raw: the key was not in the record


class _Wire(msgspec.Struct, rename="camel", forbid_unknown_fields=True, gc=False):
    """A record as it usually arrives, or a batch envelope ({"records": [...]}), in one decode.

    Every field may be absent so that an envelope decodes with the same type; unknown keys (snake_case, extras)
    fail the decode, which leaves the record to the model. Quantity and metadata stay raw JSON text, so nothing
    is read through a float or a typed default before the checks below.
    """

    id: _Identifier | None | UnsetType = UNSET
    metric_key: _Identifier | UnsetType = UNSET
    subject_type: _Identifier | UnsetType = UNSET
    subject_id: _Identifier | UnsetType = UNSET
    quantity: msgspec.Raw = _ABSENT
    timestamp: str | None | UnsetType = UNSET
    metadata: msgspec.Raw = _ABSENT
    records: list[msgspec.Raw] | UnsetType = UNSET


_decode_wire = msgspec.json.Decoder(_Wire).decode

# A JSON number (group 1) or string (group 2) with at most 20 integer and 18 fractional ASCII digits: always within
# Quantity's Decimal(38, 18) and the JSON number form it requires of a string (`JsonNumberText`), and Decimal(text) is
# then exactly the model's value. Exponents and big integers are left to the model, and so is every string Decimal()
# reads but the JSON number grammar does not ("1_000", " 12", ".5", "01", "NaN", non-ASCII digits): the model refuses
# it.
_QUANTITY = re.compile(rb'(-?(?:0|[1-9][0-9]{0,19})(?:\.[0-9]{1,18})?)|"(-?(?:0|[1-9][0-9]{0,19})(?:\.[0-9]{1,18})?)"')
# YYYY-MM-DDTHH:MM:SS[.ffffff][Z|±HH:MM] with ranges the model's parser also accepts (it refuses +05:60, 24:00, :60).
_TIMESTAMP = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,6})?"
    r"(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])?"
)


@dataclass(frozen=True, slots=True)
class _Place:
    """Where a part sits in its message. msgspec's Raw skips neither check UTF-8 nor stop at jiter's nesting limit,
    so jiter parses the part again inside the same containers as in the message: it then refuses exactly what it
    would refuse in the whole message, and reads numbers as the model's path does (decimal mode)."""

    opening: bytes
    closing: bytes
    path: tuple[str | int, ...]

    def parse(self, raw: msgspec.Raw) -> Any:
        value = jiter.from_json(
            self.opening + bytes(raw) + self.closing, float_mode="decimal", allow_inf_nan=False, cache_mode="keys"
        )
        for step in self.path:
            value = value[step]
        return value


_SINGLE_METADATA = _Place(b'{"m":', b"}", ("m",))  # {..., "metadata": {...}}
_BATCH_METADATA = _Place(b'{"r":[{"m":', b"}]}", ("r", 0, "m"))  # {"records": [{..., "metadata": {...}}]}
_BATCH_RECORD = _Place(b'{"r":[', b"]}", ("r", 0))  # {"records": [{...}]}


@dataclass(slots=True)
class DecodedRecord:
    """A record's fields with exactly the values `UsageRecord` would hold (timestamp None: not given)."""

    id: str | None
    metric_key: str
    subject_type: str
    subject_id: str
    quantity: str  # exact decimal text: Decimal(quantity) is the model's value, exponent and sign included
    timestamp: datetime | None
    metadata: dict[str, Any]


@dataclass(slots=True)
class DecodedBatch:
    """A batch message's records in order; None where a record is left to the model."""

    records: list[DecodedRecord | None]
    texts: list[msgspec.Raw]  # each record's JSON text, for the model


def decode_message(value: bytes) -> DecodedRecord | DecodedBatch | None:
    """A single-record message's record or a batch message's records; None when the whole message is for the model
    to read (invalid JSON, not an object, an unusual envelope, a single record not decided here)."""
    if not value.isascii():  # msgspec does not check UTF-8 in what it skips (a duplicate key's value): jiter does
        try:
            value.decode()
        except UnicodeDecodeError:
            return None
    try:
        wire = _decode_wire(value)
    except (msgspec.DecodeError, RecursionError):  # ValidationError included; deep nesting too: the model's to judge
        return None
    texts = wire.records
    if texts is UNSET:
        return _decided(wire, _SINGLE_METADATA)
    if not texts or not _bare_envelope(wire):
        return None
    return DecodedBatch([_decided_text(text) for text in texts], texts)


def parse_record(text: msgspec.Raw) -> Any:
    """A batch record's JSON as the model's path parses it (ValueError when jiter refuses it there)."""
    return _BATCH_RECORD.parse(text)


def _decided_text(text: msgspec.Raw) -> DecodedRecord | None:
    try:
        wire = _decode_wire(text)
    except (msgspec.DecodeError, RecursionError):
        return None
    return None if wire.records is not UNSET else _decided(wire, _BATCH_METADATA)


def _bare_envelope(wire: _Wire) -> bool:
    """Whether a batch envelope holds nothing but its records (other keys are for the model, which ignores them)."""
    return (
        wire.id is UNSET
        and wire.metric_key is UNSET
        and wire.subject_type is UNSET
        and wire.subject_id is UNSET
        and wire.timestamp is UNSET
        and not wire.quantity
        and not wire.metadata
    )


def _decided(wire: _Wire, metadata_place: _Place) -> DecodedRecord | None:
    """The record's values when they are certain to equal the model's, else None."""
    metric_key, subject_type, subject_id = wire.metric_key, wire.subject_type, wire.subject_id
    if metric_key is UNSET or subject_type is UNSET or subject_id is UNSET:
        return None
    quantity = _quantity(wire.quantity)
    if quantity is None:
        return None
    stamp = wire.timestamp
    timestamp = None
    if stamp is not UNSET and stamp is not None:
        timestamp = _timestamp(stamp)
        if timestamp is None:
            return None
    metadata = _metadata(wire.metadata, metadata_place)
    if metadata is None:
        return None
    record_id = wire.id
    return DecodedRecord(
        None if record_id is UNSET else record_id, metric_key, subject_type, subject_id, quantity, timestamp, metadata
    )


def _quantity(raw: msgspec.Raw) -> str | None:
    """The quantity's text, not a Decimal: the router only passes it on, and the rollup stage decodes it."""
    if not raw:
        return "1"
    match = _QUANTITY.fullmatch(raw)
    if match is None:
        return None
    number = match[1]
    if number is None:
        return match[2].decode()
    # The model gets a JSON integer as a Python int and a fraction as Decimal(text): the same except for -0.
    return number.decode() if number != b"-0" else "0"


def _timestamp(text: str) -> datetime | None:
    if _TIMESTAMP.fullmatch(text) is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
        return moment if moment.tzinfo is UTC else as_utc(moment)  # "Z", "+00:00": already as as_utc makes them
    except ValueError:  # no such date, or out of range once in UTC: the model words the refusal
        return None


def _metadata(raw: msgspec.Raw, place: _Place) -> dict[str, Any] | None:
    if not raw or (len(raw) == 2 and bytes(raw) == b"{}"):
        return {}
    try:
        metadata = place.parse(raw)
    except ValueError:
        return None
    return metadata if isinstance(metadata, dict) else None
