"""FLUX_SERVE_QUANTIZE on the real pipeline: int8 weights on a CPU, fp8 only where a GPU has it."""

from __future__ import annotations

import pytest
import torch

from serve_app.generation import quantization
from serve_app.generation.pipeline import FluxGenerator
from serve_app.settings import ServiceSettings

from .images import mean_abs_difference
from .test_speedups import JOBS


def linear_weights(module: torch.nn.Module) -> list[torch.Tensor]:
    return [layer.weight for layer in module.modules() if isinstance(layer, torch.nn.Linear)]


def test_int8_weight_only_quantizes_every_transformer_linear_and_moves_images_a_little(
    settings: ServiceSettings, generator: FluxGenerator
) -> None:
    quantized = FluxGenerator(
        settings.model_copy(update={"quantize": "int8_weight_only", "warmup": False})
    )
    transformer_weights = linear_weights(quantized.pipeline.transformer)
    assert transformer_weights
    assert {type(weight).__name__ for weight in transformer_weights} == {"Int8Tensor"}
    assert all(weight.dtype == torch.float32 for weight in transformer_weights)  # as it computes
    # Only the transformer: the text encoders keep their weights.
    assert all(
        type(weight) is torch.nn.Parameter
        for weight in linear_weights(quantized.pipeline.text_encoder_2)
    )
    assert all(
        type(weight) is torch.nn.Parameter
        for weight in linear_weights(generator.pipeline.transformer)
    )
    first, again = quantized.render(JOBS), quantized.render(JOBS)
    for plain, made, remade in zip(generator.render(JOBS), first, again, strict=True):
        assert made.data == remade.data  # still deterministic
        assert 0.0 < mean_abs_difference(plain.data, made.data) <= 2.0


def test_fp8_on_a_cpu_is_refused_at_start_naming_the_setting(settings: ServiceSettings) -> None:
    with pytest.raises(ValueError, match=r"FLUX_SERVE_QUANTIZE=fp8 needs .* 8\.9 .* on cpu"):
        FluxGenerator(settings.model_copy(update={"quantize": "fp8", "warmup": False}))


@pytest.mark.parametrize(
    ("capability", "problem", "granularity"),
    [
        pytest.param((8, 0), "compute capability 8.0, below 8.9", None, id="a100"),
        pytest.param((8, 9), None, "PerTensor", id="ada"),
        pytest.param((9, 0), None, "PerRow", id="hopper"),
    ],
)
def test_fp8_needs_ada_or_newer_and_takes_rowwise_scales_on_hopper(
    monkeypatch: pytest.MonkeyPatch,
    capability: tuple[int, int],
    problem: str | None,
    granularity: str | None,
) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda _device: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda _device: "a GPU")
    gpu = torch.device("cuda", 0)
    found = quantization.fp8_problem(gpu)
    if problem is None:
        assert found is None
        config = quantization.quantization_config("fp8", gpu)
        assert {type(part).__name__ for part in config.granularity} == {granularity}
    else:
        assert found is not None
        assert problem in found
        with pytest.raises(ValueError, match="FLUX_SERVE_QUANTIZE=fp8"):
            quantization.quantization_config("fp8", gpu)
