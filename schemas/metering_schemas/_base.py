"""Shared conventions of the wire contract: camelCase JSON, exact decimals, UTC times."""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal
from enum import Enum
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema
from pydantic.alias_generators import to_camel


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
        return value.replace(tzinfo=timezone.utc)
    try:
        return value.astimezone(timezone.utc)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00: a ValueError makes it a field error, not a crash
        raise ValueError("timestamp is out of range once converted to UTC") from None


UtcDatetime = Annotated[datetime, AfterValidator(as_utc)]

# Quantities and money are exact: Decimal(38, 18) in ClickHouse, never a float, never NaN/Infinity.
Quantity = Annotated[Decimal, Field(allow_inf_nan=False, max_digits=38, decimal_places=18)]

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
    WithJsonSchema({"type": "string", "pattern": _DECIMAL_STRING}, mode="serialization"),
]

EmittedUtcDatetime = Annotated[
    UtcDatetime,
    WithJsonSchema({"type": "string", "format": "date-time", "pattern": _UTC_TIMESTAMP}, mode="serialization"),
]

Identifier = Annotated[str, Field(min_length=1, max_length=256)]
