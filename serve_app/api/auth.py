"""Optional API-key authentication: Bearer tokens checked against the configured keys."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Header
from pydantic import SecretStr


class AuthenticationError(Exception):
    """The request carries no valid API key."""


def key_id(key: bytes) -> str:
    """A name for an API key that can be logged and compared, and reveals nothing of the key."""
    return hashlib.sha256(key).hexdigest()[:12]


def api_key_guard(keys: list[SecretStr]) -> Callable[[str | None], Awaitable[str | None]]:
    """A FastAPI dependency that admits requests with a valid ``Authorization: Bearer`` key and
    gives the key's ``key_id`` (for per-key fairness).

    With no keys configured it admits everything and gives None (the local default).
    """
    secrets = [(key_id(secret), secret) for secret in (k.get_secret_value().encode() for k in keys)]

    async def require_api_key(
        authorization: Annotated[str | None, Header()] = None,
    ) -> str | None:
        if not secrets:
            return None
        scheme, _, token = (authorization or "").partition(" ")
        presented = token.strip().encode()
        # Compare against every key, in constant time each, so timing tells nothing.
        matched = None
        for identity, secret in secrets:
            if hmac.compare_digest(presented, secret):
                matched = identity
        if scheme.lower() != "bearer" or matched is None:
            raise AuthenticationError("a valid API key is required: Authorization: Bearer <key>")
        return matched

    return require_api_key
