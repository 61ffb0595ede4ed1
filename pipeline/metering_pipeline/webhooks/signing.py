"""Standard Webhooks signatures: `v1,` + base64 of HMAC-SHA256 over `{webhook-id}.{webhook-timestamp}.{body}`.

The timestamp is signed with the body, so a receiver that refuses old timestamps cannot be replayed an old delivery.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Iterable

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32  # the scheme asks for 24 to 64


def new_secret() -> str:
    """A signing secret as receivers configure it: `whsec_` + base64 of random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def signing_key(secret: str) -> bytes:
    """The HMAC key a secret stands for."""
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX))


def signature(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """One `v1,…` signature of a delivery."""
    signed = b"%s.%d.%s" % (message_id.encode(), timestamp, body)
    return "v1," + base64.b64encode(hmac.new(signing_key(secret), signed, hashlib.sha256).digest()).decode()


def signature_header(secrets_in_force: Iterable[str], message_id: str, timestamp: int, body: bytes) -> str:
    """`webhook-signature`: one signature per secret in force, space-separated (during a rotation, the new secret's
    and the old one's: a receiver configured with either verifies)."""
    return " ".join(signature(secret, message_id, timestamp, body) for secret in secrets_in_force)


def message_id(event_id: str) -> str:
    """`webhook-id`: derived from the event's own id, so it is the same on every attempt and every resend, and a
    receiver de-duplicates by it. (Event ids hold any character; a header value may not.)"""
    return "msg_" + base64.b32encode(hashlib.sha256(event_id.encode()).digest()[:20]).decode().lower()
