"""A typed Python client of the REST API, sync and async, on httpx.

::

    from serve_app.client import FluxClient
    from serve_app.schemas import GenerateRequest

    with FluxClient("http://127.0.0.1:8000", api_key=None) as client:
        for image in client.stream(GenerateRequest(prompt="a red cat", nof_images=4)):
            print(image.url, image.sampling_params.sampler, image.score)

Requests and answers are the service's own models (serve_app.schemas). Only the fields a request
sets are sent, so everything left out takes the service's defaults. Failures are FluxError
subclasses: FluxAPIError carries the service's error envelope, FluxConnectionError and
FluxTimeoutError tell an unreachable service from a slow one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Generator,
    Iterator,
)
from contextlib import contextmanager
from typing import Any, Self, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from serve_app.client.events import ServerSentEvent, aread_events, read_events
from serve_app.jobs.schemas import Job, JobRequest
from serve_app.schemas import (
    ErrorBody,
    ErrorEnvelope,
    GeneratedImage,
    GenerateRequest,
    GenerateResponse,
    LoraListing,
    Readiness,
)

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = httpx.Timeout(300.0, connect=5.0)
"""Generous for reads: without streaming, the answer comes only once every image is done."""

_Model = TypeVar("_Model", bound=BaseModel)
_StreamItem = GeneratedImage | GenerateResponse


class FluxError(Exception):
    """Any failure of a call to the service."""


class FluxConnectionError(FluxError):
    """The service could not be reached (refused, unknown host, connect timeout) or hung up."""


class FluxTimeoutError(FluxError):
    """The service was reached but did not answer in time."""


class FluxProtocolError(FluxError):
    """The service's answer is not what the API defines."""


class FluxAPIError(FluxError):
    """The service refused or failed a request, and said why in its error envelope."""

    def __init__(self, status: int | None, error: ErrorBody) -> None:
        param = f" (param: {error.param})" if error.param else ""
        super().__init__(f"{status or 'stream'} {error.type}: {error.message}{param}")
        self.status = status
        """The HTTP status; None for an error event after a stream had begun."""
        self.type = error.type
        self.message = error.message
        self.param = error.param

    @property
    def is_client_error(self) -> bool:
        """A 4xx: the request itself (or its API key) was refused."""
        return self.status is not None and 400 <= self.status < 500


class _BearerAuth(httpx.Auth):
    """Sends the API key to the service's own origin only, never to other hosts (such as an
    object store's presigned image URLs)."""

    def __init__(self, api_key: str, base_url: httpx.URL) -> None:
        self._header = f"Bearer {api_key}"
        self._origin = _origin(base_url)

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if _origin(request.url) == self._origin:
            request.headers["Authorization"] = self._header
        yield request


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port


def _auth(api_key: str | None, base_url: httpx.URL) -> httpx.Auth | None:
    return _BearerAuth(api_key, base_url) if api_key else None


@contextmanager
def _transport_errors(base_url: httpx.URL) -> Iterator[None]:
    """Turn httpx's transport failures into this module's errors."""
    try:
        yield
    except httpx.ConnectTimeout as error:
        raise FluxConnectionError(f"cannot connect to {base_url}: timed out") from error
    except httpx.TimeoutException as error:
        raise FluxTimeoutError(f"{base_url} did not answer in time ({error!r})") from error
    except httpx.TransportError as error:
        raise FluxConnectionError(f"cannot reach {base_url}: {error}") from error


def _payload(request: GenerateRequest, *, stream: bool) -> dict[str, Any]:
    # Only what the caller set: everything left out takes the service's own defaults.
    with_mode = request.model_copy(update={"stream": stream})
    return with_mode.model_dump(mode="json", exclude_unset=True)


def _job_payload(request: JobRequest) -> dict[str, Any]:
    return request.model_dump(mode="json", exclude_unset=True)


def _job_headers(idempotency_key: str | None) -> dict[str, str]:
    return {"Idempotency-Key": idempotency_key} if idempotency_key else {}


DEFAULT_POLL_S = 1.0
"""How often ``wait`` asks for a job's state."""


class _JobWait:
    """The deadline and progress callback of one ``wait``."""

    def __init__(self, timeout_s: float | None, on_progress: Callable[[Job], None] | None) -> None:
        self._deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._on_progress = on_progress

    def ended(self, job: Job) -> bool:
        """Report ``job``; True once it has ended. FluxTimeoutError past the deadline."""
        if self._on_progress is not None:
            self._on_progress(job)
        if job.finished:
            return True
        if self._deadline is not None and time.monotonic() > self._deadline:
            raise FluxTimeoutError(f"job {job.id} is still {job.status}")
        return False


def _api_error(status: int | None, body: str) -> FluxAPIError:
    try:
        error = ErrorEnvelope.model_validate_json(body).error
    except ValidationError:
        # Not the service's envelope: a proxy or load balancer in front of it answered.
        message = body.strip()[:500] or f"HTTP {status}"
        error = ErrorBody(type="http_error", message=message)
    return FluxAPIError(status, error)


def _check(response: httpx.Response) -> None:
    """Raise the service's error for a non-2xx answer whose body has been read."""
    if not response.is_success:
        raise _api_error(response.status_code, response.text)


def _parsed(model: type[_Model], response: httpx.Response) -> _Model:
    _check(response)
    try:
        return model.model_validate_json(response.content)
    except ValidationError as error:
        raise FluxProtocolError(f"not a {model.__name__}: {error}") from error


def _readiness(response: httpx.Response) -> Readiness:
    if response.status_code == 503:  # not ready: the body says what is still starting
        try:
            return Readiness.model_validate_json(response.content)
        except ValidationError:
            pass
    return _parsed(Readiness, response)


def _stream_item(event: ServerSentEvent) -> _StreamItem | None:
    """An image, the final response, or None for an event this client does not know."""
    if event.event == "error":
        raise _api_error(None, event.data)
    try:
        if event.event == "image":
            return GeneratedImage.model_validate_json(event.data)
        if event.event == "result":
            return GenerateResponse.model_validate_json(event.data)
    except ValidationError as error:
        raise FluxProtocolError(f"malformed {event.event!r} event: {error}") from error
    return None


def _url_of(image: GeneratedImage | str) -> str:
    return image.url if isinstance(image, GeneratedImage) else image


class _Images:
    """What the sync and async streams share: the images, then the full response."""

    def __init__(self) -> None:
        self.result: GenerateResponse | None = None
        """The full response, once the stream has ended."""

    def _image_or_end(self, item: _StreamItem | None) -> GeneratedImage | None:
        """``item`` if an image; None at the end, where the result must have come."""
        if isinstance(item, GeneratedImage):
            return item
        if isinstance(item, GenerateResponse):
            self.result = item
        elif self.result is None:
            raise FluxProtocolError("the event stream ended without a result")
        return None


class ImageStream(_Images, Iterator[GeneratedImage]):
    """The images of a request as the service stores them; afterwards ``result`` holds the full
    response. Iterating sends the request; closing early (or leaving a ``with``) hangs up."""

    def __init__(self, items: Generator[_StreamItem, None, None]) -> None:
        super().__init__()
        self._items = items

    def __next__(self) -> GeneratedImage:
        image = self._image_or_end(next(self._items, None))
        if image is None:
            self.close()
            raise StopIteration
        return image

    def close(self) -> None:
        """Stop reading and close the connection."""
        self._items.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class AsyncImageStream(_Images, AsyncIterator[GeneratedImage]):
    """ImageStream's asynchronous twin."""

    def __init__(self, items: AsyncGenerator[_StreamItem, None]) -> None:
        super().__init__()
        self._items = items

    async def __anext__(self) -> GeneratedImage:
        image = self._image_or_end(await anext(self._items, None))
        if image is None:
            await self.aclose()
            raise StopAsyncIteration
        return image

    async def aclose(self) -> None:
        """Stop reading and close the connection."""
        await self._items.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()


class FluxClient:
    """The REST API of one flux-serve service."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
    ) -> None:
        url = httpx.URL(base_url)
        self._http = httpx.Client(base_url=url, auth=_auth(api_key, url), timeout=timeout)

    def generate(self, request: GenerateRequest) -> GenerateResponse:
        """All images of ``request`` at once, when the last is stored."""
        with _transport_errors(self._http.base_url):
            response = self._http.post("/generate", json=_payload(request, stream=False))
        return _parsed(GenerateResponse, response)

    def stream(self, request: GenerateRequest) -> ImageStream:
        """The images of ``request`` one by one, as the service stores them."""
        return ImageStream(self._stream_items(request))

    def health(self) -> Readiness:
        """Whether the service is ready, and what is still starting if not."""
        with _transport_errors(self._http.base_url):
            return _readiness(self._http.get("/healthz"))

    def submit(self, request: JobRequest, *, idempotency_key: str | None = None) -> Job:
        """Queue ``request`` as a job; the job object comes back at once."""
        with _transport_errors(self._http.base_url):
            response = self._http.post(
                "/jobs", json=_job_payload(request), headers=_job_headers(idempotency_key)
            )
        return _parsed(Job, response)

    def job(self, job_id: str) -> Job:
        """A job's state, progress, images so far and outcome."""
        with _transport_errors(self._http.base_url):
            return _parsed(Job, self._http.get(f"/jobs/{job_id}"))

    def wait(
        self,
        job_id: str,
        *,
        timeout_s: float | None = None,
        poll_s: float = DEFAULT_POLL_S,
        on_progress: Callable[[Job], None] | None = None,
    ) -> Job:
        """The job once it has ended, polling every ``poll_s``; ``on_progress`` sees each state."""
        waiting = _JobWait(timeout_s, on_progress)
        while not waiting.ended(job := self.job(job_id)):
            time.sleep(poll_s)
        return job

    def cancel(self, job_id: str) -> Job:
        """Cancel a job; it keeps the images stored so far."""
        with _transport_errors(self._http.base_url):
            return _parsed(Job, self._http.delete(f"/jobs/{job_id}"))

    def download(self, image: GeneratedImage | str) -> bytes:
        """The encoded bytes of an image (or of an image URL)."""
        with _transport_errors(self._http.base_url):
            response = self._http.get(_url_of(image))
        _check(response)
        return response.content

    def loras(self) -> LoraListing:
        """The LoRA adapters a request may apply (its ``loras``), from the service's library."""
        with _transport_errors(self._http.base_url):
            return _parsed(LoraListing, self._http.get("/loras"))

    def _stream_items(self, request: GenerateRequest) -> Generator[_StreamItem, None, None]:
        payload = _payload(request, stream=True)
        with (
            _transport_errors(self._http.base_url),
            self._http.stream("POST", "/generate", json=payload) as response,
        ):
            if not response.is_success:
                response.read()
            _check(response)
            for event in read_events(response.iter_lines()):
                if (item := _stream_item(event)) is not None:
                    yield item

    def close(self) -> None:
        """Close the connections."""
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class AsyncFluxClient:
    """FluxClient's asynchronous twin."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
    ) -> None:
        url = httpx.URL(base_url)
        self._http = httpx.AsyncClient(base_url=url, auth=_auth(api_key, url), timeout=timeout)

    async def generate(self, request: GenerateRequest) -> GenerateResponse:
        """All images of ``request`` at once, when the last is stored."""
        with _transport_errors(self._http.base_url):
            response = await self._http.post("/generate", json=_payload(request, stream=False))
        return _parsed(GenerateResponse, response)

    def stream(self, request: GenerateRequest) -> AsyncImageStream:
        """The images of ``request`` one by one, as the service stores them."""
        return AsyncImageStream(self._stream_items(request))

    async def health(self) -> Readiness:
        """Whether the service is ready, and what is still starting if not."""
        with _transport_errors(self._http.base_url):
            return _readiness(await self._http.get("/healthz"))

    async def submit(self, request: JobRequest, *, idempotency_key: str | None = None) -> Job:
        """Queue ``request`` as a job; the job object comes back at once."""
        with _transport_errors(self._http.base_url):
            response = await self._http.post(
                "/jobs", json=_job_payload(request), headers=_job_headers(idempotency_key)
            )
        return _parsed(Job, response)

    async def job(self, job_id: str) -> Job:
        """A job's state, progress, images so far and outcome."""
        with _transport_errors(self._http.base_url):
            return _parsed(Job, await self._http.get(f"/jobs/{job_id}"))

    async def wait(
        self,
        job_id: str,
        *,
        timeout_s: float | None = None,
        poll_s: float = DEFAULT_POLL_S,
        on_progress: Callable[[Job], None] | None = None,
    ) -> Job:
        """The job once it has ended, polling every ``poll_s``; ``on_progress`` sees each state."""
        waiting = _JobWait(timeout_s, on_progress)
        while not waiting.ended(job := await self.job(job_id)):
            await asyncio.sleep(poll_s)
        return job

    async def cancel(self, job_id: str) -> Job:
        """Cancel a job; it keeps the images stored so far."""
        with _transport_errors(self._http.base_url):
            return _parsed(Job, await self._http.delete(f"/jobs/{job_id}"))

    async def download(self, image: GeneratedImage | str) -> bytes:
        """The encoded bytes of an image (or of an image URL)."""
        with _transport_errors(self._http.base_url):
            response = await self._http.get(_url_of(image))
        _check(response)
        return response.content

    async def loras(self) -> LoraListing:
        """The LoRA adapters a request may apply (its ``loras``), from the service's library."""
        with _transport_errors(self._http.base_url):
            return _parsed(LoraListing, await self._http.get("/loras"))

    async def _stream_items(self, request: GenerateRequest) -> AsyncGenerator[_StreamItem, None]:
        payload = _payload(request, stream=True)
        with _transport_errors(self._http.base_url):
            async with self._http.stream("POST", "/generate", json=payload) as response:
                if not response.is_success:
                    await response.aread()
                _check(response)
                async for event in aread_events(response.aiter_lines()):
                    if (item := _stream_item(event)) is not None:
                        yield item

    async def aclose(self) -> None:
        """Close the connections."""
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()
