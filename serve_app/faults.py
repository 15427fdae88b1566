"""Failures the request flow tells apart: a lost worker is retried, overload and timeouts are
answered at once."""

from __future__ import annotations


class WorkerLost(RuntimeError):
    """The replica doing a piece of work died or became unreachable: the work can be retried."""


class Overloaded(RuntimeError):
    """The service is at capacity: the client should retry later."""


class RequestTimedOut(RuntimeError):
    """The request took longer than its deadline; its work was cancelled."""
