"""Each speed-up setting runs on the real pipeline and leaves the images as they were."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from serve_app.generation.pipeline import FluxGenerator
from serve_app.generation.planning import SamplingJob
from serve_app.generation.speedups import enabled_speedups
from serve_app.schemas import SamplingParams
from serve_app.settings import ServiceSettings

from .images import mean_abs_difference

JOBS = [
    SamplingJob(
        index=index,
        prompt=prompt,
        negative_prompt=None,
        params=SamplingParams(
            sampler="euler", steps=2, cfg_scale=1.0, seed=index, width=64, height=64
        ),
    )
    for index, prompt in enumerate(["a red cat", "a blue dog"])
]


def attention_modules(pipeline: Any) -> list[Any]:
    return [module for module in pipeline.transformer.modules() if hasattr(module, "processor")]


def fused(pipeline: Any) -> bool:
    return all(module.fused_projections for module in attention_modules(pipeline))


def channels_last(pipeline: Any) -> bool:
    weight = pipeline.vae.decoder.conv_in.weight
    return bool(weight.is_contiguous(memory_format=torch.channels_last))


def native_attention(pipeline: Any) -> bool:
    backends = {module.processor._attention_backend for module in attention_modules(pipeline)}
    return backends == {"native"}


def compiled(pipeline: Any) -> bool:
    return pipeline.transformer._compiled_call_impl is not None


@pytest.mark.parametrize(
    ("speedup", "name", "applied"),
    [
        pytest.param({"fuse_qkv": True}, "fused QKV", fused, id="fuse-qkv"),
        pytest.param(
            {"channels_last_vae": True}, "channels-last VAE", channels_last, id="channels-last"
        ),
        pytest.param(
            {"attention_backend": "native"}, "attention native", native_attention, id="attention"
        ),
        # The slowest test here: inductor compiles transformer and decoder for the CPU.
        pytest.param({"compile_mode": "default"}, "compile default", compiled, id="compile"),
    ],
)
def test_a_speedup_makes_the_same_images(
    settings: ServiceSettings,
    generator: FluxGenerator,
    speedup: dict[str, object],
    name: str,
    applied: Callable[[Any], bool],
) -> None:
    faster_settings = settings.model_copy(update={**speedup, "warmup": False})
    assert enabled_speedups(faster_settings) == [name]
    faster = FluxGenerator(faster_settings)
    assert applied(faster.pipeline)
    assert not applied(generator.pipeline)
    for plain, sped_up in zip(generator.render(JOBS), faster.render(JOBS), strict=True):
        assert mean_abs_difference(plain.data, sped_up.data) <= 1.0


def test_an_unusable_attention_backend_is_refused_naming_the_setting(
    settings: ServiceSettings,
) -> None:
    bad = settings.model_copy(update={"attention_backend": "warp-drive", "warmup": False})
    with pytest.raises(ValueError, match="FLUX_SERVE_ATTENTION_BACKEND"):
        FluxGenerator(bad)


def test_compiling_by_blocks_compiles_each_repeated_block_not_the_whole_transformer(
    settings: ServiceSettings,
) -> None:
    by_blocks = settings.model_copy(
        update={"compile_mode": "default", "compile_scope": "blocks", "warmup": False}
    )
    assert enabled_speedups(by_blocks) == ["compile default (blocks)"]
    transformer = FluxGenerator(by_blocks).pipeline.transformer  # compiling waits for a call
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    assert all(block._compiled_call_impl is not None for block in blocks)
    assert transformer._compiled_call_impl is None
