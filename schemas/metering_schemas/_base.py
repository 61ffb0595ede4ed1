"""Shared conventions of the wire contract: camelCase JSON, exact decimals, UTC times."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from enum import Enum
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    WithJsonSchema,
)
from pydantic.alias_generators import to_camel
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError, core_schema


class WireModel(BaseModel):
    """JSON field names are camelCase as in the module's contract; Python uses snake_case."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, frozen=True)

    def to_json(self) -> bytes:
        """camelCase JSON bytes (what `model_dump_json(by_alias=True)` writes, without its decode to str and back:
        the worker writes one per changed rollup)."""
        return self.__pydantic_serializer__.to_json(self, by_alias=True)


class CaseInsensitiveEnum(str, Enum):
    """Producers write `count`, `COUNT` or `Count`; all mean the same member."""

    @classmethod
    def _missing_(cls, value: object) -> CaseInsensitiveEnum | None:
        if isinstance(value, str):
            return cls.__members__.get(value.upper())
        return None


def as_utc(value: datetime) -> datetime:
    """A timestamp without an offset is read as UTC, so periods never depend on a server's zone."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00: a ValueError makes it a field error, not a crash
        raise ValueError("timestamp is out of range once converted to UTC") from None


UtcDatetime = Annotated[datetime, AfterValidator(as_utc)]

# A decimal given as a string is written as a JSON number (RFC 8259, section 6), nothing else: Decimal() would also
# take "1_000", " 1 ", "١٢" (non-ASCII digits), "+1", ".5", "1.", "01" and "NaN". [0-9] is ASCII only (\d is not).
_JSON_NUMBER = r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?"
JSON_NUMBER_PATTERN = f"^{_JSON_NUMBER}$"  # as JSON Schema writes it
_json_number = re.compile(_JSON_NUMBER).fullmatch  # fullmatch: unlike $, it allows no final newline


@dataclass(frozen=True, slots=True)
class JsonNumberText:
    """Refuses a decimal string that is not in JSON number form, before Decimal() reads it; numbers pass untouched.

    The string branch of the field's JSON Schema gets the same pattern, so the schema files and the OpenAPI say it.
    """

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.no_info_before_validator_function(_json_number_text, handler(source))

    def __get_pydantic_json_schema__(self, schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        json_schema = handler(schema)
        if handler.mode == "validation":
            for branch in json_schema.get("anyOf", ()):
                if branch.get("type") == "string":
                    branch["pattern"] = JSON_NUMBER_PATTERN
        return json_schema


def _json_number_text(value: Any) -> Any:
    if isinstance(value, str) and _json_number(value) is None:
        # The type pydantic gives any other unreadable decimal ("abc"), so the API's 422 and the dead letters name it
        # alike.
        raise PydanticCustomError(
            "decimal_parsing", 'Input should be a JSON number or a string in JSON number form, e.g. "12", "-0.5", "1e3"'
        )
    return value


# Quantities and money are exact: Decimal(38, 18) in ClickHouse, never a float, never NaN/Infinity.
Quantity = Annotated[Decimal, Field(allow_inf_nan=False, max_digits=38, decimal_places=18), JsonNumberText()]

# What the pipeline emits is described as emitted (JSON Schema "serialization" mode): decimals are always strings
# in Python's notation (`str(Decimal)`: "85.50", "1E+6"), timestamps always UTC with a "Z".
_DECIMAL_STRING = r"^-?[0-9]+(\.[0-9]+)?(E[+-][0-9]+)?$"
_UTC_TIMESTAMP = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?Z$"

# Aggregates as ClickHouse's total_quantity Decimal(76, 18) holds them: a sum of many 38-digit quantities
# outgrows `Quantity`. Every model carrying one uses this type (summaries, usage.aggregated, the values and limits
# alerts compare, invoice lines' units), so what a rollup holds can always be read, billed and emitted.
AggregateQuantity = Annotated[
    Decimal,
    Field(allow_inf_nan=False, max_digits=76, decimal_places=18),
    JsonNumberText(),
    WithJsonSchema({"type": "string", "pattern": _DECIMAL_STRING}, mode="serialization"),
]

EmittedUtcDatetime = Annotated[
    UtcDatetime,
    WithJsonSchema({"type": "string", "format": "date-time", "pattern": _UTC_TIMESTAMP}, mode="serialization"),
]

MAX_IDENTIFIER = 256  # characters
Identifier = Annotated[str, Field(min_length=1, max_length=MAX_IDENTIFIER)]

# Free text has a bound too: a definition travels as one Kafka message, which the broker takes only up to its size.
MAX_NAME = 256  # characters
MAX_DESCRIPTION = 4096  # characters
Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME)]
Description = Annotated[str, Field(max_length=MAX_DESCRIPTION)]
