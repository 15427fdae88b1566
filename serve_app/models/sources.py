"""Where models come from and which device and dtype they run on."""

from __future__ import annotations

from pathlib import Path

import torch

from serve_app.models.tiny import ensure_tiny_model
from serve_app.settings import EMBEDDED_MODEL, ServiceSettings

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_source(source: str, tiny_name: str, cache_dir: Path) -> str:
    """What ``from_pretrained`` takes: the built tiny model's folder, or the source as given."""
    if source == EMBEDDED_MODEL:
        return str(ensure_tiny_model(tiny_name, cache_dir))
    return source


def select_device(settings: ServiceSettings) -> torch.device:
    """CUDA where a GPU is visible, else the CPU, unless the settings pin one."""
    if settings.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(settings.device)


def select_dtype(settings: ServiceSettings, device: torch.device) -> torch.dtype:
    """bfloat16 on CUDA (FLUX's native precision), float32 on the CPU, unless pinned."""
    if settings.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[settings.dtype]


def quiet_progress_bars() -> None:
    """Replicas log to files: turn off diffusers' and transformers' per-step progress bars."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
