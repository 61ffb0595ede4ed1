"""What a metric reads from a record's payload (issue 15), without I/O: paths, string forms, valueProperty, filters,
groupBy dimensions and UNIQUE_COUNT's distinct value, through `MeterReader` and through intake, where the typed fast
path (`read_message`) must give exactly what the model's path (`read_message_by_model`) gives."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import msgspec
import orjson
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from pydantic import ValidationError

from metering_pipeline.usage import meter
from metering_pipeline.usage.intake import (
    Intake,
    IntakeRules,
    Message,
    read_message,
    read_message_by_model,
)
from metering_pipeline.usage.meter import (
    MeterReader,
    Reading,
    UnreadableRecord,
    quantity_at,
    reads_payload,
    steps_of,
    string_form,
    value_at,
)
from metering_pipeline.usage.metrics import MetricCatalog
from metering_pipeline.usage.record_decoder import DecodedBatch, DecodedRecord, decode_message
from metering_pipeline.usage.routed_record import AcceptedRecord
from metering_schemas import AggregationType, DeadLetter, MetricDefinition, RejectReason

UTC = UTC
NOW = datetime(2026, 11, 24, 12, tzinfo=UTC)
MISSING = meter._MISSING  # what value_at returns where a path leads nowhere
DEFAULT_RULES = IntakeRules()  # read_both's default


def metric(metric_id: str, aggregation: str = "SUM", **wire: Any) -> MetricDefinition:
    """A definition as it arrives on the wire (camelCase: valueProperty, groupBy, filter)."""
    return MetricDefinition.model_validate(
        {"id": metric_id, "key": metric_id, "name": metric_id, "aggregationType": aggregation, **wire}
    )


def catalog(*definitions: MetricDefinition) -> MetricCatalog:
    return MetricCatalog({d.id: d for d in definitions})


def message(value: bytes, offset: int = 7) -> Message:
    return Message("usage.recorded", 2, offset, NOW, b"k", value)


def record(
    metric_key: str,
    metadata: dict[str, Any] | None = None,
    quantity: Any = None,
    record_id: str | None = "r",
    **extra: Any,
) -> dict[str, Any]:
    fields: dict[str, Any] = {"metricKey": metric_key, "subjectType": "org", "subjectId": "o"}
    if record_id is not None:
        fields["id"] = record_id
    if quantity is not None:
        fields["quantity"] = quantity
    if metadata is not None:
        fields["metadata"] = metadata
    return {**fields, **extra}


def number(text: str) -> str:
    """Marks a JSON number's exact text inside a document for `raw_json`."""
    return f"@@{text}@@"


def raw_json(document: Any) -> bytes:
    """JSON bytes where number("...") placeholders become JSON numbers written digit for digit."""
    text = json.dumps(document, ensure_ascii=False)
    return text.replace('"@@', "").replace('@@"', "").encode()


def read_both(
    value: bytes, definitions: MetricDefinition | tuple[MetricDefinition, ...], rules: IntakeRules = DEFAULT_RULES
) -> Intake:
    """`read_message`, after checking it agrees with `read_message_by_model` on the same bytes."""
    if isinstance(definitions, MetricDefinition):
        definitions = (definitions,)
    metrics = catalog(*definitions)
    fast = read_message(message(value), metrics, rules)
    model = read_message_by_model(message(value), metrics, rules)
    assert_same(fast, model)
    return fast


def accepted_view(record: AcceptedRecord) -> tuple:
    """Every field of an accepted record, the quantity by value (the paths may write the same Decimal differently)."""
    fields = msgspec.structs.asdict(record)
    quantity = Decimal(fields.pop("quantity"))
    return (*fields.values(), quantity)


def letter_view(letter: DeadLetter) -> bytes:
    return letter.to_json()


def assert_same(fast: Intake, model: Intake) -> None:
    assert fast.filtered == model.filtered
    assert [accepted_view(a) for a in fast.accepted] == [accepted_view(a) for a in model.accepted]
    assert [letter_view(r) for r in fast.rejected] == [letter_view(r) for r in model.rejected]


def only_accepted(intake: Intake) -> AcceptedRecord:
    assert intake.rejected == [] and intake.filtered == 0, (intake.rejected, intake.filtered)
    [accepted] = intake.accepted
    return accepted


def only_rejected(intake: Intake) -> DeadLetter:
    assert intake.accepted == [] and intake.filtered == 0
    [letter] = intake.rejected
    return letter


# --- paths ---------------------------------------------------------------------------------------------------------


def test_paths_split_into_metadata_steps_and_quantity_has_none():
    assert steps_of("$.quantity") == ()
    assert steps_of("$.metadata.model") == ("model",)
    assert steps_of("$.metadata.a.b") == ("a", "b")
    assert steps_of("$.metadata.user-id") == ("user-id",)


def test_the_quantity_path_reads_the_records_quantity_as_an_exact_number():
    value = value_at((), "2.50", {"quantity": "not this"})
    assert isinstance(value, Decimal) and str(value) == "2.50"


def test_a_nested_metadata_path_reads_the_value_it_leads_to():
    metadata = {"a": {"b": Decimal("1.5"), "c": {"d": "deep"}}, "b": "top"}
    assert value_at(("a", "b"), "1", metadata) == Decimal("1.5")
    assert value_at(("a", "c", "d"), "1", metadata) == "deep"
    assert value_at(("b",), "1", metadata) == "top"
    assert value_at(("a",), "1", metadata) == metadata["a"]


@pytest.mark.parametrize(
    ("steps", "metadata"),
    [
        (("a",), {}),
        (("a", "b"), {"a": {}}),
        (("a", "b"), {"b": {"b": 1}}),
        (("a", "b"), {"a": "text"}),  # through a string
        (("a", "b"), {"a": 5}),  # through a number
        (("a", "0"), {"a": ["x"]}),  # through an array: arrays are not indexed
        (("a", "b"), {"a": None}),  # through null
        (("a", "b"), {"a": True}),
    ],
)
def test_a_path_that_is_missing_or_runs_through_a_non_object_is_missing(steps, metadata):
    assert value_at(steps, "1", metadata) is MISSING
    assert string_form(value_at(steps, "1", metadata), "$.metadata." + ".".join(steps)) == ""


def test_a_present_null_is_not_missing_but_has_the_same_string_form():
    assert value_at(("a",), "1", {"a": None}) is None
    assert string_form(None, "$.metadata.a") == ""


# --- string forms --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "form"),
    [
        ("abc", "abc"),
        ("", ""),
        (" spaced ", " spaced "),
        ("1.50", "1.50"),  # a string as is, never as a number
        ("é😀", "é😀"),
        (0, "0"),
        (42, "42"),
        (-7, "-7"),
        (10**25, "10000000000000000000000000"),
        (Decimal("1.50"), "1.50"),
        (Decimal("-0.5"), "-0.5"),
        (Decimal("0.123456789012345678"), "0.123456789012345678"),
        (True, "true"),
        (False, "false"),
        (None, ""),
        (MISSING, ""),
    ],
)
def test_the_string_form_of_a_scalar(value, form):
    assert string_form(value, "$.metadata.x") == form


@pytest.mark.parametrize("value", [{}, {"a": 1}, [], [1, 2], [{"a": 1}]])
def test_an_object_or_array_has_no_string_form_and_the_error_names_the_path(value):
    with pytest.raises(UnreadableRecord) as raised:
        string_form(value, "$.metadata.some.where")
    assert "$.metadata.some.where" in str(raised.value)
    assert ("object" if isinstance(value, dict) else "array") in str(raised.value)


def test_string_forms_of_json_numbers_keep_their_decimal_text_through_intake():
    definition = metric("m", groupBy={"n": "$.metadata.n"})
    for text, form in [
        ("1.50", "1.50"),
        ("12", "12"),
        ("-3", "-3"),
        ("0.123456789012345678", "0.123456789012345678"),
        ("12345678901234567890", "12345678901234567890"),
        ("100.0", "100.0"),
    ]:
        value = raw_json(record("m", {"n": number(text)}))
        assert only_accepted(read_both(value, definition)).dimensions == (("n", form),), text


def test_the_string_form_of_a_small_json_number_is_its_json_text():
    """Contract: "a number as its JSON text". 0.0000001 is written in plain notation by the producer; its string form
    (a dimension value, what a filter compares) should be that text, not Decimal's scientific `1E-7`."""
    definition = metric("m", groupBy={"rate": "$.metadata.rate"})
    value = raw_json(record("m", {"rate": number("0.0000001")}))
    assert only_accepted(read_both(value, definition)).dimensions == (("rate", "0.0000001"),)


# --- valueProperty -------------------------------------------------------------------------------------------------

TOKENS_BY_PROPERTY = metric("tokens", "SUM", valueProperty="$.metadata.usage.tokens")


@pytest.mark.parametrize(
    ("tokens", "quantity"),
    [
        (number("12"), "12"),
        (number("2.5"), "2.5"),
        (number("-4"), "-4"),
        (number("0"), "0"),
        ("12", "12"),  # a numeric string
        ("2.50", "2.50"),
        (number("0.123456789012345678"), "0.123456789012345678"),  # 18 decimals: every digit
        ("0.123456789012345678", "0.123456789012345678"),
        (number("12345678901234567890"), "12345678901234567890"),  # 20 digits: beyond a float, beyond 64 bits
        ("12345678901234567890", "12345678901234567890"),
        (number("99999999999999999999.999999999999999999"), "99999999999999999999.999999999999999999"),  # 38 digits
    ],
)
def test_value_property_reads_a_json_number_or_numeric_string_exactly(tokens, quantity):
    value = raw_json(record("tokens", {"usage": {"tokens": tokens}}, quantity=5))  # the record's own 5 is not it
    accepted = only_accepted(read_both(value, TOKENS_BY_PROPERTY))
    assert Decimal(accepted.quantity) == Decimal(quantity)
    assert accepted.quantity == quantity  # the exact text: no float, no rounding, no lost zeros


@pytest.mark.parametrize(
    ("metadata", "problem"),
    [
        ({}, "missing"),
        ({"usage": {}}, "missing"),
        ({"usage": "12"}, "missing"),  # through a string
        ({"usage": {"tokens": None}}, "missing"),
        ({"usage": {"tokens": "abc"}}, "not a valid quantity"),
        ({"usage": {"tokens": ""}}, "not a valid quantity"),
        ({"usage": {"tokens": "NaN"}}, "not a valid quantity"),
        ({"usage": {"tokens": "Infinity"}}, "not a valid quantity"),
        ({"usage": {"tokens": True}}, "not a number"),  # a bool is not a number
        ({"usage": {"tokens": False}}, "not a number"),
        ({"usage": {"tokens": {"n": 1}}}, "not a number"),
        ({"usage": {"tokens": [1]}}, "not a number"),
        ({"usage": {"tokens": number("0.1234567890123456789")}}, "not a valid quantity"),  # 19 decimals
        ({"usage": {"tokens": "0.1234567890123456789"}}, "not a valid quantity"),
        ({"usage": {"tokens": number("9" * 39)}}, "not a valid quantity"),  # 39 digits
    ],
)
def test_value_property_missing_or_not_a_number_is_dead_lettered_invalid_record_naming_the_path(metadata, problem):
    value = raw_json(record("tokens", metadata, quantity=5))
    letter = only_rejected(read_both(value, TOKENS_BY_PROPERTY))
    assert letter.reason is RejectReason.INVALID_RECORD
    assert "$.metadata.usage.tokens" in letter.message and problem in letter.message
    assert letter.record["id"] == "r"  # the record travels with its dead letter


def test_value_property_in_a_batch_dead_letters_only_the_record_that_lacks_it():
    batch = {
        "records": [
            record("tokens", {"usage": {"tokens": 3}}, record_id="a"),
            record("tokens", {"usage": {}}, record_id="b"),
            record("tokens", {"usage": {"tokens": "4.25"}}, record_id="c"),
        ]
    }
    intake = read_both(orjson.dumps(batch), TOKENS_BY_PROPERTY)
    assert [(a.record_id, a.quantity) for a in intake.accepted] == [("a", "3"), ("c", "4.25")]
    [letter] = intake.rejected
    assert (letter.reason, letter.index) == (RejectReason.INVALID_RECORD, 1)
    assert "$.metadata.usage.tokens" in letter.message and intake.filtered == 0


@pytest.mark.parametrize("aggregation", ["SUM", "AVG", "MAX", "MIN", "LATEST"])
def test_every_aggregation_that_reads_a_quantity_reads_it_at_value_property(aggregation):
    definition = metric("m", aggregation, valueProperty="$.metadata.v")
    accepted = only_accepted(read_both(orjson.dumps(record("m", {"v": "7.5"}, quantity=1)), definition))
    assert (accepted.quantity, accepted.aggregation) == ("7.5", AggregationType(aggregation))


def test_value_property_at_quantity_is_the_records_own_quantity():
    definition = metric("m", "SUM", valueProperty="$.quantity")
    assert not reads_payload(definition)
    accepted = only_accepted(read_both(orjson.dumps(record("m", {"v": 9}, quantity="2.5")), definition))
    assert accepted.quantity == "2.5"


def test_count_ignores_value_property_even_when_the_path_is_missing():
    plain = metric("c", "COUNT", valueProperty="$.metadata.absent")
    grouped = metric("g", "COUNT", valueProperty="$.metadata.absent", groupBy={"k": "$.metadata.k"})
    assert not reads_payload(plain) and reads_payload(grouped)
    assert only_accepted(read_both(orjson.dumps(record("c", {}, quantity=3)), plain)).quantity == "3"
    accepted = only_accepted(read_both(orjson.dumps(record("g", {"k": "x"}, quantity=3)), grouped))
    assert (accepted.quantity, accepted.dimensions) == ("3", (("k", "x"),))


def test_quantity_at_refuses_what_the_record_models_quantity_refuses():
    steps = ("v",)
    assert quantity_at(steps, "$.metadata.v", "1", {"v": Decimal("0.000000000000000001")}) in (
        "0.000000000000000001",
        "1E-18",
    )
    with pytest.raises(UnreadableRecord, match=r"\$\.metadata\.v"):
        quantity_at(steps, "$.metadata.v", "1", {"v": Decimal("0.0000000000000000001")})
    with pytest.raises(UnreadableRecord, match=r"\$\.metadata\.v \(valueProperty\) is not a number"):
        quantity_at(steps, "$.metadata.v", "1", {"v": True})
    with pytest.raises(UnreadableRecord, match=r"\$\.metadata\.v \(valueProperty\) is missing"):
        quantity_at(steps, "$.metadata.v", "1", {})
    assert quantity_at((), "$.quantity", "3.25", {}) == "3.25"


# --- filter --------------------------------------------------------------------------------------------------------

PREMIUM_EU = metric("calls", "SUM", filter={"$.metadata.tier": ["premium", "gold"], "$.metadata.geo.region": ["eu"]})


@pytest.mark.parametrize(
    ("metadata", "counts"),
    [
        ({"tier": "premium", "geo": {"region": "eu"}}, True),
        ({"tier": "gold", "geo": {"region": "eu"}, "other": 1}, True),
        ({"tier": "premium", "geo": {"region": "us"}}, False),  # one path of two does not match
        ({"tier": "basic", "geo": {"region": "eu"}}, False),
        ({"tier": "premium"}, False),  # missing is "", not listed
        ({"geo": {"region": "eu"}}, False),
        ({"tier": "Premium", "geo": {"region": "eu"}}, False),  # compared exactly
        ({"tier": " premium", "geo": {"region": "eu"}}, False),
        ({}, False),
    ],
)
def test_a_record_counts_only_when_every_filter_path_holds_a_listed_value(metadata, counts):
    intake = read_both(orjson.dumps(record("calls", metadata, quantity=2)), PREMIUM_EU)
    assert intake.rejected == []  # filtered or not, never dead-lettered
    if counts:
        assert [a.quantity for a in intake.accepted] == ["2"] and intake.filtered == 0
    else:
        assert intake.accepted == [] and intake.filtered == 1


def test_a_filtered_record_is_counted_as_filtered_in_a_batch_between_counted_and_dead_lettered_ones():
    batch = {
        "records": [
            record("calls", {"tier": "gold", "geo": {"region": "eu"}}, record_id="kept"),
            record("calls", {"tier": "basic", "geo": {"region": "eu"}}, record_id="out-1"),
            record("calls", {"tier": "gold", "geo": {"region": "eu"}}, quantity="x", record_id="bad"),
            record("calls", {"tier": "gold"}, record_id="out-2"),
            record("nope", {}, record_id="unknown"),
        ]
    }
    intake = read_both(orjson.dumps(batch), PREMIUM_EU)
    assert [a.record_id for a in intake.accepted] == ["kept"]
    assert [(r.index, r.reason) for r in intake.rejected] == [
        (2, RejectReason.INVALID_RECORD),
        (4, RejectReason.UNKNOWN_METRIC),
    ]
    assert intake.filtered == 2


def test_a_filter_can_list_the_empty_string_for_missing_and_null():
    definition = metric("m", filter={"$.metadata.team": [""]})
    assert only_accepted(read_both(orjson.dumps(record("m", {})), definition)).record_id == "r"
    assert only_accepted(read_both(orjson.dumps(record("m", {"team": None})), definition)).record_id == "r"
    assert read_both(orjson.dumps(record("m", {"team": "a"})), definition).filtered == 1


def test_filters_compare_string_forms_of_numbers_and_booleans():
    definition = metric("m", filter={"$.metadata.beta": ["true"], "$.metadata.version": ["2", "2.5"]})
    assert len(read_both(raw_json(record("m", {"beta": True, "version": number("2")})), definition).accepted) == 1
    assert len(read_both(raw_json(record("m", {"beta": True, "version": "2.5"})), definition).accepted) == 1
    assert len(read_both(raw_json(record("m", {"beta": True, "version": number("2.5")})), definition).accepted) == 1
    assert (
        read_both(raw_json(record("m", {"beta": "true", "version": 2})), definition).filtered == 0
    )  # "true" is "true"
    assert read_both(raw_json(record("m", {"beta": False, "version": 2})), definition).filtered == 1
    assert read_both(raw_json(record("m", {"beta": 1, "version": 2})), definition).filtered == 1  # 1 is not true
    assert read_both(raw_json(record("m", {"beta": True, "version": number("2.0")})), definition).filtered == 1


def test_a_filter_on_the_quantity_compares_the_quantitys_string_form():
    definition = metric("m", filter={"$.quantity": ["1", "2.5"]})
    assert only_accepted(read_both(orjson.dumps(record("m", {}, quantity=1)), definition)).quantity == "1"
    assert only_accepted(read_both(orjson.dumps(record("m", {}, quantity="2.5")), definition)).quantity == "2.5"
    assert only_accepted(read_both(orjson.dumps(record("m", {})), definition)).quantity == "1"  # the default quantity
    for quantity in (3, "3", "2.50"):
        assert read_both(orjson.dumps(record("m", {}, quantity=quantity)), definition).filtered == 1


def test_a_filter_leaves_a_record_out_before_anything_else_is_read_from_it():
    """A record the filter leaves out is not dead-lettered for what the metric would have read."""
    definition = metric(
        "m", "SUM", valueProperty="$.metadata.v", groupBy={"k": "$.metadata.k"}, filter={"$.metadata.kind": ["api"]}
    )
    intake = read_both(orjson.dumps(record("m", {"kind": "web", "k": {"not": "scalar"}})), definition)
    assert (intake.accepted, intake.rejected, intake.filtered) == ([], [], 1)
    letter = only_rejected(read_both(orjson.dumps(record("m", {"kind": "api", "k": "x"})), definition))
    assert "$.metadata.v" in letter.message  # a matching record must have its value


def test_a_filter_applies_to_its_metric_only():
    filtered = metric("a", filter={"$.metadata.t": ["x"]})
    other = metric("b")
    batch = {"records": [record("a", {"t": "y"}, record_id="1"), record("b", {"t": "y"}, record_id="2")]}
    intake = read_both(orjson.dumps(batch), (filtered, other))
    assert [a.record_id for a in intake.accepted] == ["2"] and intake.filtered == 1


# --- groupBy -------------------------------------------------------------------------------------------------------


def test_group_by_dimensions_are_sorted_by_name_whatever_the_definitions_order():
    definition = metric(
        "m", groupBy={"zone": "$.metadata.zone", "model": "$.metadata.llm.model", "a_first": "$.metadata.a"}
    )
    accepted = only_accepted(
        read_both(orjson.dumps(record("m", {"zone": "eu-1", "llm": {"model": "gpt"}, "a": 7})), definition)
    )
    assert accepted.dimensions == (("a_first", "7"), ("model", "gpt"), ("zone", "eu-1"))


def test_a_missing_or_null_dimension_is_the_empty_string_and_every_name_is_present():
    definition = metric(
        "m", groupBy={"model": "$.metadata.model", "region": "$.metadata.region", "tier": "$.metadata.t.x"}
    )
    accepted = only_accepted(read_both(orjson.dumps(record("m", {"region": None, "t": "flat"})), definition))
    assert accepted.dimensions == (("model", ""), ("region", ""), ("tier", ""))


@pytest.mark.parametrize(
    ("value", "form"),
    [(True, "true"), (False, "false"), (number("3"), "3"), (number("2.50"), "2.50"), ("", ""), ("x y", "x y")],
)
def test_a_dimension_value_is_the_scalars_string_form(value, form):
    definition = metric("m", groupBy={"d": "$.metadata.d"})
    assert only_accepted(read_both(raw_json(record("m", {"d": value})), definition)).dimensions == (("d", form),)


@pytest.mark.parametrize("value", [{"a": 1}, {}, [1], []])
def test_a_dimension_holding_an_object_or_array_is_dead_lettered_naming_the_path(value):
    definition = metric("m", groupBy={"d": "$.metadata.deep.d"})
    letter = only_rejected(read_both(orjson.dumps(record("m", {"deep": {"d": value}})), definition))
    assert letter.reason is RejectReason.INVALID_RECORD and "$.metadata.deep.d" in letter.message


def test_a_metric_without_group_by_has_the_total_row_only():
    accepted = only_accepted(read_both(orjson.dumps(record("m", {"model": "a"})), metric("m")))
    assert accepted.dimensions == () and accepted.distinct is None


# --- UNIQUE_COUNT --------------------------------------------------------------------------------------------------

USERS = metric("active_users", "UNIQUE_COUNT", valueProperty="$.metadata.user.id")


@pytest.mark.parametrize(
    ("value", "distinct"),
    [("u1", "u1"), ("", ""), (number("42"), "42"), (number("4.20"), "4.20"), (True, "true"), ("42", "42")],
)
def test_unique_count_reads_the_string_form_of_its_value_and_keeps_the_records_quantity(value, distinct):
    accepted = only_accepted(read_both(raw_json(record("active_users", {"user": {"id": value}}, quantity="3")), USERS))
    assert (accepted.distinct, accepted.quantity, accepted.aggregation) == (distinct, "3", AggregationType.UNIQUE_COUNT)


@pytest.mark.parametrize(
    ("metadata", "problem"),
    [
        ({}, "missing"),
        ({"user": {"id": None}}, "missing"),
        ({"user": {"id": {"a": 1}}}, "object"),
        ({"user": {"id": [1]}}, "array"),
    ],
)
def test_unique_count_without_a_readable_value_is_dead_lettered_naming_the_path(metadata, problem):
    letter = only_rejected(read_both(orjson.dumps(record("active_users", metadata)), USERS))
    assert letter.reason is RejectReason.INVALID_RECORD
    assert "$.metadata.user.id" in letter.message and problem in letter.message


def test_unique_count_over_the_quantity_counts_its_string_form():
    definition = metric("u", "UNIQUE_COUNT", valueProperty="$.quantity")
    accepted = only_accepted(read_both(orjson.dumps(record("u", {}, quantity="2.50")), definition))
    assert (accepted.distinct, accepted.quantity) == ("2.50", "2.50")


def test_a_grouped_filtered_unique_count_reads_everything_at_once():
    definition = metric(
        "u",
        "UNIQUE_COUNT",
        valueProperty="$.metadata.user",
        groupBy={"plan": "$.metadata.plan"},
        filter={"$.metadata.kind": ["login"]},
    )
    reader = MeterReader(definition)
    assert reader.read("1", {"kind": "login", "user": "u1", "plan": "pro"}) == Reading("1", (("plan", "pro"),), "u1")
    assert reader.read("1", {"kind": "logout", "user": "u1", "plan": "pro"}) is None
    accepted = only_accepted(
        read_both(orjson.dumps(record("u", {"kind": "login", "user": "u1", "plan": "pro"})), definition)
    )
    assert (accepted.dimensions, accepted.distinct) == ((("plan", "pro"),), "u1")


# --- the fast path and the model's path agree ----------------------------------------------------------------------

GROUPED = metric(
    "grouped",
    "SUM",
    valueProperty="$.metadata.tokens",
    groupBy={"model": "$.metadata.model", "region": "$.metadata.geo.region"},
)
FILTERED = metric("filtered", "COUNT", filter={"$.metadata.model": ["a", "b"], "$.quantity": ["1", "2"]})
UNIQUE = metric("unique", "UNIQUE_COUNT", valueProperty="$.metadata.user", groupBy={"model": "$.metadata.model"})
LATEST = metric("latest", "LATEST", valueProperty="$.metadata.tokens", filter={"$.metadata.flag": ["true", ""]})
PLAIN = metric("plain", "MAX")
ALL = (GROUPED, FILTERED, UNIQUE, LATEST, PLAIN)

SCALARS = st.one_of(
    st.sampled_from(["a", "b", "c", "", "1", "2", "true", "u1", "u2", "é", "12.5"]),
    st.integers(-3, 3),
    st.sampled_from([10**20, 12345678901234567890]),
    st.sampled_from(
        [
            Decimal("1.50"),
            Decimal("2.0"),
            Decimal("0.123456789012345678"),
            Decimal("0.1234567890123456789"),
            Decimal("-0.5"),
            Decimal("100"),
        ]
    ),
    st.booleans(),
    st.none(),
)
VALUES = st.one_of(SCALARS, SCALARS, SCALARS, st.just({"x": 1}), st.just([1, 2]), st.just({}))


def _metadata_strategy() -> st.SearchStrategy[dict[str, Any]]:
    def build(model, tokens, user, region, flag, geo_kind, drop):
        metadata: dict[str, Any] = {"model": model, "tokens": tokens, "user": user, "flag": flag}
        if geo_kind == "object":
            metadata["geo"] = {"region": region}
        elif geo_kind == "scalar":
            metadata["geo"] = "flat"
        for name in drop:
            metadata.pop(name, None)
        return metadata

    return st.builds(
        build,
        VALUES,
        VALUES,
        VALUES,
        VALUES,
        VALUES,
        st.sampled_from(["object", "scalar", "none"]),
        st.sets(st.sampled_from(["model", "tokens", "user", "flag"])),
    )


# Quantities both paths write the same way. Small fractions (below 1E-6) are written differently by the two
# paths; `test_the_quantitys_string_form_does_not_depend_on_which_path_read_the_record` pins that case.
QUANTITY_TEXTS = st.sampled_from(
    [
        None,
        "1",
        "2",
        "2.5",
        "-1",
        "0",
        '"1"',
        '"2"',
        '"2.50"',
        '"abc"',
        "1.0",
        "1e2",
        "12345678901234567890",
        '"0.123456789012345678"',
        "true",
    ]
)


def _numbers(value: Any) -> Any:
    """Decimals as number() placeholders, so they are written as JSON numbers digit for digit."""
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    return number(str(value)) if isinstance(value, Decimal) else value


def _record_text(metric_key: str, metadata: dict[str, Any], quantity: str | None, record_id: str | None) -> str:
    parts = [f'"metricKey":"{metric_key}"', '"subjectType":"org"', '"subjectId":"o"']
    if record_id is not None:
        parts.insert(0, f'"id":"{record_id}"')
    if quantity is not None:
        parts.append(f'"quantity":{quantity}')
    parts.append('"metadata":' + raw_json(_numbers(metadata)).decode())
    return "{" + ",".join(parts) + "}"


RECORDS = st.builds(
    _record_text,
    st.sampled_from([d.key for d in ALL]),
    _metadata_strategy(),
    QUANTITY_TEXTS,
    st.one_of(st.none(), st.sampled_from(["r1", "r2"])),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(RECORDS)
def test_both_paths_agree_on_single_record_messages(text):
    value = text.encode()
    read_both(value, ALL)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(RECORDS, min_size=1, max_size=6))
def test_both_paths_agree_on_batch_messages(texts):
    value = ('{"records":[' + ",".join(texts) + "]}").encode()
    intake = read_both(value, ALL)
    assert len(intake.accepted) + len(intake.rejected) + intake.filtered == len(texts)


@pytest.mark.parametrize(
    "document",
    [
        record("grouped", {"model": "a", "tokens": "12.5", "geo": {"region": "eu"}}),
        record("grouped", {"model": 7, "tokens": 3}),
        record("grouped", {"model": "a"}),  # its value is missing
        record("grouped", {"model": {"x": 1}, "tokens": 1}),
        record("filtered", {"model": "a"}, quantity=2),
        record("filtered", {"model": "a"}, quantity=3),
        record("filtered", {"model": "c"}, quantity=1),
        record("unique", {"user": "u1", "model": "b"}),
        record("unique", {"user": 5}),
        record("unique", {"model": "b"}),
        record("latest", {"tokens": 9, "flag": True}),
        record("latest", {"tokens": 9, "flag": False}),
        record("latest", {"tokens": 9}),
        record("latest", {"flag": True}),
    ],
)
def test_canonical_records_take_the_fast_path_and_agree_with_the_model_alone_and_in_a_batch(document):
    single = orjson.dumps(document)
    assert isinstance(decode_message(single), DecodedRecord)  # the fast path decides it, not the model
    one = read_both(single, ALL)
    assert len(one.accepted) + len(one.rejected) + one.filtered == 1
    batch = orjson.dumps({"records": [document, record("plain", {}, record_id="p"), document]})
    decoded = decode_message(batch)
    assert isinstance(decoded, DecodedBatch) and all(r is not None for r in decoded.records)
    many = read_both(batch, ALL)
    assert many.filtered == 2 * one.filtered
    assert [a.record_id for a in many.accepted].count("p") == 1


def test_the_quantitys_string_form_does_not_depend_on_which_path_read_the_record():
    """A filter on `$.quantity` and a UNIQUE_COUNT over `$.quantity` compare the quantity's string form; the same
    record must match (and count the same distinct value) whichever path reads it. 0.0000001 and "0.0000001" take
    the fast path, which keeps the text, while the model's path writes str(Decimal): "1E-7"."""
    filtered = metric("f", filter={"$.quantity": ["0.0000001"]})
    unique = metric("u", "UNIQUE_COUNT", valueProperty="$.quantity")
    for quantity in (number("0.0000001"), "0.0000001"):
        read_both(raw_json(record("f", {}, quantity=quantity)), filtered)
        read_both(raw_json(record("u", {}, quantity=quantity)), unique)


# --- MeterReader and the catalog -----------------------------------------------------------------------------------


def test_only_metrics_that_read_the_payload_get_a_reader_and_a_replaced_definition_drops_it():
    assert not reads_payload(metric("m"))
    assert not reads_payload(metric("m", "LATEST"))  # LATEST of the record's own quantity
    assert reads_payload(metric("m", "LATEST", valueProperty="$.metadata.v"))
    assert reads_payload(metric("m", groupBy={"a": "$.metadata.a"}))
    assert reads_payload(metric("m", filter={"$.quantity": ["1"]}))
    assert reads_payload(metric("m", "UNIQUE_COUNT", valueProperty="$.quantity"))
    metrics = catalog(metric("m", groupBy={"a": "$.metadata.a"}), metric("p"))
    assert set(metrics.readers) == {"m"}
    metrics.put(metric("m"))  # no longer grouped
    assert metrics.readers == {}
    metrics.put(metric("p", filter={"$.metadata.x": ["1"]}))
    assert set(metrics.readers) == {"p"}
    accepted = read_message(message(orjson.dumps(record("m", {"a": "x"}))), metrics, IntakeRules()).accepted
    assert accepted[0].dimensions == ()  # the definition in force when the record is read
    metrics.delete("p")
    assert metrics.readers == {}


def test_a_definition_change_applies_to_records_read_after_it():
    metrics = catalog(metric("m"))
    value = orjson.dumps(record("m", {"model": "a"}))
    assert read_message(message(value), metrics, IntakeRules()).accepted[0].dimensions == ()
    metrics.put(metric("m", groupBy={"model": "$.metadata.model"}))
    assert read_message(message(value), metrics, IntakeRules()).accepted[0].dimensions == (("model", "a"),)
    metrics.put(metric("m", filter={"$.metadata.model": ["b"]}))
    assert read_message(message(value), metrics, IntakeRules()).filtered == 1


# --- MetricDefinition validation -----------------------------------------------------------------------------------


def test_unique_count_without_value_property_is_refused():
    with pytest.raises(ValidationError, match="UNIQUE_COUNT needs valueProperty"):
        metric("u", "UNIQUE_COUNT")
    assert metric("u", "UNIQUE_COUNT", valueProperty="$.metadata.user").value_property == "$.metadata.user"
    assert metric("u", "UNIQUE_COUNT", valueProperty="$.quantity").value_property == "$.quantity"


def test_at_most_ten_group_by_dimensions():
    ten = {f"d{n}": f"$.metadata.d{n}" for n in range(10)}
    assert len(metric("m", groupBy=ten).group_by) == 10
    with pytest.raises(ValidationError):
        metric("m", groupBy={**ten, "d10": "$.metadata.d10"})


@pytest.mark.parametrize("path", ["$.quantity", "$.metadata", "$.id", "$.subjectId", "metadata.a", "$metadata.a"])
def test_a_group_by_path_must_be_under_metadata(path):
    with pytest.raises(ValidationError):
        metric("m", groupBy={"d": path})


@pytest.mark.parametrize(
    "path",
    [
        "$.metadata",
        "$.metadata.",
        "$.metadata..a",
        "$.metadata.a..b",
        "$.metadata.a.",
        "$.metadata.a b",
        "$.metadata.a\tb",
        "$.quantity.x",
        "$.Quantity",
        "$.metadata.a\n",
        "$metadata.a",
        "metadata.a",
        "$.meta.a",
        "",
        "$",
        "$.",
        "$.metadata." + "a" * 600,
    ],
)
@pytest.mark.parametrize("field", ["valueProperty", "groupBy", "filter"])
def test_bad_path_syntax_is_refused_everywhere_a_path_is_written(path, field):
    wire = {"valueProperty": path, "groupBy": {"d": path}, "filter": {path: ["x"]}}[field]
    with pytest.raises(ValidationError):
        metric("m", **{field: wire})


@pytest.mark.parametrize(
    "path", ["$.quantity", "$.metadata.a", "$.metadata.a.b.c", "$.metadata.user-id", "$.metadata.é", "$.metadata.a:b"]
)
def test_good_paths_are_accepted_for_value_property_and_filter(path):
    definition = metric("m", valueProperty=path, filter={path: ["x"]})
    assert definition.value_property == path and definition.filter == {path: ["x"]}


def test_an_empty_filter_value_list_is_refused():
    with pytest.raises(ValidationError, match="at least one value"):
        metric("m", filter={"$.metadata.a": []})
    with pytest.raises(ValidationError, match="at least one value"):
        metric("m", filter={"$.metadata.a": ["x"], "$.metadata.b": []})
    assert metric("m", filter={"$.metadata.a": [""]}).filter == {"$.metadata.a": [""]}


@pytest.mark.parametrize("name", ["", "a b", "a/b", "x" * 65])
def test_a_bad_dimension_name_is_refused(name):
    with pytest.raises(ValidationError):
        metric("m", groupBy={name: "$.metadata.a"})


def test_the_new_fields_are_camel_case_on_the_wire_and_default_to_nothing():
    definition = metric(
        "m", "LATEST", valueProperty="$.metadata.v", groupBy={"g": "$.metadata.g"}, filter={"$.metadata.f": ["1"]}
    )
    wire = json.loads(definition.to_json())
    assert (wire["valueProperty"], wire["groupBy"], wire["filter"], wire["aggregationType"]) == (
        "$.metadata.v",
        {"g": "$.metadata.g"},
        {"$.metadata.f": ["1"]},
        "LATEST",
    )
    assert MetricDefinition.model_validate(wire) == definition
    plain = metric("p")
    assert (plain.value_property, plain.group_by, plain.filter) == (None, {}, {})
