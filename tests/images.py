"""Helpers to look at encoded images in tests."""

from __future__ import annotations

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
