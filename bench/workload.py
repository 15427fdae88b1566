"""The work every measurement does: one request's images, with the service's own plan."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

from serve_app.generation.planning import SamplingJob, plan_jobs
from serve_app.inputs.pixels import RenderInputs
from serve_app.inputs.reading import read_uploaded
from serve_app.schemas import GenerateRequest
from serve_app.settings import ServiceSettings


@dataclass(frozen=True)
class Workload:
    """One request of ``images`` images; the raw pipeline makes exactly the jobs it plans."""

    prompt: str
    images: int
    size: int
    steps: int
    sampler: str = "euler"

    def request_body(self, *, stream: bool) -> dict[str, Any]:
        """The JSON body of ``POST /generate`` (default seeds: derived from base seed 0)."""
        return {
            "prompt": self.prompt,
            "nof_images": self.images,
            "width": self.size,
            "height": self.size,
            "diversity": {"samplers": [self.sampler], "nof_steps": [self.steps]},
            "stream": stream,
        }

    def jobs(self, settings: ServiceSettings) -> list[SamplingJob]:
        """The sampling jobs the service plans for this request: same prompts, seeds and sizes."""
        request = GenerateRequest.model_validate(self.request_body(stream=False))
        return plan_jobs(request, settings)

    def image_jobs(
        self, settings: ServiceSettings, picture: bytes, strength: float
    ) -> tuple[list[SamplingJob], RenderInputs]:
        """The jobs of this request made from the input image ``picture`` at ``strength``, as
        the service plans them, and the input pixels their render call carries."""
        image = f"data:image/png;base64,{base64.b64encode(picture).decode()}"
        body = {**self.request_body(stream=False), "image": image, "strength": strength}
        inputs = read_uploaded(
            picture, None, settings, width=self.size, height=self.size, strength=strength
        )
        request = GenerateRequest.model_validate(body)
        return plan_jobs(request, settings, inputs), inputs.render_inputs()
