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


def api_key_guard(keys: list[SecretStr]) -> Callable[[str | None], Awaitable[None]]:
    """A FastAPI dependency that admits requests with a valid ``Authorization: Bearer`` key.

    With no keys configured it admits everything (the local default).
    """
    secrets = [key.get_secret_value().encode() for key in keys]

    async def require_api_key(authorization: Annotated[str | None, Header()] = None) -> None:
        if not secrets:
            return
        scheme, _, token = (authorization or "").partition(" ")
        presented = token.strip().encode()
        # Compare against every key, in constant time each, so timing tells nothing.
        matched = False
        for secret in secrets:
            matched |= hmac.compare_digest(presented, secret)
        if scheme.lower() != "bearer" or not matched:
            raise AuthenticationError("a valid API key is required: Authorization: Bearer <key>")

    return require_api_key


def key_owner(keys: list[SecretStr]) -> Callable[[str | None], Awaitable[str]]:
    """A FastAPI dependency that names who made a request, to keep their jobs apart: a digest
    of its API key (never the key), or '' for everyone while API keys are off. Use it behind
    ``api_key_guard``, which has checked the key."""

    async def owner(authorization: Annotated[str | None, Header()] = None) -> str:
        if not keys:
            return ""
        token = (authorization or "").partition(" ")[2].strip()
        return hashlib.sha256(token.encode()).hexdigest()[:32]

    return owner
