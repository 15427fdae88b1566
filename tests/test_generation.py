"""The parameters named for an image are exactly the ones that made it."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
from PIL import Image

from serve_app.generation.pipeline import FluxGenerator
from serve_app.generation.planning import SamplingJob
from serve_app.generation.samplers import supported_samplers
from serve_app.schemas import SamplingParams

from .images import max_abs_difference, mean_abs_difference

BASE = SamplingParams(sampler="euler", steps=4, cfg_scale=1.0, seed=11, width=128, height=128)


def job(
    index: int = 0,
    negative_prompt: str | None = None,
    prompt: str = "a red cat",
    **changes: object,
) -> SamplingJob:
    return SamplingJob(
        index=index,
        prompt=prompt,
        negative_prompt=negative_prompt,
        params=BASE.model_copy(update=changes),
    )


def render_one(generator: FluxGenerator, sampling_job: SamplingJob) -> bytes:
    (image,) = generator.render([sampling_job])
    return image.data


@pytest.mark.parametrize("sampler", supported_samplers())
def test_rerunning_an_images_parameters_reproduces_its_pixels(
    generator: FluxGenerator, sampler: str
) -> None:
    # Bit for bit when made the same way (alone, both times); lcm adds noise at every step.
    assert render_one(generator, job(sampler=sampler)) == render_one(
        generator, job(sampler=sampler)
    )


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"seed": 12}, id="seed"),
        pytest.param({"steps": 2}, id="steps"),
        pytest.param({"sampler": "dpmpp_2m"}, id="sampler"),
        pytest.param({"cfg_scale": 3.5}, id="cfg_scale"),
    ],
)
def test_changing_one_parameter_changes_the_pixels(
    generator: FluxGenerator, change: dict[str, object]
) -> None:
    assert (
        mean_abs_difference(render_one(generator, job()), render_one(generator, job(**change)))
        > 0.5
    )


def test_cfg_above_one_runs_true_guidance_against_the_negative_prompt(
    generator: FluxGenerator,
) -> None:
    assert generator.guidance_distilled is False  # schnell-like: no guidance embedding
    guided = job(cfg_scale=3.0)
    arguments = generator.pipeline_arguments([guided])
    assert arguments["true_cfg_scale"] == 3.0
    # The empty negative prompt's embeddings: guidance runs against them.
    (empty,) = generator.prompts.embeddings([""], generator.settings.native.max_sequence_length)
    assert torch.equal(arguments["negative_prompt_embeds"], empty.sequence)
    with_negative = render_one(generator, job(cfg_scale=3.0, negative_prompt="a dog"))
    assert mean_abs_difference(render_one(generator, guided), with_negative) > 0.5
    # Without guidance the negative prompt is not used at all.
    assert render_one(generator, job(negative_prompt="a dog")) == render_one(generator, job())


@pytest.mark.parametrize("sampler", supported_samplers())
def test_every_sampler_makes_an_image_of_the_requested_size(
    generator: FluxGenerator, sampler: str
) -> None:
    data = render_one(generator, job(sampler=sampler, width=192, height=128))
    image = Image.open(io.BytesIO(data))
    assert (image.format, image.size) == ("PNG", (192, 128))


ONE_REQUEST = [{"index": i, "seed": 100 + i} for i in range(3)]
# Jobs of other requests share a batch: their prompts and negative prompts differ.
THREE_REQUESTS = [
    {"index": 0, "seed": 100},
    {"index": 0, "seed": 100, "prompt": "a blue dog"},
    {"index": 5, "seed": 7, "prompt": "a green car"},
]
TRUE_GUIDANCE = [
    {"index": 0, "seed": 100, "cfg_scale": 3.0, "negative_prompt": "a dog"},
    {"index": 1, "seed": 100, "cfg_scale": 3.0, "prompt": "a blue dog", "negative_prompt": "a cat"},
    {"index": 2, "seed": 100, "cfg_scale": 3.0, "prompt": "a green car"},
]


@pytest.mark.parametrize(
    ("sampler", "batch"),
    [
        pytest.param("euler", ONE_REQUEST, id="one-request"),
        pytest.param("euler", TRUE_GUIDANCE, id="true-guidance-three-requests"),
        *(
            pytest.param(sampler, THREE_REQUESTS, id=f"three-requests-{sampler}")
            for sampler in supported_samplers()
        ),
    ],
)
def test_an_image_made_in_a_batch_matches_it_made_alone(
    generator: FluxGenerator, batch: list[dict[str, Any]], sampler: str
) -> None:
    jobs = [job(sampler=sampler, **fields) for fields in batch]
    together = generator.render(jobs)
    for sampling_job, rendered in zip(jobs, together, strict=True):
        assert rendered.job == sampling_job
        # What README.md promises: the same image, each pixel value within 1 of 255 (the float
        # sums of a batch run in another order than alone's, the noise is the same).
        assert max_abs_difference(rendered.data, render_one(generator, sampling_job)) <= 1
    # Each image is its own prompt's: the same seed under another prompt gives other pixels.
    assert mean_abs_difference(together[0].data, together[1].data) > 0.5


def test_a_mixed_batch_is_refused(generator: FluxGenerator) -> None:
    with pytest.raises(ValueError, match="batch key"):
        generator.render([job(), job(steps=2)])
