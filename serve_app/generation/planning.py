"""Turns a request into sampling jobs: which sampler, steps, guidance and seed make each image."""

from __future__ import annotations

import hashlib
import itertools
import secrets

from pydantic import BaseModel, ConfigDict

from serve_app.generation.profiles import ModelProfile
from serve_app.inputs.fitting import RequestInputs
from serve_app.schemas import MAX_SEED, GenerateRequest, Lora, SamplingParams, SeedMode
from serve_app.settings import ImageFormat, ServiceSettings


class SamplingJob(BaseModel):
    """One image to make: the prompt and the exact parameters for it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    index: int
    prompt: str
    negative_prompt: str | None
    params: SamplingParams
    image_format: ImageFormat = "png"
    image_quality: int = 95

    def batch_key(self) -> tuple[object, ...]:
        """Jobs with equal keys can share one pipeline call, whichever request they come from:
        prompts, negative prompts, seeds and input images go into a pipeline call one per image;
        adapters and their scales apply to the whole call."""
        p = self.params
        adapters = tuple((lora.digest, lora.scale) for lora in p.loras)
        return (p.sampler, p.steps, p.cfg_scale, p.width, p.height, p.mode, p.strength, adapters)


def spread(combinations: int, count: int) -> list[int]:
    """Which of ``combinations`` each of ``count`` images takes.

    Fewer images than combinations: evenly spaced over them. More: cycling through them.
    """
    if count >= combinations:
        return [i % combinations for i in range(count)]
    return [i * combinations // count for i in range(count)]


def derive_seed(base_seed: int, index: int) -> int:
    """A seed for image ``index``, stable across processes and machines (unlike ``hash()``)."""
    digest = hashlib.blake2b(f"{base_seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % (MAX_SEED + 1)


def seed_for(mode: SeedMode, base_seed: int, index: int) -> int:
    """The seed of image ``index`` under ``mode``."""
    if mode == "fixed":
        return base_seed
    if mode == "mix":
        return derive_seed(base_seed, index)
    return secrets.randbelow(MAX_SEED + 1)


def plan_jobs(
    request: GenerateRequest,
    settings: ServiceSettings,
    inputs: RequestInputs | None = None,
    loras: tuple[Lora, ...] = (),
) -> list[SamplingJob]:
    """The jobs of ``request``, one per image, in a deterministic order; a request with an image
    needs its ``inputs`` read (serve_app/inputs/), which also decide the size; uploaded inputs
    (a form's files) come without an ``image`` in the request. Every image applies ``loras``
    (the request's adapters as the library resolved them, digests included)."""
    if request.image is not None and inputs is None:
        raise ValueError("plan_jobs takes the read inputs of a request with an image")
    native: ModelProfile = settings.native
    diversity = request.diversity
    combinations = list(
        itertools.product(
            diversity.samplers or [native.sampler],
            diversity.nof_steps or [native.steps],
            diversity.cfg_scales or [native.cfg_scale],
        )
    )
    base_seed = request.base_seed or 0
    if inputs is not None:
        (width, height), from_inputs = inputs.size, inputs.sampling_fields()
    else:
        width = request.width or settings.default_width
        height = request.height or settings.default_height
        from_inputs = {}
    jobs = []
    for index, choice in enumerate(spread(len(combinations), request.nof_images)):
        sampler, steps, cfg_scale = combinations[choice]
        params = SamplingParams(
            sampler=sampler,
            steps=steps,
            cfg_scale=cfg_scale,
            seed=seed_for(diversity.seeds, base_seed, index),
            width=width,
            height=height,
            loras=loras,
            **from_inputs,
        )
        jobs.append(
            SamplingJob(
                index=index,
                prompt=request.prompt,
                negative_prompt=request.negative_prompt,
                params=params,
                image_format=request.image_format or settings.image_format,
                image_quality=(
                    settings.image_quality
                    if request.image_quality is None
                    else request.image_quality
                ),
            )
        )
    return jobs


def shard(jobs: list[SamplingJob], parts: int) -> list[list[SamplingJob]]:
    """Split jobs into at most ``parts`` contiguous, non-empty shards of near-equal size.

    Contiguous shards keep jobs with equal parameters together, so each worker can batch them.
    """
    parts = max(1, min(parts, len(jobs)))
    size, extra = divmod(len(jobs), parts)
    shards, start = [], 0
    for part in range(parts):
        end = start + size + (1 if part < extra else 0)
        shards.append(jobs[start:end])
        start = end
    return shards
