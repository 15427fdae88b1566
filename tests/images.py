"""Helpers to look at encoded images in tests."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image


def pixels(data: bytes) -> np.ndarray:
    """The RGB pixels of an encoded image, as integers."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def mean_abs_difference(a: bytes, b: bytes) -> float:
    """Mean absolute pixel difference of two encoded images, in 0..255 units."""
    return float(np.abs(pixels(a) - pixels(b)).mean())


def max_abs_difference(a: bytes, b: bytes) -> int:
    """The largest difference of any pixel value of two encoded images, in 0..255 units."""
    return int(np.abs(pixels(a) - pixels(b)).max())


def encode(image: Image.Image, image_format: str = "PNG", **options: object) -> bytes:
    """``image`` encoded as ``image_format``."""
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    """A base64 data: URL of ``data``."""
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def gradient(width: int, height: int, *, turned: bool = False) -> Image.Image:
    """A smooth test picture; ``turned`` gives another one of the same size."""
    x = np.linspace(0, 255, width)[None, :, None]
    y = np.linspace(0, 255, height)[:, None, None]
    rgb = np.concatenate([x + 0 * y, y + 0 * x, (x + y) / 2], axis=2)
    if turned:
        rgb = rgb[::-1, :, [2, 0, 1]]
    return Image.fromarray(rgb.astype(np.uint8), "RGB")
