"""How the producer shapes messages: keys, batches and ids (no broker involved)."""

from __future__ import annotations

import orjson
import pytest

from metering_pipeline.producer import MAX_MESSAGE_BYTES, messages_of, record_line, subject_key, with_id
from metering_schemas import UsageRecord


def usage(subject_id: str, record_id: str | None = "r", **metadata: str) -> UsageRecord:
    return UsageRecord(
        id=record_id, metric_key="api_calls", subject_type="org", subject_id=subject_id, metadata=metadata
    )


def test_single_records_are_keyed_by_subject():
    assert subject_key(usage("org-9")) == b"org:org-9"


def test_a_batch_of_one_subject_is_keyed_by_it_and_a_mixed_batch_is_not():
    [(key, value)] = messages_of([usage("a", "1"), usage("a", "2")], 500)
    assert key == b"org:a"
    assert [r["id"] for r in orjson.loads(value)["records"]] == ["1", "2"]
    assert [key for key, _ in messages_of([usage("a"), usage("b")], 500)] == [None]


def test_single_record_messages_carry_the_record_itself_keyed_by_its_subject():
    messages = list(messages_of([usage("a", "1"), usage("b", "2")], None))
    assert [(key, orjson.loads(value)["id"]) for key, value in messages] == [(b"org:a", "1"), (b"org:b", "2")]


def test_batches_are_cut_at_the_record_count_and_at_the_message_size_keeping_every_record_in_order():
    assert [len(orjson.loads(v)["records"]) for _, v in messages_of([usage("a", str(n)) for n in range(5)], 2)] == [
        2,
        2,
        1,
    ]
    big = [usage("a", str(n), blob="x" * 200 * 1024) for n in range(10)]  # 10 records of 200 KiB: 2 MiB in all
    messages = list(messages_of(big, 500))
    assert len(messages) > 1 and all(len(value) <= MAX_MESSAGE_BYTES for _, value in messages)
    assert [r["id"] for _, value in messages for r in orjson.loads(value)["records"]] == [str(n) for n in range(10)]


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
