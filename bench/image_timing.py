"""Times image-to-image against text-to-image on the raw pipeline: same size, batch and seeds.

Image-to-image at strength s runs the last steps x s of the schedule (to the nearest step), plus
the VAE's encoding of the input; the two are timed in turns, so that load from elsewhere on the
machine falls on both alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from bench.pipeline_timing import PipelineTimer, release_memory
from bench.stats import median
from bench.workload import Workload
from serve_app.generation.pipeline import FluxGenerator
from serve_app.generation.samplers import denoising_steps
from serve_app.settings import ServiceSettings
from serve_app.storage.codec import encode


@dataclass(frozen=True)
class ImageInputFigures:
    """Images/s of the same workload made from a prompt alone and from an input image."""

    strength: float
    steps_run: int
    """Denoising steps an image-to-image run makes of the workload's steps."""
    batch_size: int
    text_images_per_s: float
    image_images_per_s: float


def input_picture(size: int) -> bytes:
    """A smooth, deterministic PNG of ``size`` x ``size`` to start from."""
    ramp = Image.linear_gradient("L").resize((size, size))
    picture = Image.merge("RGB", [ramp, ramp.rotate(90), ramp.rotate(180)])
    return encode(picture, "png", 95)


def time_image_inputs(
    generator: FluxGenerator, workload: Workload, batch_size: int, repeats: int, strength: float
) -> ImageInputFigures:
    """Median images/s of ``workload`` as text-to-image and as image-to-image at ``strength``."""
    settings = generator.settings
    text = PipelineTimer(generator)
    jobs = workload.jobs(settings)
    image_jobs, inputs = workload.image_jobs(settings, input_picture(workload.size), strength)
    image = PipelineTimer(generator, inputs)
    for timer, its_jobs in ((text, jobs), (image, image_jobs)):  # warm-up of each path
        timer.call(its_jobs[:batch_size])
    text_rates, image_rates = [], []
    for _ in range(repeats):
        text_rates.append(len(jobs) / text.pass_seconds(jobs, batch_size))
        image_rates.append(len(image_jobs) / image.pass_seconds(image_jobs, batch_size))
    return ImageInputFigures(
        strength=strength,
        steps_run=denoising_steps(workload.steps, strength),
        batch_size=batch_size,
        text_images_per_s=median(text_rates),
        image_images_per_s=median(image_rates),
    )


def measure_image_inputs(
    settings: ServiceSettings, workload: Workload, batch_size: int, repeats: int, strength: float
) -> ImageInputFigures:
    """Load the service's generator for ``settings``, time both, and free the memory again."""
    generator = FluxGenerator(settings)
    figures = time_image_inputs(generator, workload, batch_size, repeats, strength)
    del generator
    release_memory()
    return figures
