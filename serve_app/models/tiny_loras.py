"""LoRA adapters made locally for a FLUX transformer: random, deterministic, strong enough to see.

They are diffusers LoRA files (the layout of ``FluxPipeline.save_lora_weights``, which trainers
write and ``load_lora_weights`` reads), so a user's own adapters and these take one loading path.
A random adapter initialized as peft does moves pixels by well under one level of 255, so these
are drawn at a ``strength`` that changes an image visibly at scale 1.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# Only the layers inside the blocks: what LoRA trainers adapt.
_BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")


@dataclass(frozen=True)
class LoraSpec:
    """One adapter to make: which layers (by their last names), its rank, alpha and size."""

    name: str
    targets: tuple[str, ...]
    rank: int
    alpha: float
    strength: float
    """Standard deviation of every entry of A and B."""
    seed: int


ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
CONTEXT = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
MLP = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp")

TINY_LORAS = (
    LoraSpec("tiny-attention", ATTENTION, rank=4, alpha=4.0, strength=0.5, seed=1),
    LoraSpec("tiny-context", CONTEXT, rank=4, alpha=4.0, strength=0.5, seed=2),
    LoraSpec("tiny-mlp", MLP, rank=8, alpha=4.0, strength=0.5, seed=3),
    LoraSpec("tiny-everything", ATTENTION + CONTEXT + MLP, rank=2, alpha=2.0, strength=0.4, seed=4),
)


def _targeted(transformer: Any, targets: tuple[str, ...]) -> list[tuple[str, torch.nn.Linear]]:
    return [
        (name, module)
        for name, module in transformer.named_modules()
        if isinstance(module, torch.nn.Linear)
        and name.startswith(_BLOCKS)
        and any(name.endswith(f".{target}") for target in targets)
    ]


def lora_weights(transformer: Any, spec: LoraSpec) -> dict[str, torch.Tensor]:
    """The adapter's tensors, named as diffusers saves them for ``transformer``."""
    generator = torch.Generator("cpu").manual_seed(spec.seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in _targeted(transformer, spec.targets):
        shape_a, shape_b = (spec.rank, module.in_features), (module.out_features, spec.rank)
        tensors[f"{name}.lora_A.weight"] = torch.randn(shape_a, generator=generator) * spec.strength
        tensors[f"{name}.lora_B.weight"] = torch.randn(shape_b, generator=generator) * spec.strength
    if not tensors:
        raise ValueError(f"{spec.name}: the transformer has none of the layers {spec.targets}")
    return tensors


def write_lora(transformer: Any, directory: Path, spec: LoraSpec) -> Path:
    """Write ``spec`` for ``transformer`` as ``<directory>/<name>.safetensors``."""
    from safetensors.torch import save_file

    tensors = lora_weights(transformer, spec)
    config = {
        "transformer.r": spec.rank,
        "transformer.lora_alpha": spec.alpha,
        "transformer.target_modules": sorted({key.rsplit(".lora_", 1)[0] for key in tensors}),
    }
    path = directory / f"{spec.name}.safetensors"
    # What FluxPipeline.save_lora_weights writes, but with one metadata entry only: safetensors
    # writes several in a random order, and the files must come out the same every time.
    save_file(
        {f"transformer.{key}": tensor for key, tensor in tensors.items()},
        path,
        metadata={"lora_adapter_metadata": json.dumps(config, sort_keys=True)},
    )
    return path


def write_loras(transformer: Any, directory: Path, specs: tuple[LoraSpec, ...]) -> Path:
    """Write every adapter of ``specs`` into ``directory``: an adapter library."""
    directory.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        write_lora(transformer, directory, spec)
    return directory
