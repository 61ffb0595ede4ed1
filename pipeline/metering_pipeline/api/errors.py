"""Machine-readable errors: `{"error": code, "message": text, "errors": [{"field", "message"}]}`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from aiokafka.errors import KafkaError
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from metering_pipeline.logs import get_logger
from metering_pipeline.producer import NotAcknowledged

log = get_logger(__name__)


class FieldProblem(BaseModel):
    field: str
    message: str


class ErrorBody(BaseModel):
    error: str
    message: str
    errors: list[FieldProblem] = []


class ApiError(Exception):
    def __init__(self, status: int, error: str, message: str, errors: list[FieldProblem] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = ErrorBody(error=error, message=message, errors=errors or [])


def field_path(loc: tuple[Any, ...] | list[Any]) -> str:
    """pydantic's loc as a dotted path of wire names: `body.records.3.quantity`."""
    return ".".join(str(part) for part in loc)


async def on_api_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, ApiError)
    return JSONResponse(error.body.model_dump(), status_code=error.status)


def invalid(errors: Sequence[Mapping[str, Any]], prefix: tuple[Any, ...] = ()) -> ApiError:
    """422 with one problem per pydantic error, located under `prefix` (e.g. `("body",)`)."""
    problems = [FieldProblem(field=field_path((*prefix, *e["loc"])), message=e["msg"]) for e in errors]
    return ApiError(422, "validation_error", "; ".join(f"{p.field}: {p.message}" for p in problems), problems)


async def on_unavailable(request: Request, error: Exception) -> JSONResponse:
    """Kafka or ClickHouse could not be reached: 503, so clients retry (records were not published)."""
    server = "kafka" if isinstance(error, KafkaError) else "clickhouse"
    log.warning("server unavailable", server=server, path=request.url.path, error=str(error)[:300])
    if isinstance(error, NotAcknowledged):
        message = str(error)
    else:
        message = (
            f"{'Kafka' if server == 'kafka' else 'ClickHouse'} is unavailable; retry later ({type(error).__name__})"
        )
    body = ErrorBody(error=f"{server}_unavailable", message=message)
    return JSONResponse(body.model_dump(), status_code=503, headers={"Retry-After": "5"})


async def on_too_large(request: Request, error: Exception) -> JSONResponse:
    """A message the producer or the broker refuses for its size will never be taken: 413, not "retry later"."""
    log.warning("message too large for Kafka", path=request.url.path, error=str(error)[:300])
    body = ErrorBody(
        error="message_too_large",
        message="the request makes a Kafka message larger than the broker "
        f"takes; nothing was published ({type(error).__name__})",
    )
    return JSONResponse(body.model_dump(), status_code=413)


# Starlette's own answers (no such route, a method the route does not have), in the documented shape.
_HTTP_ERRORS = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


async def on_http_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, StarletteHTTPException)
    body = ErrorBody(error=_HTTP_ERRORS.get(error.status_code, "http_error"), message=str(error.detail))
    return JSONResponse(body.model_dump(), status_code=error.status_code, headers=error.headers)


async def on_validation_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    body = invalid(error.errors()).body
    return JSONResponse(body.model_dump(), status_code=422)


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in {
        400: "Malformed request",
        401: "Missing or unknown API key",
        403: "The key's scope or org does not allow it",
        404: "Not found",
        409: "Already exists",
        413: "Too large: the request body (`request_too_large`) or a Kafka message it makes (`message_too_large`)",
        422: "Invalid input",
        503: "Kafka or ClickHouse unavailable",
    }.items()
}
