"""transformers' image processors where torchvision is not installed: the PIL ones, quietly."""

from __future__ import annotations

import sys

# The base names that diffusers' FLUX modules import from transformers.
_IMPORTED_BY_DIFFUSERS = ("CLIPImageProcessor", "SiglipImageProcessor")


def use_pil_image_processors() -> None:
    """Without torchvision, bind transformers' base image-processor names to their PIL classes.

    In transformers 5, ``CLIPImageProcessor`` and ``SiglipImageProcessor`` name the torchvision
    backend; without torchvision transformers falls back to the PIL classes on first use, and
    warns in every process that loads FLUX (diffusers imports both). Binding them before diffusers
    is imported is that same fallback, made on purpose. With torchvision it does nothing.
    """
    import transformers
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        return
    pil_classes = {name: getattr(transformers, f"{name}Pil") for name in _IMPORTED_BY_DIFFUSERS}
    # Loading them can leave another module object under "transformers": bind on that one.
    for name, pil_class in pil_classes.items():
        setattr(sys.modules["transformers"], name, pil_class)
