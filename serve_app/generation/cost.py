"""What a sampling job costs a FluxWorker, in one unit for every size, sampler and guidance.

A work unit is one transformer call over one megapixel. An image costs its sampler's model calls
(doubled under true classifier-free guidance), plus its decoding, times its megapixels, plus a
part that doesn't grow with its size (prompt encoding, scheduling). Workers report how long their
batches took, so admission (api/admission.py) learns their speed in units per second and can tell
how long the work it admitted will take.
"""

from __future__ import annotations

from collections.abc import Iterable

from serve_app.generation.planning import SamplingJob
from serve_app.generation.samplers import SAMPLERS, denoising_steps
from serve_app.settings import ServiceSettings

MEGAPIXEL = 1024 * 1024


def job_work(job: SamplingJob, settings: ServiceSettings) -> float:
    """Work units of one job's image."""
    params = job.params
    # From an input image, only the last steps x strength of the steps run.
    steps = (
        params.steps if params.strength is None else denoising_steps(params.steps, params.strength)
    )
    calls = SAMPLERS[params.sampler].model_calls(steps)
    if params.cfg_scale > 1.0 and not settings.native.guidance_distilled:
        calls *= 2  # the transformer also runs on the negative prompt
    megapixels = params.width * params.height / MEGAPIXEL
    return (
        megapixels * (calls + settings.admission_decode_calls) + settings.admission_image_overhead
    )


def work_of(jobs: Iterable[SamplingJob], settings: ServiceSettings) -> float:
    """Work units of all ``jobs``."""
    return sum(job_work(job, settings) for job in jobs)
