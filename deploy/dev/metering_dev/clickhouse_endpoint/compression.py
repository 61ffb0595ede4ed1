"""HTTP compression: request bodies by Content-Encoding, responses by Accept-Encoding."""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Callable
from typing import Any

import lz4.frame
import zstandard

from metering_dev.clickhouse_endpoint.errors import CANNOT_DECOMPRESS, NOT_IMPLEMENTED, ClickHouseError

HTTP_COMPRESSION_LEVEL = 3


def _decode_frames(data: bytes, new_decoder: Callable[[], Any]) -> bytes:
    """Clients compress each block as its own frame; decode every concatenated frame."""
    out: list[bytes] = []
    rest = data
    while rest:
        decoder = new_decoder()
        out.append(decoder.decompress(rest))
        if not decoder.eof:
            raise ClickHouseError(CANNOT_DECOMPRESS, "Truncated compressed request body")
        rest = decoder.unused_data
    return b"".join(out)


_REQUEST_DECODERS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": gzip.decompress,
    "x-gzip": gzip.decompress,
    "deflate": lambda data: _decode_frames(data, zlib.decompressobj),
    "lz4": lambda data: _decode_frames(data, lz4.frame.LZ4FrameDecompressor),
    "zstd": lambda data: _decode_frames(data, lambda: zstandard.ZstdDecompressor().decompressobj()),
}
_RESPONSE_ENCODERS: dict[str, Callable[[bytes], bytes]] = {
    "lz4": lz4.frame.compress,
    "zstd": lambda data: zstandard.ZstdCompressor(level=HTTP_COMPRESSION_LEVEL).compress(data),
    "gzip": lambda data: gzip.compress(data, compresslevel=HTTP_COMPRESSION_LEVEL),
    "deflate": lambda data: zlib.compress(data, HTTP_COMPRESSION_LEVEL),
}


def decode_request_body(body: bytes, content_encoding: str | None) -> bytes:
    encoding = (content_encoding or "").strip().lower()
    if encoding in ("", "identity"):
        return body
    decoder = _REQUEST_DECODERS.get(encoding)
    if decoder is None:
        raise ClickHouseError(
            NOT_IMPLEMENTED,
            f"Content-Encoding '{encoding}' is not supported by this endpoint; use gzip, deflate, lz4 or zstd",
        )
    try:
        return decoder(body)
    except ClickHouseError:
        raise
    except Exception as exc:  # each codec raises its own error type
        raise ClickHouseError(CANNOT_DECOMPRESS, f"Cannot decompress {encoding} request body: {exc}") from exc


def choose_response_encoding(accept_encoding: str | None) -> str | None:
    """The first encoding the client lists that we can produce (q=0 means refused)."""
    for item in (accept_encoding or "").split(","):
        name, _, params = item.strip().partition(";")
        name = name.strip().lower()
        if name in _RESPONSE_ENCODERS and params.replace(" ", "") not in ("q=0", "q=0.0"):
            return name
    return None


def encode_response_body(body: bytes, encoding: str) -> bytes:
    return _RESPONSE_ENCODERS[encoding](body)
