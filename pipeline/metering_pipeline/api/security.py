"""Who is calling: the API key behind `Authorization: Bearer <key>`, its scopes and its org.

The key is checked before anything of the request is read (`AuthenticateFirst`): a caller without a valid key gets
401 whatever its body holds, and nobody without a key can make the API parse (or buffer) a large body."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fastapi import Depends, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from metering_pipeline.api.errors import ApiError, ErrorBody
from metering_pipeline.api.keys import ApiKey, KeyRing, Scope as KeyScope

_bearer = HTTPBearer(auto_error=False, description="An API key from `metering api-key create`")
PROTECTED = "/v1/"  # every operation of the module; /health, /metrics, /ui and the OpenAPI stay open
_KEY = "api_key"  # where AuthenticateFirst leaves the caller's key in the request's state


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


class AuthenticateFirst:
    """ASGI middleware in front of every `/v1/` operation: 401 without a known key, then 413 for a body over
    `max_body_bytes` (by its Content-Length, or counted as it arrives), both before the application reads a byte
    of it. The body is handed on as read."""

    def __init__(self, app: ASGIApp, keys: KeyRing, max_body_bytes: int) -> None:
        self.app = app
        self.keys = keys
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PROTECTED):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        key = self._key(headers.get("authorization"))
        if key is None:
            message = (
                "send an API key as `Authorization: Bearer <key>`"
                if "authorization" not in headers
                else "unknown or revoked API key"
            )
            await _answer(scope, receive, send, 401, "unauthenticated", message)
            return
        scope.setdefault("state", {})[_KEY] = key
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._too_large(scope, receive, send)
            return
        body, size, more = [], 0, True
        while more:
            event = await receive()
            if event["type"] != "http.request":  # the client left
                return
            chunk = event.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await self._too_large(scope, receive, send)
                return
            body.append(chunk)
            more = event.get("more_body", False)
        await self.app(scope, _replaying(b"".join(body), receive), send)

    def _key(self, authorization: str | None) -> ApiKey | None:
        scheme, _, token = (authorization or "").partition(" ")
        return self.keys.find(token.strip()) if scheme.lower() == "bearer" and token.strip() else None

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _answer(
            scope,
            receive,
            send,
            413,
            "request_too_large",
            f"the request body is over {self.max_body_bytes} bytes (METERING_API_MAX_REQUEST_BYTES)",
        )


async def _answer(scope: Scope, receive: Receive, send: Send, status: int, error: str, message: str) -> None:
    body = ErrorBody(error=error, message=message)
    await JSONResponse(body.model_dump(), status_code=status)(scope, receive, send)


def _replaying(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the application the body already read, then whatever the client sends next."""
    pending = True

    async def replay() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def caller(scope: KeyScope) -> Callable[..., Caller]:
    def authenticate(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> Caller:
        """The key AuthenticateFirst found (`credentials` declares the scheme in the OpenAPI)."""
        key: ApiKey | None = getattr(request.state, _KEY, None)
        if key is None:
            raise ApiError(401, "unauthenticated", "send an API key as `Authorization: Bearer <key>`")
        if scope not in key.scopes:
            raise ApiError(403, "forbidden_scope", f"this key lacks the {scope!r} scope")
        return Caller(key.name, frozenset(key.scopes), key.org_id)

    return authenticate


reader = caller("read")
writer = caller("write")
