"""Masks in OpenAI's convention, turned into this service's.

This service's mask is grey: white is repainted, black kept, grey blends the two. OpenAI's Images
API takes an image whose fully transparent pixels (alpha 0) mark the part to edit and whose
opaque ones are kept; its colours mean nothing. Partly transparent pixels blend, as grey does.
"""

from __future__ import annotations

from typing import Literal

from PIL import ImageChops

from serve_app.inputs.decoding import DecodedImage
from serve_app.inputs.errors import InputRefused

MaskConvention = Literal["grey", "alpha"]
"""How a mask marks what to repaint: 'grey', this service's (white repainted, black kept);
'alpha', OpenAI's (transparent repainted, opaque kept)."""


def repainted_where_transparent(mask: DecodedImage) -> DecodedImage:
    """An OpenAI mask as this service's grey mask: its alpha channel, inverted.

    Raises InputRefused for a mask without an alpha channel, which marks nothing to edit.
    """
    if not mask.image.has_transparency_data:
        raise InputRefused(
            "mask",
            f"the mask has no alpha channel (it is {mask.image.mode}): its fully transparent "
            "pixels (alpha 0) mark where to edit; send a PNG with transparency",
        )
    alpha = mask.image.convert("RGBA").getchannel("A")
    return DecodedImage(ImageChops.invert(alpha), mask.digest)
