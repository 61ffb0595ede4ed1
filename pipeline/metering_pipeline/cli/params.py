"""Parsing shared by the CLI's commands."""

from __future__ import annotations

from datetime import UTC, datetime

import click
from pydantic import ValidationError


def subject(value: str) -> tuple[str, str]:
    """`TYPE:ID` → (subject type, subject id)."""
    subject_type, sep, subject_id = value.partition(":")
    if not sep or not subject_type or not subject_id:
        raise click.BadParameter("expected TYPE:ID, e.g. org:org-123")
    return subject_type, subject_id


def utc(value: datetime | None) -> datetime | None:
    """click.DateTime gives naive datetimes; the CLI means UTC."""
    return None if value is None else (value if value.tzinfo else value.replace(tzinfo=UTC))


def field_errors(error: ValidationError) -> str:
    """`field: message` per problem, camelCase as on the wire."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'value'}: {e['msg']}" for e in error.errors())
