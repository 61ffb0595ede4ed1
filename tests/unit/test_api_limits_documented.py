"""The limits the API enforces are the ones its documentation lists: the OpenAPI's table is made from the same
constants as the models, and the manual's HTTP API page carries that table row for row."""

from __future__ import annotations

from pathlib import Path

from metering_pipeline.api.app import LIMITS
from metering_pipeline.api.errors import ERROR_RESPONSES

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "guide" / "http-api.md"


def test_the_http_api_guide_lists_every_limit_of_the_openapi_description():
    rows = [line for line in LIMITS.splitlines() if line.startswith("| ") and "---" not in line]
    guide = GUIDE.read_text()
    assert len(rows) >= 15
    assert [row for row in rows if row not in guide] == []


def test_every_refusal_status_is_documented_on_every_operation():
    assert {400, 401, 403, 404, 409, 413, 422, 503} <= set(ERROR_RESPONSES)
