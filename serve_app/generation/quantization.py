"""Quantization of the FLUX transformer with torchao, as a setting (lossy, unlike speedups.py).

The transformer holds nearly all the sampling cost, and its linear layers nearly all of that:
only they are quantized, in place, after loading and before compiling (so that the compiled
graph is the quantized one). bench/ reports how far each mode moves the images.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from serve_app.settings import ServiceSettings

logger = logging.getLogger(__name__)

# float8 matrix products (torch._scaled_mm) need Ada or Hopper tensor cores; rowwise scales,
# the more accurate ones, need Hopper.
_FP8_CAPABILITY = (8, 9)
_FP8_ROWWISE_CAPABILITY = (9, 0)


def quiet_torchao_import() -> None:
    """Silence what importing torchao (which diffusers does) logs but nobody can act on: on a CPU
    build of torch, one warning per CUDA kernel library it can't load; and anywhere, torch's
    deprecation notes on how it registers its types, and diffusers' on types of older torchao."""
    names = ["torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"]
    if not torch.cuda.is_available():
        names.append("torchao")
    for name in names:
        logging.getLogger(name).setLevel(logging.ERROR)


def fp8_problem(device: torch.device) -> str | None:
    """Why float8 can't run on ``device``; None when it can."""
    if device.type != "cuda":
        return f"this replica computes on {device.type}, not on a GPU"
    capability = torch.cuda.get_device_capability(device)
    if capability < _FP8_CAPABILITY:
        return (
            f"{torch.cuda.get_device_name(device)} has compute capability "
            f"{capability[0]}.{capability[1]}, below {_FP8_CAPABILITY[0]}.{_FP8_CAPABILITY[1]}"
        )
    return None


def quantization_config(mode: str, device: torch.device) -> Any:
    """torchao's configuration for ``mode`` on ``device``; ValueError where it can't run."""
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int8WeightOnlyConfig,
        PerRow,
        PerTensor,
    )

    # set_inductor_config=False: torchao would otherwise change torch.compile's settings for the
    # whole process (slower compiling, and every later compile in a benchmark run affected).
    if mode == "int8_weight_only":
        return Int8WeightOnlyConfig(set_inductor_config=False)
    if mode == "fp8":
        if problem := fp8_problem(device):
            raise ValueError(
                "FLUX_SERVE_QUANTIZE=fp8 needs an NVIDIA GPU of compute capability 8.9 or newer "
                f"(L4, L40S, H100, H200): {problem}. Use int8_weight_only or none here."
            )
        rowwise = torch.cuda.get_device_capability(device) >= _FP8_ROWWISE_CAPABILITY
        return Float8DynamicActivationFloat8WeightConfig(
            granularity=PerRow() if rowwise else PerTensor(), set_inductor_config=False
        )
    raise ValueError(f"unknown quantization mode {mode!r} (FLUX_SERVE_QUANTIZE)")


def quantize_transformer(pipeline: Any, settings: ServiceSettings, device: torch.device) -> None:
    """Quantize ``pipeline``'s transformer in place as ``settings.quantize`` says."""
    if settings.quantize == "none":
        return
    config = quantization_config(settings.quantize, device)
    from torchao.quantization import quantize_

    quantize_(pipeline.transformer, config)
    logger.info("transformer quantized: %s", settings.quantize)
