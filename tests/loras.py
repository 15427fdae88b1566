"""Adapter libraries for the tests: the tiny LoRAs, and files a library should refuse."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from serve_app.models.tiny import TINY_LORAS_NAME, ensure_tiny_model
from serve_app.settings import ServiceSettings

ATTENTION = "tiny-attention"
MLP = "tiny-mlp"
CONTEXT = "tiny-context"
EVERYTHING = "tiny-everything"


def lora_tensors(modules: dict[str, tuple[int, int]], rank: int) -> dict[str, torch.Tensor]:
    """Diffusers-layout LoRA tensors for ``modules`` (name: (in, out)), from a fixed seed."""
    generator = torch.Generator().manual_seed(5)
    tensors = {}
    for module, (in_features, out_features) in modules.items():
        prefix = f"transformer.{module}"
        tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator)
        tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator)
    return tensors


# Files that are not usable adapters here, each with the words its refusal must contain.
BAD_FILES: dict[str, tuple[dict[str, torch.Tensor], str]] = {
    "text-encoder": (
        {
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(
                4, 32
            ),
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(
                32, 4
            ),
        },
        "text encoder",
    ),
    "not-a-lora": (
        {"transformer_blocks.0.attn.to_q.weight": torch.ones(32, 32)},
        "not a diffusers/peft FLUX LoRA",
    ),
    "kohya": (
        {
            "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.ones(4, 32),
            "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.ones(96, 4),
        },
        "not a diffusers/peft FLUX LoRA",
    ),
    "rank-mismatch": (
        {
            "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.ones(4, 32),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.ones(32, 8),
        },
        "rank",
    ),
    "half-a-layer": (
        {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.ones(4, 32)},
        "no lora_B weight",
    ),
    "too-high-rank": (
        lora_tensors({"transformer_blocks.0.attn.to_q": (32, 32)}, rank=128),
        "FLUX_SERVE_LORA_MAX_RANK",
    ),
}

# A well-formed LoRA for a wider FLUX: only the worker, which has the model, can tell it misfits.
MISFIT = "wider-model"
MISFIT_TENSORS = lora_tensors({"transformer_blocks.0.attn.to_q": (64, 64)}, rank=4)


def write_adapter(folder: Path, name: str, tensors: dict[str, torch.Tensor]) -> Path:
    """One adapter file in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.safetensors"
    save_file({key: tensor.contiguous() for key, tensor in tensors.items()}, path)
    return path


def tiny_library(settings: ServiceSettings, folder: Path) -> Path:
    """A copy of the tiny model's adapter library in ``folder``."""
    shutil.copytree(ensure_tiny_model(TINY_LORAS_NAME, settings.cache_dir), folder)
    return folder


def mixed_library(settings: ServiceSettings, folder: Path) -> Path:
    """The tiny LoRAs, every bad file, the misfit and a file that is not safetensors at all."""
    tiny_library(settings, folder)
    for name, (tensors, _) in BAD_FILES.items():
        write_adapter(folder, name, tensors)
    write_adapter(folder, MISFIT, MISFIT_TENSORS)
    (folder / "garbage.safetensors").write_bytes(json.dumps({"no": "header"}).encode())
    return folder
