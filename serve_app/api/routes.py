"""The REST API: FastAPI routes over a GenerationService."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel
from starlette.background import BackgroundTask

from serve_app.api.admission import Admission, Ticket
from serve_app.api.auth import api_key_guard, key_owner
from serve_app.api.errors import (
    documented_errors,
    envelope_for,
    error_response,
    install_error_handlers,
)
from serve_app.api.jobs import JobBackend, jobs_router
from serve_app.api.middleware import BodySizeLimitMiddleware, OutcomeMiddleware, RequestIdMiddleware
from serve_app.api.openai.router import IMAGE_PATHS, openai_router
from serve_app.api.playground import playground_page
from serve_app.faults import deadline
from serve_app.generation.planning import plan_jobs
from serve_app.inputs.fitting import RequestInputs
from serve_app.jobs.store import JobStoreUnavailable
from serve_app.schemas import (
    GeneratedImage,
    GenerateRequest,
    GenerateResponse,
    LoraListing,
    Readiness,
)
from serve_app.service import GenerationService, build_response
from serve_app.storage.base import StorageError
from serve_app.storage.codec import content_type
from serve_app.storage.local import LocalImageStore
from serve_app.telemetry import outcome_of

logger = logging.getLogger(__name__)


CheckReadiness = Callable[[], Awaitable[Readiness]]


def server_sent_event(event: str, payload: BaseModel) -> str:
    """One SSE frame."""
    return f"event: {event}\ndata: {payload.model_dump_json()}\n\n"


async def event_stream(
    service: GenerationService,
    request: GenerateRequest,
    request_id: str,
    base_url: str,
    ticket: Ticket,
    inputs: RequestInputs | None = None,
) -> AsyncIterator[str]:
    """``image`` events as images are stored, then ``result`` (or ``error``) with the answer."""
    started = time.perf_counter()
    images: list[GeneratedImage] = []
    try:
        async with deadline(service.settings.request_timeout_s):
            async for image in service.images(
                request, request_id, base_url, inputs, ticket.progress
            ):
                images.append(image)
                yield server_sent_event("image", image)
    except Exception as error:  # noqa: BLE001 - headers are sent: the error must go in the stream
        status, envelope = envelope_for(error)
        service.telemetry.request_finished(outcome_of(status))
        yield server_sent_event("error", envelope)
        return
    finally:
        ticket.release()
    service.telemetry.request_finished("success")
    if request.top_k is None:
        images.sort(key=lambda image: image.index)
    yield server_sent_event("result", build_response(request, request_id, images, started))


_ERRORS = documented_errors(openai=False)


def create_app(
    service: GenerationService,
    readiness: CheckReadiness,
    *,
    echo_request_id: bool = True,
    jobs: JobBackend | None = None,
) -> FastAPI:
    """The FastAPI application of the ingress; ``echo_request_id`` puts X-Request-Id on every
    response (leave it to a proxy that does so already); with ``jobs``, ``/jobs`` too."""
    # /docs and /redoc load Swagger UI and ReDoc from the service itself, not from a CDN, so that
    # they work on a cluster without internet; Swagger UI's online validator is off.
    app = FastAPIOffline(
        title="flux-serve",
        summary="Text to images with FLUX.1, ranked and stored.",
        version="0.1.0",
        swagger_ui_parameters={"validatorUrl": None},
    )
    settings = service.settings
    install_error_handlers(app, settings.retry_after_s)
    # The last one added runs first: ids for every answer, the size limit before any parsing.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(
        OutcomeMiddleware, telemetry=service.telemetry, paths={"/generate", *IMAGE_PATHS}
    )
    app.add_middleware(RequestIdMiddleware, echo=echo_request_id)
    authenticated = [Depends(api_key_guard(settings.api_keys))]
    owner_of_key = Depends(key_owner(settings.api_keys))
    # On the app's state, where operators' tools and the tests can read the estimates.
    admission = app.state.admission = Admission(settings)
    # Where a request refused for overload may go instead.
    elsewhere = "POST /jobs" if jobs is not None else None

    @app.post(
        "/generate",
        dependencies=authenticated,
        response_model=GenerateResponse,
        responses={
            **_ERRORS,
            200: {
                "description": "The images; with stream=true, server-sent events instead: "
                "'image' per stored image, then 'result' with this body (or 'error').",
                "content": {"text/event-stream": {}},
            },
        },
    )
    async def generate(
        body: GenerateRequest,
        request: Request,
        owner: str = owner_of_key,
    ) -> GenerateResponse | StreamingResponse:
        """Generate, rank and store images for a prompt."""
        started = time.perf_counter()
        request_id: str = request.state.request_id
        base_url = str(request.base_url)
        logger.debug("request %s: prompt %r", request_id, body.prompt)
        # Adapters are checked (and pinned) first: a bad one is a 422, even for a stream.
        body = await service.pin_loras(body)
        # Before any answer: a bad or unreachable input is a 4xx, for a stream too. Read before
        # admission, because the input decides the size, and so the cost, of the images.
        inputs = await service.read_inputs(body)
        # Per-key shares while API keys are on ('' is everyone while they are off).
        ticket = admission.admit(
            plan_jobs(body, settings, inputs), body.gpus, owner or None, elsewhere
        )
        if body.stream:
            return StreamingResponse(
                event_stream(service, body, request_id, base_url, ticket, inputs),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
                # Also frees the ticket of a stream the client left before it began.
                background=BackgroundTask(ticket.release),
            )
        try:
            async with deadline(settings.request_timeout_s):
                return await service.generate(
                    body, request_id, base_url, started, inputs, ticket.progress
                )
        finally:
            ticket.release()

    app.include_router(
        openai_router(service, admission, authenticated, key_owner(settings.api_keys), elsewhere)
    )
    if jobs is not None:
        client_errors: dict[int | str, dict[str, Any]] = {
            code: _ERRORS[code] for code in (400, 401, 413, 422, 424)
        }
        router = jobs_router(
            jobs, settings, service.telemetry, client_errors, pin_loras=service.pin_loras
        )
        app.include_router(router, dependencies=authenticated)

    @app.get(
        "/loras",
        dependencies=authenticated,
        response_model=LoraListing,
        responses={
            401: _ERRORS[401],
            503: {**_ERRORS[503], "description": "The adapter library can't be read."},
        },
    )
    async def loras() -> LoraListing:
        """The LoRA adapters requests may apply (loras.N.name), and files that can't be used."""
        return await asyncio.to_thread(service.library.listing)

    @app.get("/healthz", response_model=Readiness, responses={503: {"model": Readiness}})
    async def healthz() -> JSONResponse:
        """Whether every part of the application is up, storage and the job broker included."""
        try:
            await asyncio.to_thread(service.store.check)
            if jobs is not None:
                await jobs.store.check()
        except StorageError as error:
            state = Readiness(ready=False, detail=f"storage: {error}")
        except JobStoreUnavailable as error:
            state = Readiness(ready=False, detail=f"jobs: {error}")
        else:
            state = await readiness()
        return JSONResponse(state.model_dump(), status_code=200 if state.ready else 503)

    playground = playground_page()

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        """The web playground."""
        return HTMLResponse(playground)

    store = service.store
    if isinstance(store, LocalImageStore):

        @app.get(
            f"{store.url_path}/{{key:path}}",
            response_model=None,
            responses={200: {"content": {"image/*": {}}, "description": "The image."}},
        )
        async def image(key: str) -> FileResponse | JSONResponse:
            """A stored image."""
            try:
                path = store.path(key)
            except ValueError:
                return error_response(404, "not_found", f"no image {key!r}")
            if not path.is_file():
                return error_response(404, "not_found", f"no image {key!r}")
            return FileResponse(path, media_type=content_type(path.suffix.lstrip(".")))

    return app
