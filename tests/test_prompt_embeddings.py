"""Prompts are encoded once per distinct text and reused, and the images stay bit-identical."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from serve_app.generation.pipeline import FluxGenerator
from serve_app.generation.planning import SamplingJob
from serve_app.generation.prompts import PromptCache, PromptEmbedding
from serve_app.schemas import SamplingParams
from serve_app.settings import ServiceSettings


def job(
    index: int, prompt: str, negative_prompt: str | None = None, cfg: float = 1.0
) -> SamplingJob:
    params = SamplingParams(
        sampler="euler", steps=2, cfg_scale=cfg, seed=100 + index, width=64, height=64
    )
    return SamplingJob(index=index, prompt=prompt, negative_prompt=negative_prompt, params=params)


class EncoderCalls:
    """Counts the forward passes of a generator's text encoders and the texts they encode."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, generator: FluxGenerator) -> None:
        self.calls: Counter[str] = Counter()
        self.texts: Counter[str] = Counter()
        for name in ("text_encoder", "text_encoder_2"):
            encoder = getattr(generator.pipeline, name)
            monkeypatch.setattr(encoder, "forward", self._counting(name, encoder.forward))

    def _counting(self, name: str, forward: Callable[..., Any]) -> Callable[..., Any]:
        def counted(input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            self.texts[name] += input_ids.shape[0]
            return forward(input_ids, *args, **kwargs)

        return counted


@pytest.fixture
def fresh(settings: ServiceSettings) -> FluxGenerator:
    """A generator whose prompt cache is empty."""
    return FluxGenerator(settings.model_copy(update={"warmup": False}))


def pixels(images: list[Any]) -> list[np.ndarray]:
    return [np.asarray(image) for image in images]


def with_prompt_strings(generator: FluxGenerator, batch: list[SamplingJob]) -> list[np.ndarray]:
    """The images of ``batch`` as the pipeline makes them when handed the prompts as text (the
    generator's prompt cache is emptied again afterwards)."""
    arguments = {
        name: value
        for name, value in generator.pipeline_arguments(batch).items()
        if "prompt_embeds" not in name
    }
    arguments["prompt"] = [sampling_job.prompt for sampling_job in batch]
    arguments["max_sequence_length"] = generator.settings.native.max_sequence_length
    if "true_cfg_scale" in arguments:
        arguments["negative_prompt"] = [j.negative_prompt or "" for j in batch]
    images = pixels(generator._run(batch[0].params.sampler, arguments, cancelled=None))
    generator.prompts.cache = PromptCache(generator.settings.prompt_cache_size)
    return images


def test_a_request_runs_each_text_encoder_once_for_its_prompt(
    fresh: FluxGenerator, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches = [[job(index, "a red cat") for index in range(start, start + 4)] for start in (0, 4)]
    reference = [with_prompt_strings(fresh, batch) for batch in batches]
    calls = EncoderCalls(monkeypatch, fresh)
    made = [pixels(fresh.sample(batch)) for batch in batches]
    # Once for one text, for 8 images in two batches (the pipeline ran them 8 times).
    assert calls.calls == calls.texts == {"text_encoder": 1, "text_encoder_2": 1}
    for images, expected in zip(made, reference, strict=True):
        for image, reference_image in zip(images, expected, strict=True):
            assert np.array_equal(image, reference_image)


def test_true_guidance_encodes_each_distinct_prompt_and_negative_prompt_once(
    fresh: FluxGenerator, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = [
        job(0, "a red cat", "a dog", cfg=3.0),
        job(1, "a red cat", "a dog", cfg=3.0),
        job(2, "a blue dog", cfg=3.0),  # against the empty negative prompt
        job(3, "a red cat", cfg=3.0),
    ]
    reference = with_prompt_strings(fresh, batch)
    calls = EncoderCalls(monkeypatch, fresh)
    made = pixels(fresh.sample(batch))
    # One pass of each encoder over the four distinct texts: two prompts, "a dog" and "".
    assert calls.calls == {"text_encoder": 1, "text_encoder_2": 1}
    assert calls.texts == {"text_encoder": 4, "text_encoder_2": 4}
    for image, reference_image in zip(made, reference, strict=True):
        assert np.array_equal(image, reference_image)
    # A later batch with a new prompt encodes only that one.
    fresh.sample([job(4, "a green car", "a dog", cfg=3.0)])
    assert calls.texts == {"text_encoder": 5, "text_encoder_2": 5}


def embedding(value: float) -> PromptEmbedding:
    return PromptEmbedding(sequence=torch.full((1, 2, 3), value), pooled=torch.full((1, 3), value))


def test_prompt_cache_forgets_the_least_recently_used_text() -> None:
    cache = PromptCache(capacity=2)
    cache.put(("a", 256), embedding(1.0))
    cache.put(("b", 256), embedding(2.0))
    assert cache.get(("a", 256)) is not None  # "a" is now the most recently used
    cache.put(("c", 256), embedding(3.0))
    assert cache.get(("b", 256)) is None
    assert len(cache) == 2
    found = cache.get(("a", 256))
    assert found is not None
    assert float(found.pooled[0, 0]) == 1.0
    # The sequence length is part of the key: the same text padded otherwise is another entry.
    assert cache.get(("a", 512)) is None


def test_a_cache_of_size_zero_keeps_nothing_but_a_batch_still_encodes_each_text_once(
    settings: ServiceSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    generator = FluxGenerator(settings.model_copy(update={"warmup": False, "prompt_cache_size": 0}))
    calls = EncoderCalls(monkeypatch, generator)
    batch = [job(index, "a red cat") for index in range(3)]
    generator.sample(batch)
    generator.sample(batch)
    assert calls.texts == {"text_encoder": 2, "text_encoder_2": 2}
    assert len(generator.prompts.cache) == 0
