"""OpenAI's Images API over the GenerationService: its requests become GenerateRequests, so that
they take the same flow as /generate, and its answers take OpenAI's shape."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Literal

from serve_app.api.admission import Ticket
from serve_app.api.openai.protocol import (
    ImageData,
    ImageEditRequest,
    ImageRequest,
    ImagesResponse,
    ModelCard,
    ModelList,
)
from serve_app.generation.planning import plan_jobs
from serve_app.inputs.fitting import RequestInputs
from serve_app.inputs.reading import read_uploaded
from serve_app.schemas import Diversity, GenerateRequest
from serve_app.service import GenerationService


class OpenAIImages:
    """Serves OpenAI-shaped image requests and the model list."""

    def __init__(self, service: GenerationService) -> None:
        self.service = service
        self.settings = service.settings
        self.card = ModelCard(id=self.settings.served_model, created=int(time.time()))

    def generate_request(self, body: ImageRequest, size: tuple[int, int]) -> GenerateRequest:
        """The request of our own API that makes what ``body`` asks for, ``size`` pixels large
        (an edit's input image comes beside it, read by ``edit_inputs``)."""
        width, height = size
        return GenerateRequest(
            prompt=body.prompt,
            nof_images=body.n or 1,
            diversity=Diversity(
                samplers=None if body.sampler is None else [body.sampler],
                nof_steps=None if body.steps is None else [body.steps],
                cfg_scales=None if body.guidance is None else [body.guidance],
                # OpenAI's answers differ from call to call; a seed makes them reproducible.
                seeds="random" if body.seed is None else "mix",
            ),
            width=width,
            height=height,
            negative_prompt=body.negative_prompt,
            base_seed=body.seed,
            image_format=body.output_format or self.settings.image_format,
            image_quality=body.output_compression,
        )

    async def edit_inputs(self, body: ImageEditRequest) -> RequestInputs:
        """The edit's image and mask, checked and fitted as /generate's input images are; its
        mask read in OpenAI's convention. Unset size: the image's own, as /generate's rule says.

        Raises InvalidParameter (a 400 here) naming the file at fault."""
        image = await body.upload().read()
        mask = await body.mask.read() if body.mask is not None else None
        width, height = body.asked_size() or (None, None)
        return await asyncio.to_thread(
            read_uploaded,
            image,
            mask,
            self.settings,
            width=width,
            height=height,
            strength=body.effective_strength(),
            mask_convention="alpha",
        )

    async def images(
        self,
        request: GenerateRequest,
        inputs: RequestInputs | None,
        response_format: Literal["url", "b64_json"] | None,
        request_id: str,
        base_url: str,
        ticket: Ticket,
    ) -> ImagesResponse:
        """Make the images of ``request`` (from its read ``inputs``, for an edit) on its
        admission ``ticket``: stored, with their URLs, or inline (b64_json)."""
        if response_format == "b64_json":
            jobs = plan_jobs(request, self.settings, inputs)
            finals = self.service.scored_images(jobs, request, inputs, ticket.progress)
            made = [image async for final in finals for image in final]
            made.sort(key=lambda image: image.rendered.job.index)
            data = [ImageData(b64_json=base64.b64encode(i.rendered.data).decode()) for i in made]
        else:
            started = time.perf_counter()
            answer = await self.service.generate(
                request, request_id, base_url, started, inputs, ticket.progress
            )
            data = [ImageData(url=image.url) for image in answer.images]
        return ImagesResponse(
            created=int(time.time()),
            data=data,
            output_format=request.image_format or self.settings.image_format,
            size=f"{request.width}x{request.height}",
        )

    def models(self) -> ModelList:
        """Every served model: the one this deployment loads."""
        return ModelList(data=[self.card])

    def model(self, model_id: str) -> ModelCard | None:
        """The served model, if it is the one named ``model_id``."""
        return self.card if model_id == self.card.id else None
