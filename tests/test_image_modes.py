"""Image-to-image and inpainting on the tiny FLUX: shared weights, what strength does, batches."""

from __future__ import annotations

import asyncio
import io
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from serve_app.generation.modes import ModePipelines
from serve_app.generation.pipeline import FluxGenerator, RenderCancelled
from serve_app.generation.planning import SamplingJob
from serve_app.generation.samplers import denoising_steps, supported_samplers
from serve_app.generation.scheduling import RenderScheduler
from serve_app.inputs.pixels import RenderInputs
from serve_app.inputs.reading import read_uploaded
from serve_app.models.sources import resolve_source
from serve_app.models.tiny import TINY_FLUX_NAME
from serve_app.schemas import SamplingParams
from serve_app.settings import ServiceSettings

from .images import encode, gradient, mean_abs_difference, pixels
from .test_scheduling import RecordingGenerator

SIDE = 128
PICTURE = encode(gradient(SIDE, SIDE))
OTHER_PICTURE = encode(gradient(SIDE, SIDE, turned=True))


def centre_mask() -> bytes:
    """White (repaint) in the central square, black (keep) around it."""
    mask = Image.new("L", (SIDE, SIDE), 0)
    mask.paste(255, (32, 32, 96, 96))
    return encode(mask)


def image_jobs(
    settings: ServiceSettings,
    picture: bytes = PICTURE,
    mask: bytes | None = None,
    *,
    count: int = 1,
    seed: int = 11,
    prompt: str = "a red cat",
    **params: object,
) -> tuple[list[SamplingJob], RenderInputs]:
    """Jobs of one request with an input image, and what its render call carries."""
    strength = float(params.pop("strength", 0.5))  # type: ignore[arg-type]
    inputs = read_uploaded(picture, mask, settings, width=SIDE, height=SIDE, strength=strength)
    base = SamplingParams(
        sampler="euler", steps=4, cfg_scale=1.0, seed=seed, width=SIDE, height=SIDE
    ).model_copy(update={**inputs.sampling_fields(), **params})
    jobs = [
        SamplingJob(
            index=index,
            prompt=prompt,
            negative_prompt=None,
            params=base.model_copy(update={"seed": seed + index}),
        )
        for index in range(count)
    ]
    return jobs, inputs.render_inputs()


def render_one(generator: FluxGenerator, jobs: list[SamplingJob], inputs: RenderInputs) -> bytes:
    (image,) = generator.render(jobs[:1], inputs=inputs)
    return image.data


def image_to_image(generator: FluxGenerator, settings: ServiceSettings, **changes: object) -> bytes:
    return render_one(generator, *image_jobs(settings, **changes))


COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


def test_the_image_pipelines_share_the_loaded_components(generator: FluxGenerator) -> None:
    for mode in ("image-to-image", "inpainting"):
        pipeline = generator.modes[mode]
        for name in COMPONENTS:
            assert getattr(pipeline, name) is getattr(generator.pipeline, name), (mode, name)


def test_building_the_image_pipelines_leaves_the_weights_dtype_alone(
    settings: ServiceSettings,
) -> None:
    # diffusers' from_pipe would cast the shared modules to float32 here.
    from diffusers import FluxPipeline

    source = resolve_source(settings.model, TINY_FLUX_NAME, settings.cache_dir)
    halved = FluxPipeline.from_pretrained(source, dtype=torch.bfloat16)
    modes = ModePipelines(halved)
    assert modes["inpainting"].transformer is halved.transformer
    assert halved.transformer.dtype == halved.vae.dtype == torch.bfloat16


def test_image_to_image_differs_from_text_to_image_with_the_same_seed(
    generator: FluxGenerator, settings: ServiceSettings
) -> None:
    jobs, inputs = image_jobs(settings)
    text = jobs[0].model_copy(
        update={
            "params": jobs[0].params.model_copy(update={"strength": None, "image_digest": None})
        }
    )
    assert text.params.mode == "text-to-image"
    assert (
        mean_abs_difference(
            render_one(generator, jobs, inputs), render_one(generator, [text], inputs)
        )
        > 2
    )


def test_another_input_image_changes_the_output_and_the_same_one_reproduces_it(
    generator: FluxGenerator, settings: ServiceSettings
) -> None:
    first = image_to_image(generator, settings)
    assert image_to_image(generator, settings) == first
    assert (
        mean_abs_difference(first, image_to_image(generator, settings, picture=OTHER_PICTURE)) > 2
    )


def test_at_full_strength_the_input_is_ignored(
    generator: FluxGenerator, settings: ServiceSettings
) -> None:
    full = image_to_image(generator, settings, strength=1.0)
    assert (
        mean_abs_difference(
            full, image_to_image(generator, settings, strength=1.0, picture=OTHER_PICTURE)
        )
        == 0
    )


def vae_round_trip(generator: FluxGenerator, picture: bytes) -> bytes:
    """The input as the model's VAE gives it back: with random weights, far from the input."""
    pipeline = generator.pipeline
    with torch.inference_mode():
        tensor = pipeline.image_processor.preprocess(Image.open(io.BytesIO(picture)))
        decoded = pipeline.vae.decode(pipeline.vae.encode(tensor).latent_dist.mode()).sample
    return encode(pipeline.image_processor.postprocess(decoded)[0])


def test_a_smaller_strength_stays_closer_to_the_input(
    generator: FluxGenerator, settings: ServiceSettings
) -> None:
    # The tiny VAE's random weights don't give the input back, so the input as the VAE decodes
    # it is what an image made from it can come close to.
    seen = vae_round_trip(generator, PICTURE)
    distances = [
        mean_abs_difference(seen, image_to_image(generator, settings, strength=strength, steps=8))
        for strength in (0.125, 0.5, 1.0)
    ]
    assert distances == sorted(distances)
    assert distances[0] < distances[-1] - 0.5


def test_inpainting_keeps_the_input_outside_the_mask(
    generator: FluxGenerator, settings: ServiceSettings
) -> None:
    jobs, inputs = image_jobs(settings, mask=centre_mask(), strength=0.8)
    assert jobs[0].params.mode == "inpainting"
    made = pixels(render_one(generator, jobs, inputs))
    given = pixels(PICTURE)
    outside = np.ones((SIDE, SIDE), dtype=bool)
    outside[32:96, 32:96] = False
    assert np.abs(made - given)[outside].mean() == 0
    assert np.abs(made - given)[~outside].mean() > 10


@pytest.mark.parametrize("with_mask", [False, True], ids=["image-to-image", "inpainting"])
def test_an_image_made_in_a_batch_matches_it_made_alone(
    generator: FluxGenerator, settings: ServiceSettings, with_mask: bool
) -> None:
    mask = centre_mask() if with_mask else None
    # Two requests' jobs with other input images and prompts, as a worker's shared batch has them.
    first, first_inputs = image_jobs(settings, mask=mask, count=2)
    other, other_inputs = image_jobs(settings, OTHER_PICTURE, mask, seed=5, prompt="a blue dog")
    batch = [*first, *other]
    assert len({job.batch_key() for job in batch}) == 1
    inputs = RenderInputs.merged([first_inputs, other_inputs])
    together = generator.render(batch, inputs=inputs)
    for job, rendered in zip(batch, together, strict=True):
        assert rendered.job == job
        assert mean_abs_difference(rendered.data, render_one(generator, [job], inputs)) <= 1.0
    assert mean_abs_difference(together[0].data, together[2].data) > 0.5


@pytest.mark.parametrize("sampler", supported_samplers())
@pytest.mark.parametrize("with_mask", [False, True], ids=["image-to-image", "inpainting"])
def test_every_sampler_runs_the_last_steps_of_its_schedule(
    generator: FluxGenerator, settings: ServiceSettings, sampler: str, with_mask: bool
) -> None:
    mask = centre_mask() if with_mask else None
    jobs, inputs = image_jobs(settings, mask=mask, sampler=sampler, strength=0.5)
    image = Image.open(io.BytesIO(render_one(generator, jobs, inputs)))
    assert image.size == (SIDE, SIDE)
    pipeline = generator.modes[jobs[0].params.mode]
    order = pipeline.scheduler.order
    assert pipeline.num_timesteps == denoising_steps(4, 0.5) * order - (order - 1)


def test_a_cancelled_image_batch_stops(generator: FluxGenerator, settings: ServiceSettings) -> None:
    jobs, inputs = image_jobs(settings, count=2)
    cancelled = threading.Event()
    cancelled.set()
    with pytest.raises(RenderCancelled):
        generator.sample(jobs, cancelled, inputs)
    assert generator.modes["image-to-image"].interrupt


def test_jobs_of_other_input_images_share_a_pipeline_call_on_a_worker(
    generator: FluxGenerator, settings: ServiceSettings
) -> None:
    recording = RecordingGenerator(generator)
    scheduler = RenderScheduler(recording, max_batch_size=4, across_calls=True)
    first, first_inputs = image_jobs(settings, count=2, prompt="a red cat")
    other, other_inputs = image_jobs(settings, OTHER_PICTURE, count=2, prompt="a blue dog")

    async def both() -> list[list[bytes]]:
        async def call(jobs: list[SamplingJob], inputs: RenderInputs) -> list[bytes]:
            return [image.data async for group in scheduler.render(jobs, inputs) for image in group]

        return list(await asyncio.gather(call(first, first_inputs), call(other, other_inputs)))

    made_first, made_other = asyncio.run(both())
    assert recording.sampled == [
        [("a red cat", 0), ("a blue dog", 0), ("a red cat", 1), ("a blue dog", 1)]
    ]
    assert mean_abs_difference(made_first[0], render_one(generator, first, first_inputs)) <= 1.0
    assert mean_abs_difference(made_other[0], render_one(generator, other, other_inputs)) <= 1.0
