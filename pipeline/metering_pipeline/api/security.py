"""Who is calling: the API key behind `Authorization: Bearer <key>`, its scopes and its org.

The key is checked before anything of the request is read (`AuthenticatedRoute`): a caller without a valid key gets
401 whatever its body holds, and nobody without a key can make the API parse (or buffer) a large body."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, HTTPException, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import Message, Receive

from metering_pipeline.api.context import context_of
from metering_pipeline.api.decimal_json import DecimalJSONRoute
from metering_pipeline.api.errors import ApiError
from metering_pipeline.api.keys import ApiKey, KeyRing, Scope as KeyScope

_bearer = HTTPBearer(auto_error=False, description="An API key from `metering api-key create`")
_NO_KEY = "send an API key as `Authorization: Bearer <key>`"


@dataclass(frozen=True)
class Caller:
    name: str
    scopes: frozenset[str]
    org_id: str | None  # None: may act for every org

    def may_act_for(self, org_id: str | None) -> bool:
        return self.org_id is None or org_id == self.org_id

    def require_org(self, org_id: str | None, what: str) -> None:
        if not self.may_act_for(org_id):
            raise ApiError(
                403,
                "forbidden_org",
                f"this key acts for org {self.org_id!r} only; {what} belongs to "
                f"{'no org' if org_id is None else repr(org_id)}",
            )


class AuthenticatedRoute(DecimalJSONRoute):
    """The route class of every operation: once the route is known (so `/metrics` counts the request under it), and
    before FastAPI reads the body to validate it, 401 without a known key, and 413 for a body over
    METERING_API_MAX_REQUEST_BYTES (by its Content-Length, or counted as it arrives)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            context = context_of(request)
            key = _key(context.keys, request.headers.get("authorization"))
            if key is None:
                missing = "authorization" not in request.headers
                raise ApiError(401, "unauthenticated", _NO_KEY if missing else "unknown or revoked API key")
            limit = context.settings.api_max_request_bytes
            declared = request.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                raise _too_large(limit)
            request.state.api_key = key
            return await handler(Request(request.scope, _bounded(request.receive, limit)))

        return handle


def _key(keys: KeyRing, authorization: str | None) -> ApiKey | None:
    scheme, _, token = (authorization or "").partition(" ")
    return keys.find(token.strip()) if scheme.lower() == "bearer" and token.strip() else None


def _too_large(limit: int) -> HTTPException:
    """413 `request_too_large` (see `errors.on_http_error`): an HTTPException, the one error FastAPI lets through
    unchanged from reading the body."""
    return HTTPException(413, f"the request body is over {limit} bytes (METERING_API_MAX_REQUEST_BYTES)")


def _bounded(receive: Receive, limit: int) -> Receive:
    """The client's body as it arrives, refused (413, in the documented shape) once it passes `limit` bytes: a body
    without a Content-Length is never buffered whole before it is known to fit."""
    size = 0

    async def receive_within_limit() -> Message:
        nonlocal size
        message = await receive()
        size += len(message.get("body", b""))
        if size > limit:
            raise _too_large(limit)
        return message

    return receive_within_limit


def caller(scope: KeyScope) -> Callable[..., Caller]:
    def authenticate(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> Caller:
        """The key AuthenticatedRoute found (`credentials` declares the scheme in the OpenAPI)."""
        key: ApiKey | None = getattr(request.state, "api_key", None)
        if key is None:
            raise ApiError(401, "unauthenticated", _NO_KEY)
        if scope not in key.scopes:
            raise ApiError(403, "forbidden_scope", f"this key lacks the {scope!r} scope")
        return Caller(key.name, frozenset(key.scopes), key.org_id)

    return authenticate


reader = caller("read")
writer = caller("write")
