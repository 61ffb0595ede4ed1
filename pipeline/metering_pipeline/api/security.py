"""Who is calling: the API key behind `Authorization: Bearer <key>`, its scopes and its org."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from metering_pipeline.api.errors import ApiError
from metering_pipeline.api.keys import Scope

_bearer = HTTPBearer(auto_error=False, description="An API key from `metering api-key create`")


@dataclass(frozen=True)
class Caller:
    name: str
    scopes: frozenset[str]
    org_id: str | None  # None: may act for every org

    def may_act_for(self, org_id: str | None) -> bool:
        return self.org_id is None or org_id == self.org_id

    def require_org(self, org_id: str | None, what: str) -> None:
        if not self.may_act_for(org_id):
            raise ApiError(403, "forbidden_org", f"this key acts for org {self.org_id!r} only; {what} belongs to "
                                                 f"{'no org' if org_id is None else repr(org_id)}")


def caller(scope: Scope) -> Callable[..., Caller]:
    def authenticate(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> Caller:
        if credentials is None:
            raise ApiError(401, "unauthenticated", "send an API key as `Authorization: Bearer <key>`")
        key = request.app.state.context.keys.find(credentials.credentials)
        if key is None:
            raise ApiError(401, "unauthenticated", "unknown or revoked API key")
        if scope not in key.scopes:
            raise ApiError(403, "forbidden_scope", f"this key lacks the {scope!r} scope")
        return Caller(key.name, frozenset(key.scopes), key.org_id)

    return authenticate


reader = caller("read")
writer = caller("write")
