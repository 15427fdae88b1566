"""The lossless speed-ups of diffusers and PyTorch, each a setting, applied to a loaded pipeline.

None changes what a seed makes beyond floating-point rounding (tests/test_speedups.py holds them
to it on the tiny model); bench/ measures what each one gains. They pay on GPUs; on a CPU most
do little, and compiling costs time at start.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from serve_app.settings import ServiceSettings

logger = logging.getLogger(__name__)


def enabled_speedups(settings: ServiceSettings) -> list[str]:
    """The speed-ups ``settings`` turn on, by name, for logs and benchmark tables."""
    names = []
    if settings.fuse_qkv:
        names.append("fused QKV")
    if settings.channels_last_vae:
        names.append("channels-last VAE")
    if settings.attention_backend:
        names.append(f"attention {settings.attention_backend}")
    if settings.compile_mode != "off":
        scope = " (blocks)" if settings.compile_scope == "blocks" else ""
        names.append(f"compile {settings.compile_mode}{scope}")
    return names


def apply_speedups(pipeline: Any, settings: ServiceSettings) -> None:
    """Turn on in ``pipeline`` every speed-up ``settings`` ask for but compiling, which
    compile_pipeline does last (after quantization, so that it compiles the final model)."""
    if settings.fuse_qkv:
        # One matmul for query, key and value instead of three, in the transformer and the VAE.
        pipeline.transformer.fuse_qkv_projections()
        pipeline.vae.fuse_qkv_projections()
    if settings.channels_last_vae:
        # The VAE is convolutions, whose GPU kernels are fastest on channels-last memory.
        pipeline.vae.to(memory_format=torch.channels_last)
    if settings.attention_backend:
        try:
            pipeline.transformer.set_attention_backend(settings.attention_backend)
        except (ValueError, ImportError, RuntimeError) as error:
            raise ValueError(
                f"attention backend {settings.attention_backend!r} (FLUX_SERVE_ATTENTION_BACKEND) "
                f"can't be used here: {error}"
            ) from error
    if names := enabled_speedups(settings):
        logger.info("speed-ups: %s", ", ".join(names))


def compile_pipeline(pipeline: Any, settings: ServiceSettings) -> None:
    """torch.compile transformer and decoder in ``settings.compile_mode``, if any (compiling
    happens lazily, at the first call of each shape)."""
    if settings.compile_mode != "off":
        # In place, so the pipeline still sees a FluxTransformer2DModel; the decoder as flux-fast
        # does it. fullgraph: a graph break would silently give back most of the gain.
        if settings.compile_scope == "blocks":
            # Each transformer block compiles once and serves all blocks of its kind.
            pipeline.transformer.compile_repeated_blocks(mode=settings.compile_mode, fullgraph=True)
        else:
            pipeline.transformer.compile(mode=settings.compile_mode, fullgraph=True)
        pipeline.vae.decode = torch.compile(
            pipeline.vae.decode, mode=settings.compile_mode, fullgraph=True
        )
