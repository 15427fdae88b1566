"""One error envelope for every failure, and the one place that maps exceptions to status codes."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from serve_app.api.auth import AuthenticationError
from serve_app.faults import KeyAtCapacity, Overloaded, RequestTimedOut, WorkerLost
from serve_app.jobs.store import IdempotencyConflict, JobFinished, JobNotFound, JobStoreUnavailable
from serve_app.schemas import ErrorBody, ErrorEnvelope
from serve_app.storage.base import StorageError

logger = logging.getLogger(__name__)


class InvalidParameter(ValueError):
    """A request field that passed the schema but can't be served; a 422 naming ``param``."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def error_response(status: int, type_: str, message: str, param: str | None = None) -> JSONResponse:
    """A JSON response carrying the error envelope."""
    body = ErrorEnvelope(error=ErrorBody(type=type_, message=message, param=param))
    return JSONResponse(status_code=status, content=body.model_dump())


async def _authentication_error(_: Request, error: Exception) -> JSONResponse:
    response = error_response(401, "authentication_error", str(error))
    response.headers["WWW-Authenticate"] = 'Bearer realm="flux-serve"'
    return response


def envelope_for(error: Exception) -> tuple[int, ErrorEnvelope]:
    """Status code and envelope for an error raised while serving a request."""
    if isinstance(error, StorageError):
        body = ErrorBody(type="storage_error", message=f"storing the images failed: {error}")
        return 503, ErrorEnvelope(error=body)
    if isinstance(error, KeyAtCapacity):
        return 429, ErrorEnvelope(error=ErrorBody(type="key_at_capacity", message=str(error)))
    if isinstance(error, Overloaded):
        return 503, ErrorEnvelope(error=ErrorBody(type="overloaded", message=str(error)))
    if isinstance(error, RequestTimedOut):
        return 504, ErrorEnvelope(error=ErrorBody(type="timeout", message=str(error)))
    if isinstance(error, WorkerLost):
        body = ErrorBody(type="worker_lost", message=f"{error}; retries were exhausted")
        return 503, ErrorEnvelope(error=body)
    if isinstance(error, JobStoreUnavailable):
        return 503, ErrorEnvelope(error=ErrorBody(type="broker_unavailable", message=str(error)))
    if isinstance(error, InvalidParameter):
        body = ErrorBody(type="invalid_request", message=str(error), param=error.param)
        return 422, ErrorEnvelope(error=body)
    if isinstance(error, JobNotFound):
        return 404, ErrorEnvelope(error=ErrorBody(type="not_found", message=str(error)))
    if isinstance(error, IdempotencyConflict | JobFinished):
        return 409, ErrorEnvelope(error=ErrorBody(type="conflict", message=str(error)))
    logger.exception("request failed", exc_info=error)
    body = ErrorBody(type="internal_error", message="image generation failed; see the server log")
    return 500, ErrorEnvelope(error=body)


def retry_after(status: int, seconds: int) -> dict[str, str]:
    """The Retry-After header for answers that a later retry may fix."""
    return {"Retry-After": str(seconds)} if status in (429, 503) else {}


def _dotted(location: tuple[int | str, ...]) -> str:
    # FastAPI prefixes the body's fields with "body"; clients know them without it.
    parts = location[1:] if location and location[0] == "body" else location
    return ".".join(str(part) for part in parts)


async def _validation_error(_: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    problems = error.errors()
    first = problems[0]
    message = "; ".join(
        f"{_dotted(problem['loc']) or 'body'}: {problem['msg']}" for problem in problems
    )
    return error_response(422, "invalid_request", message, _dotted(first["loc"]) or None)


async def _http_error(_: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, HTTPException)
    return error_response(error.status_code, "http_error", str(error.detail))


async def _mapped_error(request: Request, error: Exception) -> JSONResponse:
    status, envelope = envelope_for(error)
    estimated = error.retry_after_s if isinstance(error, Overloaded) else None
    headers = retry_after(status, estimated or request.app.state.retry_after_s)
    return JSONResponse(status_code=status, content=envelope.model_dump(), headers=headers)


def install_error_handlers(app: FastAPI, retry_after_s: int) -> None:
    """Route every exception through the envelope."""
    app.state.retry_after_s = retry_after_s
    app.add_exception_handler(AuthenticationError, _authentication_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    # Known failures get their own handler: the catch-all below would also re-raise them.
    for known in (
        StorageError,
        Overloaded,
        RequestTimedOut,
        WorkerLost,
        JobStoreUnavailable,
        InvalidParameter,
        JobNotFound,
        IdempotencyConflict,
        JobFinished,
    ):
        app.add_exception_handler(known, _mapped_error)
    app.add_exception_handler(Exception, _mapped_error)
