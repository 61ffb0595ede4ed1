"""Authentication: one configured user, checked the way ClickHouse reads HTTP credentials."""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from metering_dev.clickhouse_endpoint.errors import AUTHENTICATION_FAILED, ClickHouseError


@dataclass(frozen=True)
class Authenticator:
    """One configured user, checked the way ClickHouse reads HTTP credentials."""

    user: str | None = None
    password: str | None = None

    def check(self, headers: Mapping[str, str], params: Mapping[str, str]) -> str:
        """The authenticated user name; raises AUTHENTICATION_FAILED like the server.

        `headers` has lower-cased names.
        """
        user, password = _request_credentials(headers, params)
        if self.user is None:
            return user  # no --user: anyone is the password-less default user
        user_ok = hmac.compare_digest(user.encode(), self.user.encode())
        password_ok = hmac.compare_digest(password.encode(), (self.password or "").encode())
        if not (user_ok and password_ok):
            raise ClickHouseError(
                AUTHENTICATION_FAILED,
                f"{user}: Authentication failed: password is incorrect, or there is no user with such name",
            )
        return user


_MIXED_AUTH = "Invalid authentication: it is not allowed to use {} and another authentication method simultaneously"


def _request_credentials(headers: Mapping[str, str], params: Mapping[str, str]) -> tuple[str, str]:
    """X-ClickHouse-User/Key headers, Basic auth or user/password params; mixing them is an error."""
    header_user = headers.get("x-clickhouse-user", "")
    header_key = headers.get("x-clickhouse-key", "")
    authorization = headers.get("authorization", "")
    in_params = "user" in params or "password" in params
    if header_user or header_key:
        if authorization or in_params:
            raise ClickHouseError(AUTHENTICATION_FAILED, _MIXED_AUTH.format("X-ClickHouse HTTP headers"))
        return header_user, header_key
    if authorization:
        if in_params:
            raise ClickHouseError(AUTHENTICATION_FAILED, _MIXED_AUTH.format("Authorization HTTP header"))
        return _basic_credentials(authorization)
    return params.get("user") or "default", params.get("password", "")


def _basic_credentials(authorization: str) -> tuple[str, str]:
    scheme, _, encoded = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        raise ClickHouseError(
            AUTHENTICATION_FAILED, f"Invalid authentication: '{scheme}' HTTP Authorization scheme is not supported"
        )
    try:
        user, _, password = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise ClickHouseError(AUTHENTICATION_FAILED, "Invalid authentication: malformed Basic credentials") from exc
    if not user:
        raise ClickHouseError(AUTHENTICATION_FAILED, "Got an empty user name from Authorization HTTP header")
    return user, password
