"""Input images for requests: a local file as the data: URL that ``image`` and ``mask`` take."""

from __future__ import annotations

import base64
import mimetypes
from pathlib import Path

# The formats the service decodes, by their first bytes; anything else goes with the type its
# name suggests, for the service to refuse by name.
_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"))


def media_type_of(data: bytes, name: str = "") -> str:
    """The media type of an image file: from its bytes for PNG, JPEG and WebP, else its name."""
    for signature, media_type in _SIGNATURES:
        if data.startswith(signature):
            return media_type
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return mimetypes.guess_type(name)[0] or "application/octet-stream"


def image_data_url(path: Path) -> str:
    """The file at ``path`` as a base64 data: URL, for a request's ``image`` or ``mask``."""
    data = path.read_bytes()
    return f"data:{media_type_of(data, path.name)};base64,{base64.b64encode(data).decode()}"


def image_source(text: str) -> str:
    """What ``image`` or ``mask`` takes for a command-line argument: an https:// URL as it is
    (the service fetches it), else the file it names as a data: URL."""
    if text.startswith(("https://", "data:")):
        return text
    return image_data_url(Path(text))
