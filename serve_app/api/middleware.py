"""ASGI middleware of the REST API: request ids, outcome counting and a body size limit."""

from __future__ import annotations

import re
import uuid
from collections.abc import Collection

from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app.api.errors import api_path, error_response
from serve_app.telemetry import Telemetry, outcome_of

REQUEST_ID_HEADER = "X-Request-Id"
_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def request_id_from(header: str | None) -> str:
    """The client's X-Request-Id where it is a safe key part, else a fresh one."""
    if header and _SAFE_REQUEST_ID.fullmatch(header):
        return header
    return uuid.uuid4().hex


class RequestIdMiddleware:
    """Gives every HTTP request an id (the client's X-Request-Id when usable), puts it in
    ``request.state.request_id`` and, with ``echo``, on the response. Skips websocket and
    lifespan scopes. Behind Ray Serve's proxy, which sets the header itself, ``echo`` is off."""

    def __init__(self, app: ASGIApp, echo: bool = True) -> None:
        self.app = app
        self.echo = echo

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(REQUEST_ID_HEADER.lower().encode())
        request_id = request_id_from(header.decode("latin-1") if header else None)
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if self.echo and message["type"] == "http.response.start":
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        await self.app(scope, receive, send_with_id)


class OutcomeMiddleware:
    """Counts the outcome of each request to one of ``paths`` by status code. Skips other paths,
    and event streams, whose outcome is known only at their end (the stream reports it)."""

    def __init__(self, app: ASGIApp, telemetry: Telemetry, paths: Collection[str]) -> None:
        self.app = app
        self.telemetry = telemetry
        self.paths = frozenset(paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or api_path(scope) not in self.paths:
            await self.app(scope, receive, send)
            return

        async def send_and_count(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                if not headers.get("content-type", "").startswith("text/event-stream"):
                    self.telemetry.request_finished(outcome_of(message["status"]))
            await send(message)

        await self.app(scope, receive, send_and_count)


class BodySizeLimitMiddleware:
    """Answers 413 to request bodies larger than ``max_bytes``, by Content-Length or by counting
    the chunks of a body sent without one. Skips non-HTTP scopes."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, self._message())
            return message

        await self.app(scope, counting_receive, send)

    def _message(self) -> str:
        return f"the request body exceeds {self.max_bytes} bytes"

    async def _refuse(self, scope: Scope, send: Send) -> None:
        response = error_response(413, "request_too_large", self._message(), path=api_path(scope))
        await send(
            {
                "type": "http.response.start",
                "status": response.status_code,
                "headers": response.raw_headers,
            }
        )
        await send({"type": "http.response.body", "body": response.body})
