"""API keys: stored hashed, with scopes and an optional org.

A key is 32 random bytes (`mk_` + URL-safe base64), so a plain SHA-256 of it is enough at rest:
there is nothing to brute-force that a slow password hash would protect. The file is JSON lines,
re-read when it changes, so creating or revoking a key takes effect without a restart.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

Scope = Literal["read", "write"]
PREFIX = "mk_"


class ApiKey(BaseModel):
    name: str = Field(min_length=1)
    key_hash: str
    scopes: list[Scope]
    org_id: str | None = None  # None: every org (an admin key)
    created_at: datetime


def generate() -> str:
    return PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyRing:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._keys: list[ApiKey] = []
        self._loaded_mtime: float | None = None

    def keys(self) -> list[ApiKey]:
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            self._keys, self._loaded_mtime = [], None
            return []
        if mtime != self._loaded_mtime:
            lines = self.path.read_text().splitlines()
            self._keys = [ApiKey.model_validate_json(line) for line in lines if line.strip()]
            self._loaded_mtime = mtime
        return self._keys

    def find(self, presented: str) -> ApiKey | None:
        hashed = digest(presented)
        for key in self.keys():
            if hmac.compare_digest(key.key_hash, hashed):
                return key
        return None

    def add(self, name: str, scopes: list[Scope], org_id: str | None) -> str:
        """Stores a new key's hash and returns the key itself (shown once, never stored)."""
        if any(k.name == name for k in self.keys()):
            raise ValueError(f"a key named {name!r} exists")
        key = generate()
        entry = ApiKey(
            name=name,
            key_hash=digest(key),
            scopes=sorted(set(scopes)),
            org_id=org_id,
            created_at=datetime.now(UTC),
        )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a") as out:
            out.write(entry.model_dump_json() + "\n")
        return key

    def revoke(self, name: str) -> bool:
        keep = [k for k in self.keys() if k.name != name]
        if len(keep) == len(self.keys()):
            return False
        self.path.write_text("".join(k.model_dump_json() + "\n" for k in keep))
        return True
