"""A request's input image and mask, from data: URLs or fetched, decoded and fitted once."""

from __future__ import annotations

import asyncio

from serve_app.inputs.decoding import DecodedImage, data_url_bytes, decode_image
from serve_app.inputs.fetching import fetch_image
from serve_app.inputs.fitting import RequestInputs, fit_inputs
from serve_app.inputs.masks import MaskConvention, repainted_where_transparent
from serve_app.schemas import DEFAULT_STRENGTH, GenerateRequest
from serve_app.settings import ServiceSettings


async def read_inputs(request: GenerateRequest, settings: ServiceSettings) -> RequestInputs | None:
    """The request's inputs, fitted to its size; None for text-to-image.

    Raises InputRefused (422) or InputFetchFailed (424), naming the field.
    """
    if request.image is None:
        return None
    sources = {"image": request.image, "mask": request.mask}
    # Both at once: two slow hosts cost the slower one's time, not the sum.
    read = await asyncio.gather(
        *(read_image(source, param, settings) for param, source in sources.items() if source),
        return_exceptions=True,
    )
    for outcome in read:
        if isinstance(outcome, BaseException):
            raise outcome
    image, *mask = [outcome for outcome in read if isinstance(outcome, DecodedImage)]
    return await asyncio.to_thread(
        fit_inputs,
        image,
        mask[0] if mask else None,
        request.width,
        request.height,
        request.strength,
        settings,
    )


async def read_image(source: str, param: str, settings: ServiceSettings) -> DecodedImage:
    """One input, from a data: URL or an https:// URL, decoded off the event loop."""
    if source.startswith("data:"):
        return await asyncio.to_thread(_decode_data_url, source, param, settings)
    data, declared_type = await fetch_image(source, param, settings)
    return await asyncio.to_thread(decode_image, data, param, settings, declared_type)


def _decode_data_url(url: str, param: str, settings: ServiceSettings) -> DecodedImage:
    data, media_type = data_url_bytes(url, param, settings)
    return decode_image(data, param, settings, media_type)


def read_uploaded(
    image: bytes,
    mask: bytes | None,
    settings: ServiceSettings,
    *,
    width: int | None = None,
    height: int | None = None,
    strength: float = DEFAULT_STRENGTH,
    mask_convention: MaskConvention = "grey",
) -> RequestInputs:
    """Uploaded files (a multipart form's) as the same checked, fitted inputs; blocking.

    ``mask_convention`` says how the mask marks what to repaint (serve_app/inputs/masks.py).
    """
    decoded = decode_image(image, "image", settings)
    decoded_mask = decode_image(mask, "mask", settings) if mask is not None else None
    if decoded_mask is not None and mask_convention == "alpha":
        decoded_mask = repainted_where_transparent(decoded_mask)
    return fit_inputs(decoded, decoded_mask, width, height, strength, settings)
