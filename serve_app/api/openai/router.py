"""Routes of the OpenAI-compatible API: /v1/images/generations, /v1/images/edits, /v1/models."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import APIRouter, Depends, Form, Request
from fastapi.params import Depends as Dependency
from fastapi.responses import JSONResponse

from serve_app.api.admission import Admission
from serve_app.api.errors import documented_errors, error_response
from serve_app.api.openai.protocol import (
    API_PREFIX,
    ImageEditRequest,
    ImageGenerationRequest,
    ImageRequest,
    ImagesResponse,
    ModelCard,
    ModelList,
    OpenAIErrorEnvelope,
)
from serve_app.api.openai.serving import OpenAIImages
from serve_app.faults import deadline
from serve_app.generation.planning import plan_jobs
from serve_app.inputs.fitting import RequestInputs
from serve_app.schemas import GenerateRequest
from serve_app.service import GenerationService

logger = logging.getLogger(__name__)

GENERATIONS = f"{API_PREFIX}/images/generations"
EDITS = f"{API_PREFIX}/images/edits"
IMAGE_PATHS = (GENERATIONS, EDITS)
"""The paths whose requests count as image requests, like /generate."""


def openai_router(
    service: GenerationService,
    admission: Admission,
    dependencies: list[Dependency],
    owner_of_key: Callable[..., Awaitable[str]],
    elsewhere: str | None,
) -> APIRouter:
    """The OpenAI-compatible routes, behind the same keys (``dependencies``), admission (by
    the key ``owner_of_key`` names, suggesting ``elsewhere`` when refused) and deadline as
    /generate."""
    router = APIRouter(
        dependencies=dependencies,
        tags=["OpenAI-compatible"],
        responses=documented_errors(openai=True),
    )
    serving = OpenAIImages(service)

    async def answer(
        body: ImageRequest,
        generate: GenerateRequest,
        inputs: RequestInputs | None,
        request: Request,
        owner: str,
    ) -> ImagesResponse:
        """Make ``generate``'s images (from an edit's ``inputs``), admitted by cost and key and
        within the deadline, as /generate's are."""
        request_id: str = request.state.request_id
        end_user = body.end_user()
        if end_user:
            logger.info("request %s: for end user %r", request_id, end_user)
        logger.debug("request %s: prompt %r", request_id, body.prompt)
        jobs = plan_jobs(generate, service.settings, inputs)
        with admission.admit(jobs, generate.gpus, owner or None, elsewhere) as ticket:
            async with deadline(service.settings.request_timeout_s):
                return await serving.images(
                    generate,
                    inputs,
                    body.response_format,
                    request_id,
                    str(request.base_url),
                    ticket,
                )

    @router.post(GENERATIONS, response_model=ImagesResponse, response_model_exclude_none=True)
    async def create_images(
        body: ImageGenerationRequest, request: Request, owner: str = Depends(owner_of_key)
    ) -> ImagesResponse:
        """Generate images for a prompt, as OpenAI's Images API does."""
        generate = serving.generate_request(body, body.dimensions())
        return await answer(body, generate, None, request, owner)

    @router.post(EDITS, response_model=ImagesResponse, response_model_exclude_none=True)
    async def edit_images(
        body: Annotated[ImageEditRequest, Form(media_type="multipart/form-data")],
        request: Request,
        owner: str = Depends(owner_of_key),
    ) -> ImagesResponse:
        """Edit an image for a prompt, as a whole or where its mask is transparent, as OpenAI's
        Images API does."""
        # Read before admission, as /generate's inputs: the image decides the size, and so the
        # cost, of the images.
        inputs = await serving.edit_inputs(body)
        generate = serving.generate_request(body, inputs.size)
        return await answer(body, generate, inputs, request, owner)

    @router.get(f"{API_PREFIX}/models", response_model=ModelList)
    async def list_models() -> ModelList:
        """The served model."""
        return serving.models()

    @router.get(
        f"{API_PREFIX}/models/{{model_id:path}}",
        response_model=ModelCard,
        responses={404: {"model": OpenAIErrorEnvelope, "description": "No such model here."}},
    )
    async def retrieve_model(model_id: str) -> ModelCard | JSONResponse:
        """The served model, by its id."""
        card = serving.model(model_id)
        if card is None:
            message = (
                f"model '{model_id}' is not served here; the served model is '{serving.card.id}'"
            )
            return error_response(404, "model_not_found", message, path=API_PREFIX)
        return card

    return router
