"""Machine-readable errors: `{"error": code, "message": text, "errors": [{"field", "message"}]}`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from metering_pipeline.logs import get_logger

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
    from aiokafka.errors import KafkaError

    server = "kafka" if isinstance(error, KafkaError) else "clickhouse"
    log.warning("server unavailable", server=server, path=request.url.path, error=str(error)[:300])
    body = ErrorBody(error=f"{server}_unavailable", message=f"{'Kafka' if server == 'kafka' else 'ClickHouse'} is "
                                                             f"unavailable; retry later ({type(error).__name__})")
    return JSONResponse(body.model_dump(), status_code=503, headers={"Retry-After": "5"})


async def on_validation_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    body = invalid(error.errors()).body
    return JSONResponse(body.model_dump(), status_code=422)


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in {
        400: "Malformed request", 401: "Missing or unknown API key", 403: "The key's scope or org does not allow it",
        404: "Not found", 409: "Already exists", 422: "Invalid input", 503: "Kafka or ClickHouse unavailable",
    }.items()
}
