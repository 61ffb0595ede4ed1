"""Plain-text tables for the CLI: aligned columns people can read and scripts can split."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal


def render(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers], *[["" if c is None else str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def decimal_text(value: Decimal) -> str:
    """All significant digits, no exponent, no trailing zeros: 12.5, not 1.25E+1 or 12.500000000000000000."""
    text = format(value, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text
