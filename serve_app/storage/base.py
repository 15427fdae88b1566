"""What every image store is: the interface, its error, and how image keys are made."""

from __future__ import annotations

from typing import Protocol


class StorageError(RuntimeError):
    """An image could not be stored, or the store can't be used."""


class ImageStore(Protocol):
    """A place that keeps images under keys and hands out URLs to them."""

    def check(self) -> None:
        """Raise StorageError, naming the place and the reason, unless the store can be written."""

    def put(self, key: str, data: bytes, content_type: str) -> None:
        """Store ``data`` under ``key``; raise StorageError if it can't."""

    def url(self, key: str, request_base_url: str) -> str:
        """The URL of ``key``; ``request_base_url`` is how the client reached the service."""


def image_key(request_id: str, attempt: str, index: int, extension: str) -> str:
    """The key of image ``index``: listed under its request id, unique even if a client reuses
    that id (``attempt`` is fresh for every request)."""
    return f"{request_id}/{index:04d}-{attempt}.{extension}"
