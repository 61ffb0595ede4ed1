"""Errors answered the way ClickHouse answers them: the codes, the `Code: N. DB::Exception` body, the HTTP status."""

from __future__ import annotations

import re

# ClickHouse error codes this endpoint raises itself.
SYNTAX_ERROR = 62
BAD_ARGUMENTS = 36
NOT_IMPLEMENTED = 48
UNKNOWN_FORMAT = 73
CANNOT_DECOMPRESS = 271
SESSION_NOT_FOUND = 372
INVALID_SESSION_TIMEOUT = 374
AUTHENTICATION_FAILED = 516
STD_EXCEPTION = 1001
ERROR_NAMES = {
    SYNTAX_ERROR: "SYNTAX_ERROR",
    BAD_ARGUMENTS: "BAD_ARGUMENTS",
    NOT_IMPLEMENTED: "NOT_IMPLEMENTED",
    UNKNOWN_FORMAT: "UNKNOWN_FORMAT",
    CANNOT_DECOMPRESS: "CANNOT_DECOMPRESS",
    SESSION_NOT_FOUND: "SESSION_NOT_FOUND",
    INVALID_SESSION_TIMEOUT: "INVALID_SESSION_TIMEOUT",
    AUTHENTICATION_FAILED: "AUTHENTICATION_FAILED",
    STD_EXCEPTION: "STD_EXCEPTION",
}

# fmt: off
# ClickHouse's src/Server/HTTP/exceptionCodeToHTTPStatus.cpp, by numeric code.
_HTTP_STATUS_BY_CODES: tuple[tuple[frozenset[int], int], ...] = (
    (frozenset({194}), 401),
    (frozenset({192, 193, 497, 512, 516}), 403),
    (
        frozenset({6, 8, 15, 25, 26, 27, 36, 37, 38, 41, 44, 53, 62, 72, 117, 123, 167, 168, 223, 321, 376, 427,
                   441, 675, 676}),
        400,
    ),
    (frozenset({46, 47, 50, 56, 60, 63, 73, 78, 81, 115, 152, 336, 511}), 404),
    (frozenset({229}), 413),
    (frozenset({48}), 501),
    (frozenset({76, 209, 439}), 503),
    (frozenset({381}), 411),
    (frozenset({159}), 408),
    (frozenset({779}), 415),
)
# fmt: on

_CODE_RE = re.compile(r"Code: (\d+)\.")
_VERSION_SUFFIX_RE = re.compile(r"\(version [^)]*\)\s*$")


class ClickHouseError(Exception):
    """An error answered the way ClickHouse answers it: code, message, HTTP status."""

    def __init__(self, code: int, message: str, *, engine_text: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.engine_text = engine_text

    @classmethod
    def from_engine(cls, exc: BaseException) -> ClickHouseError:
        """chdb raises RuntimeError/ChdbError whose text holds ClickHouse's own `Code: N. ...`."""
        text = str(exc)
        start = text.find("Code: ")
        match = _CODE_RE.search(text, start) if start >= 0 else None
        if match is None:
            return cls(STD_EXCEPTION, text.strip() or type(exc).__name__)
        return cls(int(match.group(1)), text[start:].strip(), engine_text=True)

    @property
    def http_status(self) -> int:
        for codes, status in _HTTP_STATUS_BY_CODES:
            if self.code in codes:
                return status
        return 500

    def body(self, version: str) -> bytes:
        """`Code: N. DB::Exception: text. (NAME) (version X)`, as the server prints it."""
        if self.engine_text:
            text = self.message
        else:
            name = ERROR_NAMES.get(self.code, "UNKNOWN_EXCEPTION")
            text = f"Code: {self.code}. DB::Exception: {self.message.rstrip('.')}. ({name})"
        if not _VERSION_SUFFIX_RE.search(text):
            text = f"{text} (version {version})"
        return f"{text}\n".encode()
