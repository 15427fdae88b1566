"""Failures the request flow tells apart: a lost worker is retried, overload and timeouts are
answered at once, a parameter that can't be served is the client's to fix; and the deadline that
times a request out."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class WorkerLost(RuntimeError):
    """The replica doing a piece of work died or became unreachable: the work can be retried."""


class Overloaded(RuntimeError):
    """The service is at capacity: the client should retry later, after ``retry_after_s`` where
    the wait could be estimated."""

    def __init__(self, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class KeyAtCapacity(Overloaded):
    """The request's API key already holds its whole share of the service's capacity."""


class RequestTimedOut(RuntimeError):
    """The request took longer than its deadline; its work was cancelled."""


class InvalidParameter(ValueError):
    """A request field that passed the schema but can't be served; a 422 naming ``param``."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@contextlib.asynccontextmanager
async def deadline(seconds: float) -> AsyncIterator[None]:
    """Cancel the work inside after ``seconds`` and raise RequestTimedOut."""
    timeout = asyncio.timeout(seconds)
    try:
        async with timeout:
            yield
    except TimeoutError as error:
        if not timeout.expired():
            raise
        raise RequestTimedOut(
            f"the request took longer than {seconds:g} s; its work was cancelled"
        ) from error
