"""How finished images are encoded for storage."""

from __future__ import annotations

import io
from typing import Any

from serve_app.settings import ImageFormat

_FORMATS = {
    "png": ("PNG", "image/png"),
    "jpeg": ("JPEG", "image/jpeg"),
    "webp": ("WEBP", "image/webp"),
}


def content_type(extension: str) -> str:
    """The MIME type of an image stored with ``extension``."""
    return _FORMATS[extension][1]


def encode(image: Any, image_format: ImageFormat, quality: int) -> bytes:
    """A PIL image encoded as ``image_format`` (``quality`` applies to JPEG and WebP)."""
    pil_format, _ = _FORMATS[image_format]
    options = {} if pil_format == "PNG" else {"quality": quality}
    buffer = io.BytesIO()
    image.save(buffer, format=pil_format, **options)
    return buffer.getvalue()
