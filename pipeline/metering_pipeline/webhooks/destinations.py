"""Where a webhook may be sent: `https` only, and never to a private, loopback or link-local address (a URL that
would turn the sender into a probe of the network it runs in), unless the settings allow it.

The address check is made on every address a name resolves to, when the connection is made (a name that resolved
to a public address when the endpoint was created cannot later lead inside), and redirects are never followed.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

# Addresses a webhook never reaches without METERING_WEBHOOK_ALLOW_PRIVATE.
_NOT_PUBLIC = ("is_loopback", "is_link_local", "is_private", "is_multicast", "is_reserved", "is_unspecified")


class RefusedDestination(OSError):
    """A URL or address the settings do not allow: the reason says which rule. An OSError, as a failed resolution
    is: aiohttp then fails the request with it as the cause instead of letting it escape."""


def refused_address(address: str) -> str | None:
    """Why `address` may not be reached (None: it may)."""
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    ip = mapped or ip
    for kind in _NOT_PUBLIC:
        if getattr(ip, kind):
            return f"{address} is a {kind.removeprefix('is_').replace('_', '-')} address"
    return None


def check_url(url: str, allow_http: bool, allow_private: bool) -> None:
    """RefusedDestination when the URL's scheme, or its host given as an address, is not allowed."""
    parts = urlsplit(url)
    if parts.scheme != "https" and not allow_http:
        raise RefusedDestination(
            f"{parts.scheme}:// is refused: webhooks are sent over https (METERING_WEBHOOK_ALLOW_HTTP)"
        )
    host = parts.hostname or ""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return  # a name: checked when it is resolved
    reason = None if allow_private else refused_address(host)
    if reason is not None:
        raise RefusedDestination(f"{reason} (METERING_WEBHOOK_ALLOW_PRIVATE)")


class PublicResolver(AbstractResolver):
    """Resolves as aiohttp does, then keeps only the addresses a webhook may reach: RefusedDestination when none is
    left, so the request is never made."""

    def __init__(self) -> None:
        self._resolver = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._resolver.resolve(host, port, family)
        allowed = [entry for entry in found if refused_address(entry["host"]) is None]
        if not allowed:
            reasons = "; ".join(sorted({refused_address(entry["host"]) or "" for entry in found}))
            raise RefusedDestination(
                f"{host} resolves to no public address ({reasons}) (METERING_WEBHOOK_ALLOW_PRIVATE)"
            )
        return allowed

    async def close(self) -> None:
        await self._resolver.close()


def resolver(allow_private: bool) -> AbstractResolver:
    """The resolver a sender's connector uses: aiohttp's own when private addresses are allowed."""
    return DefaultResolver() if allow_private else PublicResolver()
