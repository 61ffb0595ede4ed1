"""The typed fast path of intake must give exactly what the pydantic model's path gives, record for record.

`read_message_by_model` is the reference (the behaviour before the fast path existed); `read_message` must equal it
on every input: same accepted values, same dead letters, same order. The grammar below mixes the forms producers
usually send with the forms where msgspec, Decimal, int() and the model are known to disagree.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import jiter
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from metering_pipeline.usage.intake import IntakeRules, Message, read_message, read_message_by_model
from metering_pipeline.usage.metrics import MetricCatalog
from metering_pipeline.usage.record_decoder import DecodedBatch, DecodedRecord, decode_message
from metering_pipeline.usage.routed_record import AcceptedRecord
from metering_schemas import AggregationType, DeadLetter, MetricDefinition, RejectReason

UTC = UTC
NOW = datetime(2026, 11, 24, 12, tzinfo=UTC)
TOKENS = MetricDefinition(id="tokens", key="tokens", name="t", aggregation_type=AggregationType.SUM)
TOKENS_ORG1 = MetricDefinition(
    id="org-1:tokens", key="tokens", name="t", aggregation_type=AggregationType.MAX, org_id="org-1"
)
CATALOG = MetricCatalog({d.id: d for d in (TOKENS, TOKENS_ORG1)})
RULES = IntakeRules(max_metadata_bytes=120)  # small, so generated metadata falls on both sides of the limit
JITER_DEPTH = 200  # the deepest nesting of objects jiter parses


def message(value: bytes, offset: int = 7) -> Message:
    return Message("usage.recorded", 2, offset, NOW, b"k", value)


def _accepted_view(record: AcceptedRecord) -> tuple:
    """Every field, the quantity as the Decimal the rollup stage reads from its text, by value and by text (the two
    paths may write the same Decimal differently: "0.000000000000000001" and "1E-18")."""
    fields = msgspec.structs.asdict(record)
    quantity = Decimal(fields.pop("quantity"))
    return (*fields.values(), quantity, str(quantity))


def _letter_view(letter: DeadLetter) -> bytes:
    return letter.to_json()


def assert_same_as_model(value: bytes, rules: IntakeRules = RULES) -> tuple[list[AcceptedRecord], list[DeadLetter]]:
    accepted, rejected, filtered = read_message(message(value), CATALOG, rules)
    reference_accepted, reference_rejected, reference_filtered = read_message_by_model(message(value), CATALOG, rules)
    assert filtered == reference_filtered
    assert [_accepted_view(a) for a in accepted] == [_accepted_view(a) for a in reference_accepted]
    assert [_letter_view(r) for r in rejected] == [_letter_view(r) for r in reference_rejected]
    return accepted, rejected


# --- the grammar ---------------------------------------------------------------------------------------------------


def _text(value: object) -> str:
    return json.dumps(value, ensure_ascii=False)


def mostly(usual: st.SearchStrategy[str], odd: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Three draws in four from the usual forms, so that whole records often are canonical and counted."""
    return st.integers(0, 3).flatmap(lambda n: odd if n == 0 else usual)


ODD_IDENTIFIERS = st.one_of(
    st.sampled_from(
        ["o", "org-1", "tokens", "x" * 256, "x" * 257, "", "é" * 256, "😀" * 256, "😀" * 257, "a\u0000b"]
    ).map(_text),
    st.text(min_size=0, max_size=4).map(_text),
    st.sampled_from(["0", "17", "null", "true", "[]", "{}", '"\\u0041"', '"\\ud83d\\ude00"']),
)
IDENTIFIERS = mostly(st.text(min_size=1, max_size=6).map(_text), ODD_IDENTIFIERS)
METRIC_KEYS = mostly(st.sampled_from(['"tokens"', '"tokens"', '"tokens"', '"nope"']), ODD_IDENTIFIERS)
SUBJECT_TYPES = mostly(st.sampled_from(['"org"', '"user"']), ODD_IDENTIFIERS)
SUBJECT_IDS = mostly(st.sampled_from(['"o"', '"org-1"', '"u"']), ODD_IDENTIFIERS)

ODD_QUANTITIES = st.one_of(
    st.sampled_from(
        [
            "1",
            "0",
            "-0",
            "-5",
            "2.5",
            "-0.0",
            '"2.5"',
            '"-0"',
            '"-0.0"',
            '"0"',
            '"1.50"',
            "12345678901234567890.123456789012345678",
            '"99999999999999999999.999999999999999999"',
            "99999999999999999999",
            "100000000000000000000",
            '"100000000000000000000"',
            "18446744073709551617",
            "9" * 38,
            "9" * 39,
            '"' + "9" * 38 + '"',
            "0.12345678901234567",
            "0.123456789012345678",
            "0.1234567890123456789",
            '"0.000000000000000001"',
            "1e3",
            "1E-5",
            "1.5e+2",
            '"1e3"',
            '"NaN"',
            '"Infinity"',
            '"-Infinity"',
            '"nan"',
            '"1_000"',
            '" 12"',
            '"12 "',
            '".5"',
            '"1."',
            '"+1"',
            '"00.5"',
            '"\\u0031"',
            _text("٣"),
            _text("１"),
            '"1.0000000000000000000"',
            "1.0000000000000000000",
            '"1.0000000000000000001"',
            '"0.1234567890123456789"',
            '""',
            '"abc"',
            "null",
            "true",
            "[]",
            "{}",
            # Decimal() reads these strings, the JSON number grammar does not (issue 23)
            '" 1 "',
            _text("١٢"),
            '"01"',
            '"-01"',
            '"0x10"',
            '"1e"',
            '"-"',
            '"1e+"',
            '"1\\n"',
            '"\\t1"',
            '"1E+3"',
            '"-0e0"',
            '"inf"',
            '"1__0"',
            '"1_000.5"',
        ]
    ),
    st.integers(min_value=-(10**40), max_value=10**40).map(str),
    st.integers(min_value=-(10**40), max_value=10**40).map(lambda n: f'"{n}"'),
    st.decimals(allow_nan=False, allow_infinity=False, min_value=-(10**22), max_value=10**22).map(
        lambda d: str(d) if "E" not in str(d) else f"{d:f}"
    ),
    st.decimals(allow_nan=False, allow_infinity=False, min_value=-(10**22), max_value=10**22).map(lambda d: f'"{d:f}"'),
)
QUANTITIES = mostly(
    st.one_of(
        st.integers(-(10**6), 10**6).map(str),
        st.integers(0, 10**6).map(lambda n: f'"{n}"'),
        st.decimals(0, 10**6, places=2).map(lambda d: f'"{d}"'),
        st.decimals(0, 10**6, places=9).map(str),
    ),
    ODD_QUANTITIES,
)


def _stamp(moment: datetime, form: str) -> str:
    if form == "z":
        return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    if form == "offset":
        return moment.astimezone(timezone(timedelta(hours=5, minutes=30))).isoformat()
    if form == "naive":
        return moment.astimezone(UTC).replace(tzinfo=None).isoformat()
    if form == "seconds":
        return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if form == "millis":
        return moment.astimezone(UTC).isoformat(timespec="milliseconds")
    return moment.astimezone(UTC).isoformat(sep=" ")


RECENT = st.datetimes(
    min_value=datetime(2026, 10, 20, 12), max_value=datetime(2026, 11, 24, 12, 5), timezones=st.just(UTC)
)
ODD_TIMESTAMPS = st.one_of(
    st.builds(
        _stamp,
        st.datetimes(min_value=datetime(2026, 10, 15), max_value=datetime(2026, 11, 25), timezones=st.just(UTC)),
        st.sampled_from(["z", "offset", "naive", "seconds", "millis", "space"]),
    ).map(_text),
    st.sampled_from(
        [
            "2026-11-24T11:00:00Z",
            "2026-11-24T16:30:00+05:30",
            "2026-11-24T11:00:00",
            "2026-11-24T11:00:00.1234567Z",
            "2026-11-24 11:00:00Z",
            "2026-11-24t11:00:00z",
            "2026-02-30T00:00:00Z",
            "0001-01-01T00:00:00+01:00",
            "9999-12-31T23:59:59-01:00",
            "0000-01-01T00:00:00Z",
            "2026-11-24T11:00:00+05:60",
            "2026-11-24T11:00:00+24:00",
            "2026-11-24T11:00:00+23:59",
            "2026-11-24T11:00:00-00:00",
            "2026-11-24T24:00:00Z",
            "2026-11-24T23:59:60Z",
            "2026-11-24T11:00:00.5Z",
            "2026-11-24T11:00Z",
            "2026-11-24T11:00:00+0530",
            "2026-11-24",
            "1795521600",
            "2026-10-01T00:00:00Z",
            "2026-11-24T12:06:00Z",
            "2026-11-24T12:04:59.999999Z",
            "٢٠٢٦-11-24T11:00:00Z",
            "",
        ]
    ).map(_text),
    st.sampled_from(["1795521600", "1795521600000", "1795521600.5", "null", "true", "[]"]),
)
TIMESTAMPS = mostly(
    st.builds(_stamp, RECENT, st.sampled_from(["z", "offset", "naive", "seconds", "millis"])).map(_text), ODD_TIMESTAMPS
)


def _nested(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


ODD_METADATA = st.one_of(
    st.sampled_from(
        [
            "{}",
            "{ }",
            '{"orgId":"org-1"}',
            '{"orgId":"org-2","x":1}',
            '{"orgId":5}',
            '{"n":0.1234567890123456789}',
            '{"n":' + str(10**40) + "}",
            '{"n":1e400}',
            '{"a":{"b":[1,2,{"c":null}]}}',
            '{"a":"é\\u00e9"}',
            '{"orgId":"org-1","orgId":"org-2"}',
            '{"k":"' + "y" * 200 + '"}',
            '{"k":"' + "é" * 50 + '"}',
            "[]",
            '"x"',
            "null",
            "1",
            '{"a":"\\ud83d\\ude00"}',
        ]
    ),
    st.integers(JITER_DEPTH - 6, JITER_DEPTH + 2).map(_nested),
    st.dictionaries(
        st.text(max_size=3), st.one_of(st.integers(), st.text(max_size=5), st.booleans(), st.none()), max_size=3
    ).map(_text),
)
METADATA = mostly(
    st.sampled_from(["{}", '{"orgId":"org-1"}', '{"orgId":"org-1","plan":"pro"}', '{"region":"eu","n":2}']),
    ODD_METADATA,
)

CAMEL = {
    "id": "id",
    "metric_key": "metricKey",
    "subject_type": "subjectType",
    "subject_id": "subjectId",
    "quantity": "quantity",
    "timestamp": "timestamp",
    "metadata": "metadata",
}
VALUES = {
    "id": st.one_of(IDENTIFIERS, st.just("null")),
    "metric_key": METRIC_KEYS,
    "subject_type": SUBJECT_TYPES,
    "subject_id": SUBJECT_IDS,
    "quantity": QUANTITIES,
    "timestamp": TIMESTAMPS,
    "metadata": METADATA,
}
REQUIRED = ("metric_key", "subject_type", "subject_id")


@st.composite
def records(draw: st.DrawFn) -> str:
    """A record as JSON text: usually camelCase with the required keys, sometimes snake_case, extra, missing or
    duplicated keys, in any order."""
    fields = [name for name in CAMEL if name in REQUIRED or draw(st.booleans())]
    if draw(st.integers(0, 9)) == 0 and fields:
        fields.remove(draw(st.sampled_from(fields)))
    pairs = [(CAMEL[name] if draw(st.integers(0, 29)) else name, draw(VALUES[name])) for name in fields]
    if draw(st.integers(0, 14)) == 0:
        pairs.append(
            (draw(st.sampled_from(["extra", "records", "metricKey", "quantity", "metadata"])), draw(QUANTITIES))
        )
    pairs = draw(st.permutations(pairs))
    return "{" + ",".join(f"{_text(key)}:{value}" for key, value in pairs) + "}"


@st.composite
def message_values(draw: st.DrawFn) -> bytes:
    shape = draw(st.sampled_from(["single", "single", "batch", "batch", "odd-batch", "document", "broken"]))
    if shape == "single":
        text = draw(records())
    elif shape == "batch":
        items = draw(
            st.lists(
                st.one_of(records(), records(), st.sampled_from(["1", '"x"', "null", "[]", "{}"])),
                min_size=1,
                max_size=6,
            )
        )
        text = '{"records":[' + ",".join(items) + "]}"
    elif shape == "odd-batch":
        text = draw(
            st.sampled_from(
                [
                    '{"records":[]}',
                    '{"records":{}}',
                    '{"records":null}',
                    '{"records":"x"}',
                    '{"records":[{}],"extra":1}',
                    '{"metricKey":"tokens","records":[{}]}',
                ]
            )
        )
        if draw(st.booleans()):
            text = '{"records":[' + draw(records()) + '],"metricKey":"tokens","subjectType":"org","subjectId":"o"}'
    elif shape == "document":
        text = draw(st.sampled_from(["[1, 2]", "5", '"x"', "null", "[]", '[{"metricKey":"tokens"}]']))
    else:
        text = draw(records())
        cut = draw(st.integers(0, len(text)))
        text = draw(st.sampled_from([text[:cut], text + "x", text + ",", text.replace('"', "'", 1), "", " ", "NaN"]))
    value = text.encode()
    if draw(st.integers(0, 19)) == 0 and b'":"' in value:  # bytes that are not UTF-8, inside some string
        at = value.index(b'":"') + 3
        value = (
            value[:at]
            + draw(st.sampled_from([b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\\ud800", b"\\udc00"]))
            + value[at:]
        )
    return value


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(message_values())
def test_the_fast_path_gives_exactly_what_the_model_gives(value: bytes) -> None:
    assert_same_as_model(value)


def _is_one_json_number(text: str) -> bool:
    """Whether the text alone is a JSON document holding one number (jiter's word, not the model's pattern)."""
    if text != text.strip(" \t\r\n"):  # JSON allows whitespace around a document; the number itself has none
        return False
    try:
        value = jiter.from_json(text.encode(), float_mode="decimal", allow_inf_nan=False)
    except ValueError:
        return False
    return isinstance(value, (int, Decimal)) and not isinstance(value, bool)


NUMERIC_TEXTS = st.one_of(
    st.from_regex(r"-?(0|[1-9][0-9]{0,22})(\.[0-9]{1,20})?([eE][+-]?[0-9]{1,2})?", fullmatch=True),
    st.text(alphabet="0123456789.eE+-_ \t\n١٢٣１xN", max_size=8),
    st.sampled_from(["1_000", " 1 ", "١٢", "01", "-01", "00", ".5", "1.", "+1", "1e", "1e+", "-", "NaN", "Infinity"]),
)


@settings(max_examples=1500, deadline=None)
@given(NUMERIC_TEXTS)
def test_a_quantity_string_is_read_exactly_as_the_json_number_it_spells(text: str) -> None:
    """The numeric-string grammar is the JSON number grammar, nothing else: a string quantity is accepted when its
    text, written as a bare JSON number, is a quantity the model accepts, with the same value; any other string is
    dead-lettered. Fast path and model agree on both forms."""
    as_string, refused = assert_same_as_model(record(_text(text)))
    if not _is_one_json_number(text):
        assert as_string == [] and [letter.reason for letter in refused] == [RejectReason.INVALID_RECORD]
        return
    as_number, _ = assert_same_as_model(record(text))
    assert [Decimal(a.quantity) for a in as_string] == [Decimal(a.quantity) for a in as_number]


# --- explicit traps ------------------------------------------------------------------------------------------------


def record(
    quantity: str | None = None,
    timestamp: str | None = None,
    metadata: str | None = None,
    subject: str = '"subjectType":"org","subjectId":"o"',
) -> bytes:
    text = '{"metricKey":"tokens",' + subject
    for key, raw in (("quantity", quantity), ("timestamp", timestamp), ("metadata", metadata)):
        if raw is not None:
            text += f',"{key}":{raw}'
    return (text + "}").encode()


def decided(value: bytes) -> DecodedRecord | None:
    decoded = decode_message(value)
    assert decoded is None or isinstance(decoded, DecodedRecord)
    return decoded


@pytest.mark.parametrize(
    ("quantity", "text"),
    [
        ("12", "12"),
        ('"12.50"', "12.50"),
        ("0.123456789012345678", "0.123456789012345678"),
        ("12345678901234567890.123456789012345678", "12345678901234567890.123456789012345678"),
        ('"0.000000000000000001"', "1E-18"),
        ('"-0"', "-0"),
        ("-0.0", "-0.0"),
        ("-0", "0"),  # a JSON integer reaches the model as int 0: no negative zero
        ("18446744073709551617", "18446744073709551617"),  # over 64 bits, kept exact (orjson would make it a float)
        (None, "1"),
    ],
)
def test_plain_quantities_take_the_fast_path_with_the_models_exact_value(quantity: str | None, text: str) -> None:
    value = record(quantity)
    fast = decided(value)
    assert fast is not None and str(Decimal(fast.quantity)) == text
    [accepted], [] = assert_same_as_model(value)
    assert str(Decimal(accepted.quantity)) == text


@pytest.mark.parametrize(
    ("quantity", "accepted_as"),
    [
        ('"NaN"', None),
        ('"Infinity"', None),
        ("1e400", None),
        ("9" * 39, None),
        ('"0.1234567890123456789"', None),
        # strings Decimal() reads but the JSON number grammar does not: refused (issue 23; they were counted before)
        ('"1_000"', None),
        ('" 12"', None),
        ('" 1 "', None),
        ('".5"', None),
        (_text("٣"), None),
        (_text("١٢"), None),
        ('"+1"', None),
        ('"1."', None),
        ('"01"', None),
        ("1e3", "1E+3"),
        ("1E-5", "0.00001"),
        ('"1e3"', "1E+3"),
        ('"-2.5E-1"', "-0.25"),
        ('"1.0000000000000000000"', "1.0000000000000000000"),
        ("9" * 38, None),
        ("123456789012345678901", None),
    ],
)
def test_every_unusual_quantity_is_left_to_the_model(quantity: str, accepted_as: str | None) -> None:
    """msgspec and Decimal() take "NaN", "1_000", " 12", ".5" and non-ASCII digits; the fast path takes none of
    them, so the model alone decides: it takes a string in JSON number form, exponent included, and nothing else."""
    value = record(quantity)
    assert decided(value) is None
    accepted, rejected = assert_same_as_model(value)
    if accepted_as is None:
        assert accepted == [] and rejected[0].reason is RejectReason.INVALID_RECORD
    else:
        assert [str(Decimal(a.quantity)) for a in accepted] == [accepted_as]


@pytest.mark.parametrize(
    ("stamp", "fast"),
    [
        ('"2026-11-24T11:00:00Z"', datetime(2026, 11, 24, 11, tzinfo=UTC)),
        ('"2026-11-24T16:30:00.25+05:30"', datetime(2026, 11, 24, 11, 0, 0, 250000, tzinfo=UTC)),
        ('"2026-11-24T11:00:00"', datetime(2026, 11, 24, 11, tzinfo=UTC)),  # no offset: UTC
        ('"2026-11-24T11:00:00.1234567Z"', None),
        ('"2026-11-24 11:00:00Z"', None),
        ('"2026-02-30T00:00:00Z"', None),
        ('"0001-01-01T00:00:00+01:00"', None),
        ('"2026-11-24T11:00:00+05:60"', None),
        ("1795521600", None),
        ('"1795521600"', None),
    ],
)
def test_only_strict_iso_timestamps_take_the_fast_path(stamp: str, fast: datetime | None) -> None:
    value = record(timestamp=stamp)
    decoded = decided(value)
    assert (decoded.timestamp if decoded else None) == fast
    assert_same_as_model(value)


def test_snake_case_extra_and_missing_keys_are_left_to_the_model() -> None:
    for value in (
        b'{"metric_key":"tokens","subjectType":"org","subjectId":"o"}',
        b'{"metricKey":"tokens","subjectType":"org","subjectId":"o","extra":1}',
        b'{"metricKey":"tokens","subjectType":"org"}',
        b'{"metricKey":"tokens","subjectType":"org","subjectId":""}',
        b'{"metricKey":"tokens","subjectType":"org","subjectId":"' + b"x" * 257 + b'"}',
    ):
        assert decode_message(value) is None
        assert_same_as_model(value)


def test_one_bad_record_in_a_batch_leaves_its_neighbours_on_the_fast_path() -> None:
    value = b'{"records":[' + record('"1"') + b"," + record('"NaN"') + b"," + record("7", metadata='{"a":1}') + b",5]}"
    decoded = decode_message(value)
    assert isinstance(decoded, DecodedBatch) and [r is not None for r in decoded.records] == [True, False, True, False]
    accepted, rejected = assert_same_as_model(value)
    assert [a.record_id for a in accepted] == ["@usage.recorded/2/7/0", "@usage.recorded/2/7/2"]
    assert [(r.index, r.reason) for r in rejected] == [
        (1, RejectReason.INVALID_RECORD),
        (3, RejectReason.INVALID_RECORD),
    ]


def test_metadata_is_stored_byte_for_byte_as_before_and_names_the_org() -> None:
    value = record(
        '"2"',
        metadata='{"orgId":"org-1","n":0.1234567890123456789,"big":' + str(10**40) + ',"e":"é"}',
        subject='"subjectType":"user","subjectId":"u"',
    )
    assert decided(value) is not None
    [accepted], [] = assert_same_as_model(value, IntakeRules())
    assert (accepted.metric_id, accepted.aggregation) == (TOKENS_ORG1.id, TOKENS_ORG1.aggregation_type)
    assert json.loads(accepted.metadata_json) == {
        "orgId": "org-1",
        "n": "0.1234567890123456789",
        "big": 10**40,
        "e": "é",
    }


def test_bytes_msgspec_skips_unchecked_are_still_invalid_json() -> None:
    """msgspec's Raw does not check UTF-8 nor stop where jiter's nesting limit does: the whole message is then
    refused as invalid JSON, as before."""
    # A duplicate key's first value is skipped by msgspec (the last one wins) and so is its invalid UTF-8.
    skipped = (
        b'{"quantity":"\xff1e3","subjectType":"org","subjectId":"o","quantity":1,"metadata":{},"metricKey":"tokens"}'
    )
    for value in (
        record(metadata='{"a":"@"}').replace(b"@", b"\xff"),
        skipped,
        b'{"records":[' + record(metadata=_nested(JITER_DEPTH)) + b"]}",
        record(metadata=_nested(JITER_DEPTH + 1)),
    ):
        accepted, [letter] = assert_same_as_model(value)
        assert accepted == [] and letter.reason is RejectReason.INVALID_JSON
    accepted, _ = assert_same_as_model(record(metadata=_nested(JITER_DEPTH - 3)), IntakeRules())
    assert len(accepted) == 1


def test_nesting_deeper_than_msgspec_recurses_is_the_models_to_refuse_not_a_crash() -> None:
    """msgspec raises RecursionError (not a DecodeError) on very deep input: found by the poison test, where it
    stopped the worker."""
    deep = "[" * 5000 + "]" * 5000
    for value in (
        deep.encode(),
        record(metadata='{"a":' + deep + "}"),
        b'{"records":[' + record() + b"," + record(metadata='{"a":' + deep + "}") + b"]}",
    ):
        assert decode_message(value) is None or isinstance(decode_message(value), DecodedBatch)
        accepted, rejected = assert_same_as_model(value)
        assert rejected and all(letter.reason is RejectReason.INVALID_JSON for letter in rejected)


def test_refusals_of_the_rules_are_worded_by_the_model() -> None:
    for value, reason in (
        (record(timestamp='"2026-10-01T00:00:00Z"'), RejectReason.TOO_LATE),
        (record(timestamp='"2026-11-24T12:06:00Z"'), RejectReason.FUTURE_TIMESTAMP),
        (record(metadata='{"k":"' + "y" * 200 + '"}'), RejectReason.TOO_LARGE),
        (b'{"records":[' + record().replace(b"tokens", b"nope") + b"]}", RejectReason.UNKNOWN_METRIC),
    ):
        assert decode_message(value) is not None
        [], [letter] = assert_same_as_model(value)
        assert letter.reason is reason
