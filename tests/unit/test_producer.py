"""How the producer shapes messages: keys, batches and ids (no broker involved)."""

from __future__ import annotations

import orjson
import pytest

from metering_pipeline.producer import batch_message, record_line, subject_key, with_id
from metering_schemas import UsageRecord


def usage(subject_id: str, record_id: str | None = "r") -> UsageRecord:
    return UsageRecord(id=record_id, metric_key="api_calls", subject_type="org", subject_id=subject_id)


def test_single_records_are_keyed_by_subject():
    assert subject_key(usage("org-9")) == b"org:org-9"


def test_a_batch_of_one_subject_is_keyed_by_it_and_a_mixed_batch_is_not():
    key, value = batch_message([usage("a", "1"), usage("a", "2")])
    assert key == b"org:a"
    assert [r["id"] for r in orjson.loads(value)["records"]] == ["1", "2"]
    assert batch_message([usage("a"), usage("b")])[0] is None


def test_records_without_an_id_get_a_distinct_one_and_ids_are_kept():
    first, second = with_id(usage("a", None)), with_id(usage("a", None))
    assert first.id and second.id and first.id != second.id
    assert with_id(usage("a", "mine")).id == "mine"


def test_json_lines_keep_every_digit_of_a_numeric_quantity():
    line = b'{"metricKey":"t","subjectType":"org","subjectId":"o","quantity":12345678901234567890.123456789012345678}'
    assert str(record_line(line).quantity) == "12345678901234567890.123456789012345678"


def test_json_lines_refuse_non_json_with_a_value_error():
    with pytest.raises(ValueError):
        record_line(b"{not json")
