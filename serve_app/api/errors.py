"""One error envelope per API surface, and the one place that maps exceptions to status codes.

Our own API answers ``{"error": {"type", "message", "param"}}``. Under /v1, the OpenAI-compatible
API, the same failures answer in OpenAI's envelope ``{"error": {"message", "type", "param",
"code"}}`` with OpenAI's status codes (400, not 422, for an invalid request), so that its SDKs raise
their own typed errors.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.types import Scope

from serve_app.api.auth import AuthenticationError
from serve_app.api.openai.protocol import API_PREFIX, OpenAIErrorBody, OpenAIErrorEnvelope
from serve_app.faults import (
    InvalidParameter,
    KeyAtCapacity,
    Overloaded,
    RequestTimedOut,
    WorkerLost,
)
from serve_app.generation.adapter_library import AdapterRefused
from serve_app.generation.adapter_sources import LibraryUnavailable
from serve_app.inputs.errors import InputFetchFailed
from serve_app.jobs.store import IdempotencyConflict, JobFinished, JobNotFound, JobStoreUnavailable
from serve_app.schemas import ErrorBody, ErrorEnvelope
from serve_app.storage.base import StorageError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Problem:
    """A failure as the client is told about it, whichever envelope carries it."""

    status: int
    kind: str
    message: str
    param: str | None = None
    code: str | None = None  # a finer kind, where there is one (the OpenAI envelope's code)


def problem_for(error: Exception) -> Problem:
    """What a client is told about an error raised while serving its request."""
    if isinstance(error, StorageError):
        return Problem(503, "storage_error", f"storing the images failed: {error}")
    if isinstance(error, KeyAtCapacity):
        return Problem(429, "key_at_capacity", str(error))
    if isinstance(error, Overloaded):
        return Problem(503, "overloaded", str(error))
    if isinstance(error, RequestTimedOut):
        return Problem(504, "timeout", str(error))
    if isinstance(error, WorkerLost):
        return Problem(503, "worker_lost", f"{error}; retries were exhausted")
    if isinstance(error, LibraryUnavailable):
        return Problem(503, "library_unavailable", f"the adapter library: {error}")
    if isinstance(error, JobStoreUnavailable):
        return Problem(503, "broker_unavailable", str(error))
    if isinstance(error, InputFetchFailed):
        return Problem(424, "input_fetch_failed", str(error), error.param)
    if isinstance(error, InvalidParameter | AdapterRefused):
        return Problem(422, "invalid_request", str(error), error.param)
    if isinstance(error, JobNotFound):
        return Problem(404, "not_found", str(error))
    if isinstance(error, IdempotencyConflict | JobFinished):
        return Problem(409, "conflict", str(error))
    logger.exception("request failed", exc_info=error)
    return Problem(500, "internal_error", "image generation failed; see the server log")


def native_envelope(problem: Problem) -> tuple[int, ErrorEnvelope]:
    """Status code and envelope of our own API."""
    body = ErrorBody(type=problem.kind, message=problem.message, param=problem.param)
    return problem.status, ErrorEnvelope(error=body)


def openai_envelope(problem: Problem) -> tuple[int, OpenAIErrorEnvelope]:
    """Status code and envelope of the OpenAI-compatible API: OpenAI answers an invalid request
    with 400, and names the kind of failure in ``type`` and our precise one in ``code``."""
    status = 400 if problem.status == 422 else problem.status
    body = OpenAIErrorBody(
        message=problem.message,
        type="server_error" if status >= 500 else "invalid_request_error",
        param=problem.param,
        code=problem.code or problem.kind,
    )
    return status, OpenAIErrorEnvelope(error=body)


def documented_errors(*, openai: bool) -> dict[int | str, dict[str, Any]]:
    """The error answers of an OpenAPI operation, in our own envelope or in OpenAI's."""
    invalid = "The request is invalid; error.param names the field."
    answers: dict[int | str, str] = {
        400: invalid if openai else "The body could not be read as UTF-8 JSON.",
        401: "API keys are on and none valid was sent.",
        413: "The request body is too large.",
        429: "The API key holds its whole share of the capacity (see Retry-After).",
        503: "Overloaded: the request could not finish within its deadline behind the work "
        "admitted (see Retry-After); or storage failed, or workers were lost.",
        504: "The request passed its deadline.",
    }
    fetch_failed = "An input image URL could not be fetched (timed out, unreachable, not a 2xx)."
    # Under /v1 every invalid request is a 400; listing 4XX also keeps FastAPI from adding a 422.
    answers.update(
        {"4XX": "Any other client error."} if openai else {422: invalid, 424: fetch_failed}
    )
    envelope = OpenAIErrorEnvelope if openai else ErrorEnvelope
    return {status: {"model": envelope, "description": text} for status, text in answers.items()}


def envelope_for(error: Exception) -> tuple[int, ErrorEnvelope]:
    """Status code and envelope of our own API for an error raised while serving a request."""
    return native_envelope(problem_for(error))


def api_path(scope: Scope) -> str:
    """The request's path inside the application (without the prefix it is mounted under)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def _is_openai(path: str) -> bool:
    return path == API_PREFIX or path.startswith(API_PREFIX + "/")


def problem_response(
    problem: Problem, path: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """A JSON response with ``problem`` in the envelope of the API surface ``path`` is part of."""
    envelope: BaseModel
    status, envelope = (openai_envelope if _is_openai(path) else native_envelope)(problem)
    return JSONResponse(status_code=status, content=envelope.model_dump(), headers=headers)


def error_response(
    status: int, type_: str, message: str, param: str | None = None, *, path: str = "/"
) -> JSONResponse:
    """A JSON response carrying the error envelope of the API surface ``path`` is part of."""
    return problem_response(Problem(status, type_, message, param), path)


async def _authentication_error(request: Request, error: Exception) -> JSONResponse:
    problem = Problem(401, "authentication_error", str(error))
    headers = {"WWW-Authenticate": 'Bearer realm="flux-serve"'}
    return problem_response(problem, api_path(request.scope), headers)


def retry_after(status: int, seconds: int) -> dict[str, str]:
    """The Retry-After header for answers that a later retry may fix."""
    return {"Retry-After": str(seconds)} if status in (429, 503) else {}


def _dotted(location: tuple[int | str, ...]) -> str:
    # FastAPI prefixes the body's fields with "body"; clients know them without it.
    parts = location[1:] if location and location[0] == "body" else location
    return ".".join(str(part) for part in parts)


def _is_json(content_type: str) -> bool:
    # What FastAPI parses as JSON: application/json and application/*+json.
    media_type = content_type.split(";")[0].strip().lower()
    return media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json")
    )


def _body_problem(problem: dict[str, Any], content_type: str, body: Any) -> str | None:
    """What is wrong with the body as a whole, in words a client acts on; None for a field."""
    location = tuple(problem["loc"])
    if problem["type"] == "json_invalid":
        # FastAPI keeps only the decoder's message and offset: say where, as the decoder would.
        reason, offset = problem["ctx"]["error"], location[-1]
        if isinstance(body, str) and isinstance(offset, int):
            decoded = json.JSONDecodeError(reason, body, offset)
            return (
                f"the body is not valid JSON: {reason} at line {decoded.lineno} "
                f"column {decoded.colno}"
            )
        return f"the body is not valid JSON: {reason}"
    if location != ("body",):
        return None
    # Without a JSON content type FastAPI hands the model the raw bytes, whatever they hold.
    if not _is_json(content_type):
        return "send the body as JSON with content-type: application/json"
    if problem["type"] == "missing":
        return "the body is empty; send a JSON object"
    return "the body must be a JSON object"


def _form_media_type(scope: Scope) -> str | None:
    """The media type of the multipart form the request's route reads its body from, if any."""
    body = getattr(scope.get("route"), "body_field", None)
    media_type = getattr(getattr(body, "field_info", None), "media_type", None)
    return media_type if str(media_type).startswith("multipart/") else None


async def _validation_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    problems = error.errors()
    first = problems[0]
    content_type = request.headers.get("content-type", "")
    form = _form_media_type(request.scope)
    # A JSON body sent to a form's route has every field missing: say what to send instead.
    whole_body = (
        f"send the body as a multipart form, its files as parts (content-type: {form})"
        if form and content_type.split(";")[0].strip().lower() != form
        else _body_problem(first, content_type, error.body)
    )
    if whole_body is not None:
        message, param = whole_body, None
    else:
        message = "; ".join(
            f"{_dotted(problem['loc']) or 'body'}: {problem['msg']}" for problem in problems
        )
        param = _dotted(first["loc"]) or None
    problem = Problem(422, "invalid_request", message, param, code=first["type"])
    return problem_response(problem, api_path(request.scope))


async def _http_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, HTTPException)
    problem = Problem(error.status_code, "http_error", str(error.detail))
    return problem_response(problem, api_path(request.scope))


async def _mapped_error(request: Request, error: Exception) -> JSONResponse:
    problem = problem_for(error)
    estimated = error.retry_after_s if isinstance(error, Overloaded) else None
    headers = retry_after(problem.status, estimated or request.app.state.retry_after_s)
    return problem_response(problem, api_path(request.scope), headers)


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
        AdapterRefused,
        LibraryUnavailable,
        InputFetchFailed,
        JobStoreUnavailable,
        InvalidParameter,
        JobNotFound,
        IdempotencyConflict,
        JobFinished,
    ):
        app.add_exception_handler(known, _mapped_error)
    app.add_exception_handler(Exception, _mapped_error)
