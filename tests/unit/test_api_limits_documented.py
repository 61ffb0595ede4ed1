"""The limits the API enforces are the ones its documentation lists: the OpenAPI's table is made from the same
constants as the models, and the manual's HTTP API page carries that table row for row."""

from __future__ import annotations

from pathlib import Path

from metering_pipeline.api.app import LIMITS, create_app
from metering_pipeline.settings import Settings

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "guide" / "http-api.md"


def test_the_http_api_guide_lists_every_limit_of_the_openapi_description():
    rows = [line for line in LIMITS.splitlines() if line.startswith("| ") and "---" not in line]
    guide = GUIDE.read_text()
    assert len(rows) >= 15
    assert [row for row in rows if row not in guide] == []


def test_every_refusal_status_is_documented_on_every_operation(tmp_path):
    """Every operation of the module answers 401 and 413 before it reads its request, and 422 and 503 after: the
    OpenAPI lists them, with the one error shape, on each."""
    spec = create_app(Settings(api_keys_file=tmp_path / "keys.jsonl")).openapi()
    operations = {
        (method, path): operation["responses"]
        for path, methods in spec["paths"].items()
        if path.startswith("/v1/")
        for method, operation in methods.items()
    }
    assert len(operations) >= 27
    undocumented = {
        where: sorted({"401", "413", "422", "503"} - set(responses))
        for where, responses in operations.items()
        if not {"401", "413", "422", "503"} <= set(responses)
    }
    assert undocumented == {}
    shapes = {responses["401"]["content"]["application/json"]["schema"]["$ref"] for responses in operations.values()}
    assert shapes == {"#/components/schemas/ErrorBody"}
