"""The benchmark's model presets: FLUX pipelines of three sizes, random weights, built locally.

Every preset is a FluxPipeline folder that the service loads through its normal
``from_pretrained`` path (``FLUX_SERVE_MODEL=<folder>``). The larger presets take the embedded tiny
model's tokenizers, scheduler and any component they do not replace, so only the parts that set the
cost differ. Weights come from a fixed seed: building twice gives identical files.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from serve_app.models.tiny import (
    _CLIP_MAX_TOKENS,
    _HIDDEN,
    TINY_FLUX_NAME,
    _clip_text_config,
    _flux_pipeline,
    ensure_tiny_model,
)

logger = logging.getLogger(__name__)

_SEED = 20260202
# FLUX.1's T5 vocabulary; the tiny tokenizers use only its first few dozen ids.
_T5_VOCAB = 32128
_CLIP_VOCAB = 49408


def _small_components() -> dict[str, Any]:
    """A bigger transformer over the tiny text encoders and VAE: sampling dominates the cost.

    About 0.2 s per 256x256 image in 4 steps on 2 CPU cores, three quarters of it in the
    transformer.
    """
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=3,
        attention_head_dim=64,
        num_attention_heads=4,
        joint_attention_dim=_HIDDEN,  # the tiny T5's d_model
        pooled_projection_dim=_HIDDEN,  # the tiny CLIP's hidden size
        guidance_embeds=False,
        axes_dims_rope=(16, 24, 24),
    )
    return {"transformer": transformer}


@dataclass(frozen=True)
class SchnellDepth:
    """How many of FLUX.1-schnell's blocks a preset keeps; every block keeps its full width."""

    double_blocks: int = 19
    single_blocks: int = 38
    t5_layers: int = 24

    def components(self) -> dict[str, Any]:
        """FLUX.1-schnell's architecture at this depth: transformer, VAE, CLIP-L and T5-XXL."""
        return _schnell_components(self)


def _schnell_components(depth: SchnellDepth) -> dict[str, Any]:
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    # The diffusers defaults are FLUX.1's widths: 24 heads of 128, 3072 wide.
    transformer = FluxTransformer2DModel(
        num_layers=depth.double_blocks,
        num_single_layers=depth.single_blocks,
        guidance_embeds=False,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=16,
        norm_num_groups=32,
        sample_size=1024,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    clip_l = {
        **_clip_text_config(_CLIP_VOCAB),  # keeps the tiny tokenizer's special token ids
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": _CLIP_MAX_TOKENS,
        "projection_dim": 768,
        "hidden_act": "quick_gelu",
    }
    t5_xxl = T5Config(
        vocab_size=_T5_VOCAB,
        d_model=4096,
        d_kv=64,
        d_ff=10240,
        num_layers=depth.t5_layers,
        num_heads=64,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6,
        tie_word_embeddings=False,
    )
    return {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": CLIPTextModel(CLIPTextConfig(**clip_l)),
        "text_encoder_2": T5EncoderModel(t5_xxl),
    }


@dataclass(frozen=True)
class Preset:
    """A model size the benchmark runs: what it is, and the components it puts in the tiny FLUX."""

    name: str
    folder: str
    description: str
    components: Callable[[], dict[str, Any]]
    build_dtype: torch.dtype = torch.float32
    reduced: Preset | None = None
    """What runs instead on a machine that can't hold this preset (a CPU one): the same
    architecture at a size it can, so that every code path still runs there."""


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        "tiny", TINY_FLUX_NAME, "the embedded tiny FLUX (serve_app/models/tiny.py)", dict
    ),
    "small": Preset(
        "small",
        "bench-small-flux-v1",
        "FLUX with a 6 M parameter transformer (1 double + 3 single blocks, 4 heads of 64)",
        _small_components,
    ),
    "full": Preset(
        "full",
        "bench-full-flux-v1",
        "FLUX.1-schnell's architecture (12 B transformer, T5-XXL, CLIP-L, 16-channel VAE)",
        SchnellDepth().components,
        # Saved as the released weights are; the service casts to its own dtype when loading.
        build_dtype=torch.bfloat16,
        reduced=Preset(
            "full (reduced)",
            "bench-full-reduced-flux-v1",
            "FLUX.1-schnell's architecture at reduced depth: 1 of its 19 double and 1 of its 38 "
            "single blocks, 1 of T5-XXL's 24 layers, every block at full width; CLIP-L and the "
            "VAE whole",
            SchnellDepth(double_blocks=1, single_blocks=1, t5_layers=1).components,
            build_dtype=torch.bfloat16,
        ),
    ),
}


def build_pipeline(preset: Preset, dtype: torch.dtype | None = None) -> Any:
    """The preset's FluxPipeline in memory (on the meta device when built under one), in
    ``dtype`` (default: the preset's own)."""
    from diffusers import FluxPipeline

    tiny = _flux_pipeline()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype or preset.build_dtype)
    try:
        torch.manual_seed(_SEED)
        replaced = preset.components()
    finally:
        torch.set_default_dtype(previous)
    return FluxPipeline(**{**tiny.components, **replaced})


def build_on(preset: Preset, device: torch.device, dtype: torch.dtype) -> Any:
    """The preset's pipeline made in place on ``device`` in ``dtype``, never saved: random
    weights drawn on a GPU take seconds for FLUX.1-schnell's 17 B parameters, where drawing them
    on a CPU and saving them takes minutes."""
    with torch.device(device):
        return build_pipeline(preset, dtype)


def parameter_counts(preset: Preset) -> dict[str, int]:
    """Parameters of each model component, counted on the meta device (no memory needed)."""
    with torch.device("meta"):
        pipeline = build_pipeline(preset)
    return {
        name: sum(parameter.numel() for parameter in component.parameters())
        for name, component in pipeline.components.items()
        if isinstance(component, torch.nn.Module)
    }


def build_preset(preset: Preset, directory: Path) -> Path:
    """Write the preset's pipeline (FluxPipeline layout) into ``directory``."""
    build_pipeline(preset).save_pretrained(directory, safe_serialization=True)
    return directory


def ensure_preset(preset: Preset, cache_dir: Path) -> Path:
    """The preset's folder in ``cache_dir``, built on first use (renamed into place when whole)."""
    if preset.folder == TINY_FLUX_NAME:
        return ensure_tiny_model(TINY_FLUX_NAME, cache_dir)
    target = cache_dir / preset.folder
    if target.is_dir():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{preset.folder}-", dir=cache_dir))
    try:
        os.rename(build_preset(preset, staging), target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _gib(count: float) -> str:
    return f"{count / 2**30:.1f} GiB"


def available_memory_bytes() -> int:
    """Memory the kernel can give without swapping (MemAvailable), in bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable line")


def shortfall(
    preset: Preset,
    device: torch.device,
    dtype: torch.dtype,
    cache_dir: Path,
    *,
    in_place: bool = False,
) -> str | None:
    """Why this machine cannot run ``preset`` on ``device`` in ``dtype``; None when it can.

    Counts the weights only (activations at small sizes are comparatively little): one copy in
    host memory while building, one copy on the device while running. Built ``in_place``
    (build_on), nothing goes to disk or through host memory on the way to a GPU.
    """
    parameters = sum(parameter_counts(preset).values())
    built = in_place or (cache_dir / preset.folder).is_dir()
    build_bytes = 0 if built else parameters * preset.build_dtype.itemsize
    run_bytes = parameters * dtype.itemsize
    problems = []
    existing = next(folder for folder in (cache_dir, *cache_dir.parents) if folder.exists())
    if not built and shutil.disk_usage(existing).free < build_bytes:
        problems.append(f"{_gib(build_bytes)} of disk under {cache_dir} to build it")
    host_bytes = max(build_bytes, run_bytes if device.type == "cpu" else 0)
    if host_bytes > available_memory_bytes():
        problems.append(
            f"{_gib(host_bytes)} of memory, and {_gib(available_memory_bytes())} is available"
        )
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        if run_bytes > total:
            problems.append(
                f"{_gib(run_bytes)} of GPU memory in {dtype}, and the GPU has {_gib(total)}"
            )
    if not problems:
        return None
    return (
        f"preset {preset.name!r} ({parameters / 1e9:.1f} B parameters) cannot run here on "
        f"{device.type} in {dtype}: it needs " + "; ".join(problems) + ". It is meant for a GPU "
        "(bfloat16); run it there, e.g. bench/run.sh --preset full --size 1024."
    )


def runnable_preset(
    preset: Preset,
    device: torch.device,
    dtype: torch.dtype,
    cache_dir: Path,
    *,
    in_place: bool = False,
) -> tuple[Preset, str | None]:
    """``preset``, or its reduced size where this machine can't hold it; with the reason it
    can't run at all, if none fits."""
    problem = shortfall(preset, device, dtype, cache_dir, in_place=in_place)
    if problem and preset.reduced is not None:
        logger.warning(
            "%s Running it at reduced size instead: %s.", problem, preset.reduced.description
        )
        return runnable_preset(preset.reduced, device, dtype, cache_dir, in_place=in_place)
    return preset, problem
