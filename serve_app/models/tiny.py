"""Tiny FLUX, its LoRAs and CLIP built locally: real diffusers/transformers classes, random weights.

They are the embedded default and the test models: saved to disk and then loaded through the very
same ``from_pretrained`` path as the production weights, so nothing downstream knows the difference.
Their images are noise. Weights come from a fixed seed, so building twice gives identical files.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from serve_app.models.image_processors import use_pil_image_processors

TINY_FLUX_NAME = "tiny-flux-v1"
TINY_CLIP_NAME = "tiny-clip-v1"
TINY_LORAS_NAME = "tiny-flux-loras-v1"
_SEED = 20260101
_HIDDEN = 32
_CLIP_MAX_TOKENS = 77

# A small, fixed word list gives the byte-level BPE some merges, so that prompts tokenize into
# a handful of word tokens rather than only single bytes.
_WORDS = ("a", "the", "red", "cat", "dog", "photo", "of", "on", "in", "blue", "sky", "city")


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table, which CLIP's BPE expects."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(code) for code in codes), strict=True))


def _clip_tokenizer() -> Any:
    from transformers import CLIPTokenizer

    symbols = sorted(_byte_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in ("<|startoftext|>", "<|endoftext|>", *symbols, *(s + "</w>" for s in symbols)):
        vocab.setdefault(token, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in _WORDS:
        # Merge each word left to right: "c a t</w>" -> "ca t</w>" -> "cat</w>".
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            merged = pair[0] + pair[1]
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(merged, len(vocab))
            pieces = [merged, *pieces[2:]]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=_CLIP_MAX_TOKENS)


def _t5_tokenizer() -> Any:
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(chr(code), -5.0) for code in range(ord("a"), ord("z") + 1)]
    pieces += [("▁" + word, -3.0) for word in _WORDS]
    pieces += [(f"<extra_id_{i}>", 0.0) for i in range(3, -1, -1)]
    return T5TokenizerFast(vocab=pieces, extra_ids=4, model_max_length=512)


def _clip_text_config(vocab_size: int) -> dict[str, int]:
    return {
        "vocab_size": vocab_size,
        "hidden_size": _HIDDEN,
        "intermediate_size": 37,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": _CLIP_MAX_TOKENS,
        "projection_dim": _HIDDEN,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
    }


def _flux_pipeline() -> Any:
    use_pil_image_processors()
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip_tokenizer = _clip_tokenizer()
    t5_tokenizer = _t5_tokenizer()
    torch.manual_seed(_SEED)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_HIDDEN,
        pooled_projection_dim=_HIDDEN,
        guidance_embeds=False,  # like FLUX.1-schnell: timestep-distilled, no guidance input
        axes_dims_rope=(4, 4, 8),
    )
    # Four blocks keep the production vae_scale_factor of 8; 16 latent channels like FLUX.1.
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 16, 16),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(**_clip_text_config(len(clip_tokenizer))))
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tokenizer),
            d_model=_HIDDEN,
            d_ff=37,
            d_kv=8,
            num_layers=1,
            num_heads=4,
            relative_attention_num_buckets=8,
        )
    )
    # FLUX.1-schnell's scheduler configuration.
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=False,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )


def _clip_scorer() -> Any:
    use_pil_image_processors()
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = _clip_tokenizer()
    torch.manual_seed(_SEED + 1)
    model = CLIPModel(
        CLIPConfig(
            text_config=_clip_text_config(len(tokenizer)),
            vision_config={
                "hidden_size": _HIDDEN,
                "intermediate_size": 37,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "image_size": 32,
                "patch_size": 8,
                "projection_dim": _HIDDEN,
            },
            projection_dim=_HIDDEN,
        )
    )
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_tiny_flux(directory: Path) -> Path:
    """Write the tiny FLUX pipeline (FluxPipeline layout) into ``directory``."""
    _flux_pipeline().save_pretrained(directory, safe_serialization=True)
    return directory


def build_tiny_clip(directory: Path) -> Path:
    """Write the tiny CLIP scorer (CLIPModel and CLIPProcessor) into ``directory``."""
    model, processor = _clip_scorer()
    model.save_pretrained(directory, safe_serialization=True)
    processor.save_pretrained(directory)
    return directory


def build_tiny_loras(directory: Path) -> Path:
    """Write the tiny FLUX's adapter library (serve_app/models/tiny_loras.py) into ``directory``."""
    from serve_app.models.tiny_loras import TINY_LORAS, write_loras

    return write_loras(_flux_pipeline().transformer, directory, TINY_LORAS)


_BUILDERS = {
    TINY_FLUX_NAME: build_tiny_flux,
    TINY_CLIP_NAME: build_tiny_clip,
    TINY_LORAS_NAME: build_tiny_loras,
}


def build_once(target: Path, build: Callable[[Path], Path]) -> Path:
    """``target``, built by ``build(folder)`` unless it exists.

    Replicas may start at once on one node: each builds into a private folder and renames it into
    place, so a reader never sees a half-written model.
    """
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(staging)
        os.rename(staging, target)
    except OSError:
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def ensure_tiny_model(name: str, cache_dir: Path) -> Path:
    """Return the folder of tiny model ``name`` in ``cache_dir``, building it on first use."""
    return build_once(cache_dir / name, _BUILDERS[name])
