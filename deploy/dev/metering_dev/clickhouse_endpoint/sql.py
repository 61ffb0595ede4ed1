"""SQL scanning: just enough lexing to classify a query, find its FORMAT clause and split inline INSERT data."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from metering_dev.clickhouse_endpoint.errors import SYNTAX_ERROR, ClickHouseError

_TOKEN_RE = re.compile(
    rb"""
      (?P<ws>\s++)
    | (?P<line_comment>(?:--|\#)[^\n]*+)
    | (?P<block_comment>/\*)
    | (?P<string>'(?:[^'\\]|\\.|'')*+(?:'|\Z))
    | (?P<quoted>"(?:[^"\\]|\\.|"")*+(?:"|\Z)|`(?:[^`\\]|\\.|``)*+(?:`|\Z))
    | (?P<heredoc>\$[A-Za-z0-9_]*\$)
    | (?P<word>[A-Za-z_][A-Za-z0-9_$]*+)
    | (?P<number>[0-9][0-9A-Za-z_.]*+)
    | (?P<punct>.)
    """,
    re.VERBOSE | re.DOTALL,
)


@dataclass(frozen=True)
class Token:
    kind: str
    text: bytes
    start: int
    end: int
    depth: int

    def is_word(self, *words: bytes) -> bool:
        return self.kind == "word" and self.text.upper() in words


def _comment_end(sql: bytes, pos: int) -> int:
    """End of a (nestable, as in ClickHouse) block comment opening at `pos`."""
    depth, i = 0, pos
    while i < len(sql):
        if sql.startswith(b"/*", i):
            depth, i = depth + 1, i + 2
        elif sql.startswith(b"*/", i):
            depth, i = depth - 1, i + 2
            if depth == 0:
                return i
        else:
            i += 1
    return len(sql)


def _heredoc_end(sql: bytes, tag_start: int, tag_end: int) -> int:
    closing = sql.find(sql[tag_start:tag_end], tag_end)
    return len(sql) if closing < 0 else closing + (tag_end - tag_start)


def tokens(sql: bytes) -> Iterator[Token]:
    """Lex just enough SQL to find clause keywords: skips comments, literals, quoted names."""
    pos, depth = 0, 0
    while pos < len(sql):
        match = _TOKEN_RE.match(sql, pos)
        assert match is not None  # the last alternative matches any byte
        kind, end = match.lastgroup or "punct", match.end()
        if kind == "block_comment":
            end = _comment_end(sql, pos)
        elif kind == "heredoc":
            end, kind = _heredoc_end(sql, pos, end), "string"
        if kind not in ("ws", "line_comment", "block_comment"):
            text = sql[pos:end]
            if kind == "punct" and text in (b"(", b"[", b"{"):
                yield Token(kind, text, pos, end, depth)
                depth += 1
            else:
                if kind == "punct" and text in (b")", b"]", b"}"):
                    depth = max(0, depth - 1)
                yield Token(kind, text, pos, end, depth)
        pos = end


@dataclass(frozen=True)
class Statement:
    """What the endpoint must know about a query before handing it to the engine."""

    kind: str
    output_format: str | None = None
    insert_format: str | None = None
    insert_head: bytes = b""
    data_offset: int = 0

    @property
    def carries_data(self) -> bool:
        return self.insert_format is not None


def _data_start(sql: bytes, pos: int) -> int:
    """Inline INSERT data starts after the first newline, else after the blanks (ParserInsertQuery)."""
    while pos < len(sql) and sql[pos] in b" \t\f":
        pos += 1
    if sql.startswith(b"\r", pos):
        pos += 1
    if sql.startswith(b"\n", pos):
        pos += 1
    return pos


def _analyze_insert(sql: bytes, stream: Iterator[Token]) -> Statement:
    """Split `INSERT ... FORMAT fmt <data>` into head, format and data; other inserts run as SQL."""
    previous = b"INSERT"
    for token in stream:
        if token.depth == 0 and token.is_word(b"VALUES", b"SELECT", b"WITH"):
            return Statement("INSERT")
        if token.depth == 0 and token.is_word(b"FORMAT") and previous not in (b"INTO", b"TABLE", b"FUNCTION", b"."):
            name = next(stream, None)
            if name is None or name.kind != "word":
                return Statement("INSERT")  # the engine reports the syntax error
            return Statement(
                "INSERT",
                insert_format=name.text.decode(),
                insert_head=sql[: token.start],
                data_offset=_data_start(sql, name.end),
            )
        previous = token.text.upper()
    return Statement("INSERT")


def _trailing_format(top_level: Sequence[Token]) -> str | None:
    """The `FORMAT name` clause, which only `SETTINGS` may follow."""
    for i in range(len(top_level) - 2, -1, -1):
        keyword, name = top_level[i], top_level[i + 1]
        if keyword.is_word(b"FORMAT") and name.kind == "word":
            rest = top_level[i + 2 :]
            if not rest or rest[0].is_word(b"SETTINGS"):
                return name.text.decode()
    return None


def analyze(sql: bytes) -> Statement:
    """Classify a query, find its FORMAT clause and reject multi-statements like the server."""
    stream = tokens(sql)
    first = next(stream, None)
    if first is None:
        raise ClickHouseError(SYNTAX_ERROR, "Empty query")
    kind = first.text.upper().decode(errors="replace") if first.kind == "word" else first.text.decode(errors="replace")
    if kind == "INSERT":
        return _analyze_insert(sql, stream)
    top_level: list[Token] = []
    for token in stream:
        if token.depth != 0:
            continue
        if token.text == b";":
            if any(t.text != b";" for t in stream):
                raise ClickHouseError(SYNTAX_ERROR, "Multi-statements are not allowed")
            break
        top_level.append(token)
    return Statement(kind, output_format=_trailing_format(top_level))
