"""Image-to-image and inpainting on the components of the loaded FLUX pipeline.

``FluxImg2ImgPipeline`` and ``FluxInpaintPipeline`` are built on the text pipeline's components:
they share its transformer, VAE, text encoders and tokenizers, so no weights are loaded twice,
and what changes those (speed-ups, adapters) changes every mode. That is what diffusers'
``from_pipe`` does, except that ``from_pipe`` then casts every shared module to a dtype (float32
unless told), which would turn a bfloat16 model to float32 for every mode and fails on a
quantized one. Both start part-way along the
schedule by one rule for every sampler (samplers.start_part_way). An inpainted image keeps the
input's own pixels where the mask keeps them: the VAE's round trip would blur them otherwise.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from PIL import Image

from serve_app.generation.planning import SamplingJob
from serve_app.generation.samplers import start_part_way
from serve_app.inputs.pixels import RenderInputs
from serve_app.schemas import Mode


@cache
def _image_pipeline_classes() -> tuple[type, type]:
    # diffusers is imported when a worker loads its model, not when the API validates a request.
    from diffusers import FluxImg2ImgPipeline, FluxInpaintPipeline

    class PartWay:
        """Starts part-way by flux-serve's rule rather than diffusers', for every sampler
        (diffusers' skips too many timesteps of a second-order sampler)."""

        scheduler: Any

        def get_timesteps(
            self,
            num_inference_steps: int,  # noqa: ARG002 - the scheduler's timesteps tell
            strength: float,
            device: Any,  # noqa: ARG002 - the timesteps are on it already
        ) -> tuple[Any, int]:
            return start_part_way(self.scheduler, strength)

    class FluxImageToImage(PartWay, FluxImg2ImgPipeline):  # type: ignore[misc]
        """FluxImg2ImgPipeline, part-way by flux-serve's rule."""

    class FluxInpainting(PartWay, FluxInpaintPipeline):  # type: ignore[misc]
        """FluxInpaintPipeline, part-way by flux-serve's rule."""

    return FluxImageToImage, FluxInpainting


class ModePipelines:
    """The pipeline of each mode, all on the components of one loaded text pipeline."""

    def __init__(self, text_pipeline: Any) -> None:
        image_to_image, inpainting = _image_pipeline_classes()
        self._pipelines: dict[Mode, Any] = {
            "text-to-image": text_pipeline,
            "image-to-image": image_to_image(**text_pipeline.components),
            "inpainting": inpainting(**text_pipeline.components),
        }
        for pipeline in self._pipelines.values():
            pipeline.set_progress_bar_config(disable=True)

    def __getitem__(self, mode: Mode) -> Any:
        return self._pipelines[mode]


def input_arguments(batch: list[SamplingJob], inputs: RenderInputs) -> dict[str, Any]:
    """The pipeline arguments of a batch's input images, masks and strength; none for text."""
    params = batch[0].params
    if params.mode == "text-to-image":
        return {}
    arguments: dict[str, Any] = {
        "image": [inputs.image_for(job.params).to_pil() for job in batch],
        "strength": params.strength,
    }
    if params.mode == "inpainting":
        arguments["mask_image"] = [inputs.mask_for(job.params).to_pil() for job in batch]
    return arguments


def keep_unmasked(batch: list[SamplingJob], images: list[Any], inputs: RenderInputs) -> list[Any]:
    """Inpainted images with the input's pixels where the mask is black, blended where grey."""
    if batch[0].params.mode != "inpainting":
        return images
    return [
        Image.composite(
            image, inputs.image_for(job.params).to_pil(), inputs.mask_for(job.params).to_pil()
        )
        for job, image in zip(batch, images, strict=True)
    ]
