"""Generate the JSON Schema files in `metering_schemas/json/` from the models
(`python -m metering_schemas.json_schema`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import BaseModel

from metering_schemas import (
    DeadLetter,
    Invoice,
    MetricDefined,
    MetricDefinition,
    Plan,
    SubjectSettings,
    Subscription,
    ThresholdAlert,
    UsageAggregated,
    UsageRecord,
    UsageRecordBatch,
    UsageSummary,
    UsageThreshold,
)
from metering_schemas.webhook import WebhookAttempt, WebhookEndpoint

SCHEMA_DIR = Path(__file__).resolve().parent / "json"

# File name -> model; the name says which topic value the schema describes.

CONTRACT: dict[str, type[BaseModel]] = {
    "usage-record.schema.json": UsageRecord,
    "usage-record-batch.schema.json": UsageRecordBatch,
    "metric-definition.schema.json": MetricDefinition,
    "usage-summary.schema.json": UsageSummary,
    "usage-threshold.schema.json": UsageThreshold,
    "dead-letter.schema.json": DeadLetter,
    "plan.schema.json": Plan,
    "subscription.schema.json": Subscription,
    "invoice.schema.json": Invoice,
    "threshold-alert.schema.json": ThresholdAlert,
    "usage-aggregated.schema.json": UsageAggregated,
    "metric-defined.schema.json": MetricDefined,
    "subject.schema.json": SubjectSettings,
    "webhook-endpoint.schema.json": WebhookEndpoint,
    "webhook-attempt.schema.json": WebhookAttempt,
}

# The pipeline's own events are described as it writes them (decimals always strings, timestamps always "Z",
# every field present); the other files describe what it accepts.
EMITTED: frozenset[type[BaseModel]] = frozenset({ThresholdAlert, UsageAggregated, MetricDefined})


def render(model: type[BaseModel]) -> str:
    schema = model.model_json_schema(by_alias=True, mode="serialization" if model in EMITTED else "validation")
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def write(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for file_name, model in CONTRACT.items():
        path = directory / file_name
        path.write_text(render(model))
        written.append(path)
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else SCHEMA_DIR
    for path in write(target):
        print(path)
