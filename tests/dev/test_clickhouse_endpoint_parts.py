"""The dev ClickHouse endpoint's parts, each read and tested alone: SQL scanning, HTTP compression,
query request assembly and authentication.

tests/integration/test_clickhouse_endpoint.py drives the whole endpoint over real HTTP with chdb
behind it; these tests pin down the pure logic of `sql`, `compression`, `query_request` and `auth`
without an engine, a socket or a subprocess, so a regression names the module that broke and the
corner cases (comments, literals, frames, precedence) are cheap to cover.
"""

from __future__ import annotations

import base64
import gzip
import uuid
import zlib
from collections.abc import Callable

import lz4.frame
import pytest
import zstandard

from metering_dev.clickhouse_endpoint import errors
from metering_dev.clickhouse_endpoint.auth import Authenticator
from metering_dev.clickhouse_endpoint.compression import (
    choose_response_encoding,
    decode_request_body,
    encode_response_body,
)
from metering_dev.clickhouse_endpoint.errors import ClickHouseError
from metering_dev.clickhouse_endpoint.query_request import (
    DEFAULT_SESSION_TIMEOUT_S,
    MAX_SESSION_TIMEOUT_S,
    build_query_request,
    parse_multipart,
    parse_url_params,
)
from metering_dev.clickhouse_endpoint.sql import Statement, analyze, tokens

SETTING_NAMES = frozenset({"max_threads", "session_timezone", "readonly"})
PAYLOAD = b"tenant,subject,quantity\n" + b"acme,api-calls,0.000000000000000001\n" * 64


def refused(call: Callable[[], object]) -> ClickHouseError:
    with pytest.raises(ClickHouseError) as raised:
        call()
    return raised.value


def basic(credentials: str) -> str:
    return "Basic " + base64.b64encode(credentials.encode()).decode()


# ----------------------------------------------------------------------------- sql


def test_tokens_skip_comments_keep_literals_whole_and_track_bracket_depth() -> None:
    sql = b"SELECT f('it''s', [$t$a)$t$]) -- c\n/* d */ FROM `t``x`"
    assert [(token.kind, token.text, token.depth) for token in tokens(sql)] == [
        ("word", b"SELECT", 0),
        ("word", b"f", 0),
        ("punct", b"(", 0),
        ("string", b"'it''s'", 1),  # a doubled quote stays inside the literal
        ("punct", b",", 1),
        ("punct", b"[", 1),
        ("string", b"$t$a)$t$", 2),  # a heredoc is a string; its bracket does not count
        ("punct", b"]", 1),
        ("punct", b")", 0),
        ("word", b"FROM", 0),
        ("quoted", b"`t``x`", 0),
    ]


@pytest.mark.parametrize(
    ("sql", "kind"),
    [
        (b"select 1", "SELECT"),
        (b"  /* lead */ -- note\n show tables", "SHOW"),
        (b"WITH 1 AS x SELECT x", "WITH"),
        (b"explain syntax SELECT 1", "EXPLAIN"),
        (b"Insert into t values (1)", "INSERT"),
    ],
)
def test_statement_kind_is_the_first_keyword_upper_cased_after_comments(sql: bytes, kind: str) -> None:
    statement = analyze(sql)
    assert (statement.kind, statement.output_format, statement.carries_data) == (kind, None, False)


@pytest.mark.parametrize(
    ("sql", "output_format"),
    [
        (b"SELECT 1 FORMAT JSONEachRow", "JSONEachRow"),
        (b"select 1 format csvWithNames", "csvWithNames"),  # the name is passed on as written
        (b"SELECT 1 FORMAT JSON SETTINGS max_threads = 1", "JSON"),  # only SETTINGS may follow FORMAT
        (b"SELECT 1 SETTINGS max_threads = 1 FORMAT TSV", "TSV"),
        (b"SELECT 1 FORMAT CSV;", "CSV"),
        (b"SELECT 1 --\nFORMAT Native", "Native"),  # a line comment ends at the newline
        (b"(SELECT 1) UNION ALL (SELECT 2) FORMAT Parquet", "Parquet"),
        (b'SELECT "FORMAT" AS `format` FORMAT CSV', "CSV"),
    ],
)
def test_trailing_format_clause_is_found(sql: bytes, output_format: str) -> None:
    statement = analyze(sql)
    assert (statement.output_format, statement.carries_data) == (output_format, False)


@pytest.mark.parametrize(
    "sql",
    [
        b"SELECT * FROM (SELECT 1 FORMAT JSON)",  # nested: not the query's own clause
        b"SELECT number AS format FROM numbers(2)",  # a column alias named format
        b"SELECT 1 FORMAT JSON garbage",  # something other than SETTINGS after the name
        b"SELECT 1 FORMAT",
        b"SELECT 1 -- FORMAT JSON",
        b"SELECT 1 # FORMAT JSON",
        b"SELECT 1 /* FORMAT JSON */",
        b"SELECT 1 /* outer /* inner */ FORMAT JSON */",
        b"SELECT 'x FORMAT JSON'",
        b"SELECT $$x FORMAT JSON$$",
        b"SELECT 1 AS `FORMAT JSON`",
    ],
)
def test_format_that_is_not_the_trailing_top_level_clause_is_ignored(sql: bytes) -> None:
    assert analyze(sql).output_format is None


@pytest.mark.parametrize(
    "sql",
    [
        b"SELECT 'a;b' FORMAT CSV",
        b"SELECT 'it''s; doubled' FORMAT CSV",
        b"SELECT 'it\\'s; escaped' FORMAT CSV",
        b'SELECT "we;ird" FROM t FORMAT CSV',
        b"SELECT $tag$ ; $$ ; 'x $tag$ FORMAT CSV",  # a tagged heredoc ends only at its own tag
        b"SELECT 1 /* ; */ FORMAT CSV",
        b"SELECT 1 /* outer /* inner */ ; */ FORMAT CSV",  # block comments nest, as in ClickHouse's lexer
        b"SELECT 1 -- ;\nFORMAT CSV",
    ],
)
def test_semicolons_inside_literals_heredocs_and_comments_do_not_end_the_statement(sql: bytes) -> None:
    """The scanner resumes after each literal, so the FORMAT clause behind it is still found."""
    assert analyze(sql) == Statement("SELECT", output_format="CSV")


@pytest.mark.parametrize("sql", [b"SELECT 1; SELECT 2", b"SELECT 1;\nDROP TABLE t", b"SELECT 'a;'; SELECT ';'"])
def test_multi_statements_are_refused_with_syntax_error_like_clickhouse(sql: bytes) -> None:
    error = refused(lambda: analyze(sql))
    assert (error.code, error.message, error.http_status) == (62, "Multi-statements are not allowed", 400)


@pytest.mark.parametrize("sql", [b"SELECT 1;", b"SELECT 1;; ;", b"SELECT 1; -- done", b"SELECT 1;\n/* bye */\n"])
def test_trailing_semicolons_and_comments_are_one_statement(sql: bytes) -> None:
    assert analyze(sql) == Statement("SELECT")


@pytest.mark.parametrize("sql", [b"", b"  \n\t", b"-- only a comment\n/* and another */"])
def test_empty_query_is_a_syntax_error_like_clickhouse(sql: bytes) -> None:
    error = refused(lambda: analyze(sql))
    assert (error.code, error.message, error.http_status) == (62, "Empty query", 400)


@pytest.mark.parametrize(
    ("sql", "head", "insert_format", "data"),
    [
        (b"INSERT INTO t FORMAT CSV\n1,2\n", b"INSERT INTO t ", "CSV", b"1,2\n"),
        (b'insert into t (a, b) format JSONEachRow {"a":1}', b"insert into t (a, b) ", "JSONEachRow", b'{"a":1}'),
        (b"INSERT INTO t FORMAT TSV \t\r\n  x\ty", b"INSERT INTO t ", "TSV", b"  x\ty"),
        (b"INSERT INTO t FORMAT TSV\n\nx", b"INSERT INTO t ", "TSV", b"\nx"),
        (
            b"/* c */ INSERT INTO t SETTINGS async_insert = 0 FORMAT CSV\n1",
            b"/* c */ INSERT INTO t SETTINGS async_insert = 0 ",
            "CSV",
            b"1",
        ),
        (b"INSERT INTO format FORMAT CSV\n1", b"INSERT INTO format ", "CSV", b"1"),  # a table named format
        (b"INSERT INTO db.format FORMAT CSV\n1", b"INSERT INTO db.format ", "CSV", b"1"),
        (
            b"INSERT INTO TABLE format (format, values) FORMAT CSV\n1,2",
            b"INSERT INTO TABLE format (format, values) ",
            "CSV",
            b"1,2",
        ),  # keywords inside the column list are only names
    ],
)
def test_inline_insert_data_starts_after_the_first_newline_else_after_blanks_like_clickhouse(
    sql: bytes, head: bytes, insert_format: str, data: bytes
) -> None:
    """ParserInsertQuery's rule: skip blanks after the format name, then at most one (CR)LF."""
    statement = analyze(sql)
    assert (statement.kind, statement.insert_format, statement.insert_head) == ("INSERT", insert_format, head)
    assert statement.carries_data and statement.output_format is None
    assert sql[statement.data_offset :] == data


@pytest.mark.parametrize(
    "sql",
    [
        b"INSERT INTO t VALUES (1), (2)",
        b"INSERT INTO t (a) SELECT 1",
        b"INSERT INTO t WITH 1 AS x SELECT x",
        b"INSERT INTO t FORMAT",  # no name: left to the engine to report the syntax error
        b"INSERT INTO t FORMAT 'CSV'",
    ],
)
def test_insert_without_format_data_is_handed_to_the_engine_as_plain_sql(sql: bytes) -> None:
    assert analyze(sql) == Statement("INSERT")


# --------------------------------------------------------------------- compression

REQUEST_ENCODERS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": gzip.compress,
    "x-gzip": gzip.compress,
    "deflate": zlib.compress,  # HTTP deflate is the zlib format, as ClickHouse reads it
    "lz4": lz4.frame.compress,
    "zstd": zstandard.ZstdCompressor().compress,
}
RESPONSE_DECODERS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": gzip.decompress,
    "deflate": zlib.decompress,
    "lz4": lz4.frame.decompress,
    "zstd": zstandard.ZstdDecompressor().decompress,
}


@pytest.mark.parametrize("encoding", sorted(REQUEST_ENCODERS))
def test_request_body_is_decoded_for_each_supported_encoding(encoding: str) -> None:
    assert decode_request_body(REQUEST_ENCODERS[encoding](PAYLOAD), encoding) == PAYLOAD


@pytest.mark.parametrize("encoding", sorted(REQUEST_ENCODERS))
def test_blocks_compressed_as_separate_frames_are_all_decoded(encoding: str) -> None:
    """clickhouse-connect compresses each insert block as its own frame and concatenates them."""
    compress = REQUEST_ENCODERS[encoding]
    body = compress(b"first block\n") + compress(b"second block\n") + compress(b"third\n")
    assert decode_request_body(body, encoding) == b"first block\nsecond block\nthird\n"


def test_zstd_stream_without_a_content_size_is_decoded() -> None:
    compressor = zstandard.ZstdCompressor().compressobj()
    streamed = compressor.compress(PAYLOAD) + compressor.flush()
    assert decode_request_body(streamed, "zstd") == PAYLOAD


@pytest.mark.parametrize(
    ("content_encoding", "body", "expected"),
    [
        (None, b"SELECT 1", b"SELECT 1"),
        ("", b"SELECT 1", b"SELECT 1"),
        (" Identity ", b"SELECT 1", b"SELECT 1"),
        (" GZIP ", gzip.compress(b"SELECT 2"), b"SELECT 2"),
        ("Zstd", zstandard.ZstdCompressor().compress(b"SELECT 3"), b"SELECT 3"),
    ],
)
def test_content_encoding_is_matched_ignoring_case_and_spaces(
    content_encoding: str | None, body: bytes, expected: bytes
) -> None:
    assert decode_request_body(body, content_encoding) == expected


@pytest.mark.parametrize("encoding", ["br", "xz", "snappy", "compress"])
def test_unknown_content_encoding_is_refused_as_not_implemented(encoding: str) -> None:
    error = refused(lambda: decode_request_body(b"whatever", encoding.upper()))
    assert (error.code, error.http_status) == (errors.NOT_IMPLEMENTED, 501)
    assert error.message == (
        f"Content-Encoding '{encoding}' is not supported by this endpoint; use gzip, deflate, lz4 or zstd"
    )


@pytest.mark.parametrize("encoding", sorted(REQUEST_ENCODERS))
def test_corrupt_body_is_refused_with_cannot_decompress(encoding: str) -> None:
    error = refused(lambda: decode_request_body(b"SELECT 1 -- not compressed at all", encoding))
    assert (error.code, error.http_status) == (errors.CANNOT_DECOMPRESS, 500)
    assert error.message.startswith(f"Cannot decompress {encoding} request body: ")


@pytest.mark.parametrize("encoding", ["deflate", "lz4", "zstd"])
def test_truncated_frame_is_refused_with_cannot_decompress(encoding: str) -> None:
    body = REQUEST_ENCODERS[encoding](PAYLOAD)[:-4]
    error = refused(lambda: decode_request_body(body, encoding))
    assert (error.code, error.message) == (errors.CANNOT_DECOMPRESS, "Truncated compressed request body")


def test_truncated_gzip_is_refused_with_cannot_decompress() -> None:
    error = refused(lambda: decode_request_body(gzip.compress(PAYLOAD)[:-4], "gzip"))
    assert error.code == errors.CANNOT_DECOMPRESS
    assert error.message.startswith("Cannot decompress gzip request body: Compressed file ended")


@pytest.mark.parametrize("encoding", sorted(RESPONSE_DECODERS))
def test_response_body_is_encoded_so_standard_decoders_read_it(encoding: str) -> None:
    encoded = encode_response_body(PAYLOAD, encoding)
    assert len(encoded) < len(PAYLOAD)
    assert RESPONSE_DECODERS[encoding](encoded) == PAYLOAD
    assert decode_request_body(encoded, encoding) == PAYLOAD


@pytest.mark.parametrize(
    ("accept_encoding", "chosen"),
    [
        (None, None),
        ("", None),
        ("gzip, deflate, br", "gzip"),
        ("br, zstd, gzip", "zstd"),  # the first one listed that can be produced
        ("LZ4", "lz4"),
        (" Deflate ; q=0.5", "deflate"),
        ("gzip;q=0, lz4", "lz4"),  # q=0 means "not acceptable"
        ("gzip; q=0.0, deflate", "deflate"),
        ("zstd;q=0", None),
        ("identity", None),
        ("br", None),
    ],
)
def test_response_encoding_is_the_first_acceptable_one_listed(accept_encoding: str | None, chosen: str | None) -> None:
    assert choose_response_encoding(accept_encoding) == chosen


# ------------------------------------------------------------------- query_request


def test_url_params_keep_order_duplicates_and_blank_values() -> None:
    assert parse_url_params("query=SELECT+%7Bx%3AUInt8%7D&param_x=a%20b&empty=&query=2&flag") == [
        ("query", "SELECT {x:UInt8}"),
        ("param_x", "a b"),
        ("empty", ""),
        ("query", "2"),
        ("flag", ""),
    ]


def test_url_params_that_are_not_utf8_are_refused_with_bad_arguments() -> None:
    error = refused(lambda: parse_url_params("query=SELECT%20%FF"))
    assert (error.code, error.message, error.http_status) == (36, "URL parameters are not valid UTF-8", 400)


@pytest.mark.parametrize(
    ("url_query", "body", "sql"),
    [
        ("INSERT INTO t FORMAT CSV", b"1,2\n", b"INSERT INTO t FORMAT CSV\n1,2\n"),
        ("SELECT 1", b"", b"SELECT 1"),
        (None, b"SELECT 2", b"SELECT 2"),
        (None, b"", b""),
    ],
)
def test_url_query_and_body_are_joined_by_a_newline_like_clickhouse(
    url_query: str | None, body: bytes, sql: bytes
) -> None:
    params = [] if url_query is None else [("query", url_query)]
    assert build_query_request(params, body, SETTING_NAMES).sql == sql


def test_insert_data_posted_in_the_body_is_exactly_the_body_after_the_join() -> None:
    body = b"  leading blanks are data\n2,3\n"
    request = build_query_request([("query", "INSERT INTO t FORMAT CSV")], body, SETTING_NAMES)
    statement = analyze(request.sql)
    assert statement.insert_head == b"INSERT INTO t "
    assert request.sql[statement.data_offset :] == body


def test_params_are_sorted_into_bind_parameters_settings_and_transport_options() -> None:
    request = build_query_request(
        [
            ("query", "SELECT {id:UInt32}"),
            ("param_id", "7"),
            ("param_max_threads", "9"),  # a bind parameter, whatever its name
            ("max_threads", "2"),
            ("max_threads", "4"),  # the last value wins
            ("no_such_setting", "1"),  # neither: ignored
            ("database", "first"),
            ("database", "metering"),
            ("default_format", "JSONEachRow"),
            ("query_id", "q-1"),
            ("session_id", "s-1"),
            ("session_timezone", "UTC"),
        ],
        b"",
        SETTING_NAMES,
    )
    assert request.bind_params == {"id": "7", "max_threads": "9"}
    assert request.settings == {"max_threads": "4", "session_timezone": "UTC"}
    assert (request.database, request.default_format, request.query_id, request.session_id) == (
        "metering",
        "JSONEachRow",
        "q-1",
        "s-1",
    )


@pytest.mark.parametrize(
    "name",
    [
        "database",
        "default_format",
        "enable_http_compression",
        "send_progress_in_http_headers",
        "user",
        "password",
        "query_id",
        "session_timeout",
        "wait_end_of_query",
        "http_headers_progress_interval_ms",
    ],
)
def test_transport_options_never_become_engine_settings(name: str) -> None:
    """Even when the engine lists the name in system.settings, the HTTP handler consumes it."""
    request = build_query_request([(name, "1")], b"SELECT 1", SETTING_NAMES | {name})
    assert request.settings == {}


def test_blank_options_fall_back_to_defaults() -> None:
    request = build_query_request(
        [(name, "") for name in ("database", "default_format", "query_id", "session_id", "session_timeout")],
        b"SELECT 1",
        SETTING_NAMES,
    )
    assert (request.database, request.default_format, request.session_id) == (None, None, None)
    assert request.session_timeout_s == DEFAULT_SESSION_TIMEOUT_S == 60
    assert uuid.UUID(request.query_id).version == 4  # generated, as the server does
    assert (request.session_check, request.compress_response) == (False, False)


@pytest.mark.parametrize(("raw", "seconds"), [("0", 0), ("1", 1), ("60", 60), ("3600", 3600)])
def test_session_timeout_within_clickhouse_default_limits_is_accepted(raw: str, seconds: int) -> None:
    """ClickHouse's default_session_timeout is 60 s and max_session_timeout 3600 s."""
    request = build_query_request([("session_id", "s"), ("session_timeout", raw)], b"SELECT 1", SETTING_NAMES)
    assert (request.session_timeout_s, MAX_SESSION_TIMEOUT_S) == (seconds, 3600)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("3601", "Session timeout 3601 is out of range 0..3600"),
        ("-1", "Session timeout -1 is out of range 0..3600"),
        ("abc", "Invalid session timeout: 'abc'"),
        ("1.5", "Invalid session timeout: '1.5'"),
    ],
)
def test_bad_session_timeout_is_refused_with_invalid_session_timeout_like_clickhouse(raw: str, message: str) -> None:
    """Code 374 has no entry in ClickHouse's code -> HTTP status table, so it answers 500."""
    error = refused(lambda: build_query_request([("session_timeout", raw)], b"SELECT 1", SETTING_NAMES))
    assert (error.code, error.message, error.http_status) == (374, message, 500)


@pytest.mark.parametrize(
    ("value", "on"),
    [("1", True), ("true", True), ("YES", True), (" on ", True), ("0", False), ("false", False), ("2", False)],
)
def test_session_check_and_enable_http_compression_read_boolean_words(value: str, on: bool) -> None:
    request = build_query_request(
        [("session_check", value), ("enable_http_compression", value)], b"SELECT 1", SETTING_NAMES
    )
    assert (request.session_check, request.compress_response) == (on, on)


@pytest.mark.parametrize(("name", "value"), [("compress", "1"), ("decompress", "true")])
def test_clickhouse_native_block_compression_is_refused_as_not_implemented(name: str, value: str) -> None:
    error = refused(lambda: build_query_request([(name, value)], b"SELECT 1", SETTING_NAMES))
    assert (error.code, error.http_status) == (48, 501)
    assert error.message == "ClickHouse block compression (compress/decompress=1) is not supported"
    assert build_query_request([(name, "0")], b"SELECT 1", SETTING_NAMES).sql == b"SELECT 1"


def multipart(*parts: bytes) -> bytes:
    return b"".join(b"--XyZ\r\n" + part + b"\r\n" for part in parts) + b"--XyZ--\r\n"


def test_multipart_form_fields_become_parameters() -> None:
    body = multipart(
        b'Content-Disposition: form-data; name="query"\r\n\r\nSELECT {s:String} AS \xc3\xbc',
        b'Content-Disposition: form-data; name="param_s"\r\n\r\nacme',
        b'Content-Disposition: form-data; name="max_threads"\r\n\r\n2',
        b"Content-Disposition: form-data\r\n\r\nunnamed parts are skipped",
    )
    fields = parse_multipart("multipart/form-data; boundary=XyZ", body)
    assert fields == [("query", "SELECT {s:String} AS \u00fc"), ("param_s", "acme"), ("max_threads", "2")]
    request = build_query_request(fields, b"", SETTING_NAMES)
    assert (request.sql, request.bind_params, request.settings) == (
        "SELECT {s:String} AS \u00fc".encode(),
        {"s": "acme"},
        {"max_threads": "2"},
    )


@pytest.mark.parametrize("content_type", ["multipart/form-data", "multipart/form-data; boundary=Other"])
def test_multipart_body_without_its_boundary_is_refused_with_bad_arguments(content_type: str) -> None:
    body = multipart(b'Content-Disposition: form-data; name="query"\r\n\r\nSELECT 1')
    error = refused(lambda: parse_multipart(content_type, body))
    assert (error.code, error.message, error.http_status) == (36, "Malformed multipart/form-data body", 400)


def test_multipart_file_part_is_refused_as_unsupported_external_data() -> None:
    body = multipart(b'Content-Disposition: form-data; name="ext"; filename="ext.tsv"\r\n\r\n1\t2')
    error = refused(lambda: parse_multipart("multipart/form-data; boundary=XyZ", body))
    assert (error.code, error.message) == (48, "External data (multipart file tables) is not supported")


# ---------------------------------------------------------------------------- auth

SECURED = Authenticator(user="u", password="p")


@pytest.mark.parametrize(
    ("headers", "params", "user"),
    [
        ({}, {}, "default"),  # no credentials: the password-less default user, as on a server
        ({}, {"user": "alice", "password": "anything"}, "alice"),
        ({"authorization": basic("bob:whatever")}, {}, "bob"),
        ({"x-clickhouse-user": "carol"}, {}, "carol"),
    ],
)
def test_without_a_configured_user_anyone_is_accepted_under_their_own_name(
    headers: dict[str, str], params: dict[str, str], user: str
) -> None:
    assert Authenticator().check(headers, params) == user


@pytest.mark.parametrize(
    ("authenticator", "headers", "params"),
    [
        (SECURED, {"x-clickhouse-user": "u", "x-clickhouse-key": "p"}, {}),
        (SECURED, {"authorization": basic("u:p")}, {}),
        (SECURED, {"authorization": "basic " + base64.b64encode(b"u:p").decode()}, {}),  # scheme is case-insensitive
        (SECURED, {}, {"user": "u", "password": "p"}),
        (SECURED, {"x-clickhouse-user": "", "x-clickhouse-key": "", "authorization": basic("u:p")}, {}),
        (Authenticator(user="u", password="p:q:r"), {"authorization": basic("u:p:q:r")}, {}),
        (Authenticator(user="u"), {}, {"user": "u"}),  # a user configured without a password
    ],
)
def test_each_credential_source_authenticates_the_configured_user(
    authenticator: Authenticator, headers: dict[str, str], params: dict[str, str]
) -> None:
    """Empty X-ClickHouse headers count as absent, as in ClickHouse's authenticateUserByHTTP."""
    assert authenticator.check(headers, params) == "u"


@pytest.mark.parametrize(
    ("authenticator", "headers", "params", "user"),
    [
        (SECURED, {}, {}, "default"),
        (SECURED, {}, {"user": "u", "password": "wrong"}, "u"),
        (SECURED, {}, {"user": "intruder", "password": "p"}, "intruder"),
        (SECURED, {"authorization": basic("u:P")}, {}, "u"),
        (SECURED, {"x-clickhouse-user": "u", "x-clickhouse-key": "p "}, {}, "u"),
        (SECURED, {}, {"password": "p"}, "default"),
        (Authenticator(user="u"), {}, {"user": "u", "password": "x"}, "u"),
    ],
)
def test_wrong_credentials_are_refused_with_authentication_failed_like_clickhouse(
    authenticator: Authenticator, headers: dict[str, str], params: dict[str, str], user: str
) -> None:
    """ClickHouse's own answer: code 516, HTTP 403, one message for an unknown user and a wrong password."""
    error = refused(lambda: authenticator.check(headers, params))
    assert (error.code, error.http_status) == (516, 403)
    assert error.message == f"{user}: Authentication failed: password is incorrect, or there is no user with such name"
    assert (
        error.body("26.1.1")
        == (
            f"Code: 516. DB::Exception: {user}: Authentication failed: password is incorrect, "
            "or there is no user with such name. (AUTHENTICATION_FAILED) (version 26.1.1)\n"
        ).encode()
    )


@pytest.mark.parametrize("authenticator", [SECURED, Authenticator()], ids=["secured", "open"])
@pytest.mark.parametrize(
    ("headers", "params", "method"),
    [
        (
            {"x-clickhouse-user": "u", "x-clickhouse-key": "p", "authorization": basic("u:p")},
            {},
            "X-ClickHouse HTTP headers",
        ),
        ({"x-clickhouse-user": "u", "x-clickhouse-key": "p"}, {"user": "u"}, "X-ClickHouse HTTP headers"),
        ({"x-clickhouse-key": "p"}, {"password": ""}, "X-ClickHouse HTTP headers"),  # a present but empty param counts
        ({"authorization": basic("u:p")}, {"password": "p"}, "Authorization HTTP header"),
    ],
)
def test_mixing_credential_sources_is_refused_like_clickhouse(
    authenticator: Authenticator, headers: dict[str, str], params: dict[str, str], method: str
) -> None:
    """Code 516 as in ClickHouse (whose text names the second method instead of "another").

    Refused before any password check, so even an endpoint without --user refuses it.
    """
    error = refused(lambda: authenticator.check(headers, params))
    assert (error.code, error.http_status) == (516, 403)
    assert error.message == (
        f"Invalid authentication: it is not allowed to use {method} and another authentication method simultaneously"
    )


@pytest.mark.parametrize(
    ("authorization", "message"),
    [
        ("Bearer abc.def", "Invalid authentication: 'Bearer' HTTP Authorization scheme is not supported"),
        ("Basic !!!not-base64", "Invalid authentication: malformed Basic credentials"),
        ("Basic " + base64.b64encode(b"\xff:p").decode(), "Invalid authentication: malformed Basic credentials"),
        (basic(":p"), "Got an empty user name from Authorization HTTP header"),
        ("Basic", "Got an empty user name from Authorization HTTP header"),
    ],
)
def test_malformed_authorization_header_is_refused_with_authentication_failed(authorization: str, message: str) -> None:
    error = refused(lambda: Authenticator().check({"authorization": authorization}, {}))
    assert (error.code, error.message, error.http_status) == (516, message, 403)
