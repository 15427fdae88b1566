"""An input's bytes as a checked image: data: URLs, formats, byte and pixel limits.

Only PNG, JPEG and WebP are decoded. The pixel count is checked from the header, before any
pixel is decoded, and Pillow's own decompression-bomb guard is turned from a warning into a
refusal. Phone photos are turned upright by their EXIF orientation.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import struct
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from serve_app.inputs.errors import InputRefused, too_large
from serve_app.settings import ServiceSettings

MEDIA_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/webp": "WEBP"}
"""Media types the service takes, and Pillow's name of each format."""

_SUPPORTED = "PNG, JPEG or WebP"
_PIL_FORMATS = sorted(set(MEDIA_TYPES.values()))


@dataclass(frozen=True)
class DecodedImage:
    """A decoded input, upright, and the digest of the bytes it came from."""

    image: Image.Image
    digest: str
    """'sha256:' and the hex SHA-256 of the bytes as sent or fetched."""


def data_url_bytes(url: str, param: str, settings: ServiceSettings) -> tuple[bytes, str]:
    """The bytes of a base64 ``data:`` URL of a supported image, and its media type."""
    header, comma, payload = url.partition(",")
    if not comma:
        raise InputRefused(param, "the data: URL has no comma before its data")
    media_type, *parameters = header.removeprefix("data:").split(";")
    media_type = media_type.strip().lower()
    if media_type not in MEDIA_TYPES:
        raise InputRefused(
            param,
            f"unsupported {param} format {media_type or 'none'!r}: send {_SUPPORTED} "
            "(image/png, image/jpeg or image/webp)",
        )
    if "base64" not in (parameter.strip().lower() for parameter in parameters):
        raise InputRefused(param, f"the data: URL must be base64: data:{media_type};base64,...")
    # Refused before decoding: base64 takes 4 characters for every 3 bytes.
    if len(payload) * 3 // 4 > settings.max_input_image_bytes + 2:
        raise too_large(param, len(payload) * 3 // 4, settings.max_input_image_bytes)
    try:
        data = base64.b64decode(payload, validate=True)
    except binascii.Error as error:
        raise InputRefused(param, f"the data: URL's base64 is invalid: {error}") from error
    return data, media_type


def decode_image(
    data: bytes, param: str, settings: ServiceSettings, declared_type: str | None = None
) -> DecodedImage:
    """``data`` decoded as a PNG, JPEG or WebP image within the limits of ``settings``.

    ``declared_type`` (a data: URL's or a response's media type) only explains a refusal.
    """
    if len(data) > settings.max_input_image_bytes:
        raise too_large(param, len(data), settings.max_input_image_bytes)
    if not data:
        raise InputRefused(param, f"the {param} is empty")
    with _refused_unless_decodable(param, declared_type):
        image = Image.open(io.BytesIO(data), formats=_PIL_FORMATS)  # reads the header only
    width, height = image.size
    if width * height > settings.max_input_image_pixels:
        raise InputRefused(
            param,
            f"the {param} is {width}x{height} = {width * height} pixels, over this service's "
            f"limit of {settings.max_input_image_pixels}",
        )
    with _refused_unless_decodable(param, declared_type):
        image.load()
        upright = ImageOps.exif_transpose(image)
    return DecodedImage(upright, "sha256:" + hashlib.sha256(data).hexdigest())


@contextmanager
def _refused_unless_decodable(param: str, declared_type: str | None) -> Iterator[None]:
    """Pillow's failures as refusals of ``param``, its decompression-bomb warning included."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            yield
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise InputRefused(param, f"the {param} has too many pixels: {error}") from error
        except UnidentifiedImageError as error:
            said = f" (sent as {declared_type})" if declared_type else ""
            raise InputRefused(param, f"the {param} is not a {_SUPPORTED} image{said}") from error
        except (OSError, SyntaxError, ValueError, struct.error) as error:
            raise InputRefused(
                param, f"the {param} could not be decoded (truncated or corrupt): {error}"
            ) from error
