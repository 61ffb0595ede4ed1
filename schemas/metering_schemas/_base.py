"""Shared conventions of the wire contract: camelCase JSON, exact decimals, UTC times."""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal
from enum import Enum
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel


class WireModel(BaseModel):
    """JSON field names are camelCase as in the module's contract; Python uses snake_case."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, frozen=True)

    def to_json(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode()


class CaseInsensitiveEnum(str, Enum):
    """Producers write `count`, `COUNT` or `Count`; all mean the same member."""

    @classmethod
    def _missing_(cls, value: object) -> CaseInsensitiveEnum | None:
        if isinstance(value, str):
            return cls.__members__.get(value.upper())
        return None


def _as_utc(value: datetime) -> datetime:
    """A timestamp without an offset is read as UTC, so periods never depend on a server's zone."""
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    try:
        return value.astimezone(timezone.utc)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00: a ValueError makes it a field error, not a crash
        raise ValueError("timestamp is out of range once converted to UTC") from None


UtcDatetime = Annotated[datetime, AfterValidator(_as_utc)]

# Quantities and money are exact: Decimal(38, 18) in ClickHouse, never a float, never NaN/Infinity.
Quantity = Annotated[Decimal, Field(allow_inf_nan=False, max_digits=38, decimal_places=18)]

Identifier = Annotated[str, Field(min_length=1, max_length=256)]
