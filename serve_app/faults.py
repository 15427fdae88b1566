"""Failures the request flow tells apart: a lost worker is retried, overload and timeouts are
answered at once."""

from __future__ import annotations


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
