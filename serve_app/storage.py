"""Where finished images go, and the URLs they are fetched from."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Protocol

from serve_app.settings import ServiceSettings

# Keys are built by the service from a request id and an index; anything else is refused, so a
# key can never climb out of the store's folder.
_KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*\.[a-z0-9]+$")


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


class LocalImageStore:
    """Images in a local folder, served by the ingress under ``/images/``."""

    url_path = "/images"

    def __init__(self, root: Path, public_base_url: str | None) -> None:
        self.root = root.resolve()
        self.public_base_url = public_base_url
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        """The file of ``key``; raises ValueError for a key the service could not have made."""
        if not _KEY_PATTERN.fullmatch(key):
            raise ValueError(f"invalid image key {key!r}")
        return self.root / key

    def check(self) -> None:
        try:
            with tempfile.NamedTemporaryFile(dir=self.root):
                pass
        except OSError as error:
            raise StorageError(f"folder {self.root} is not writable: {error}") from error

    def put(self, key: str, data: bytes, content_type: str) -> None:  # noqa: ARG002
        target = self.path(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            # Write then rename: a reader never sees a half-written image.
            with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as staging:
                staging.write(data)
            os.replace(staging.name, target)
        except OSError as error:
            raise StorageError(f"could not store {key} in {self.root}: {error}") from error

    def url(self, key: str, request_base_url: str) -> str:
        base = (self.public_base_url or request_base_url).rstrip("/")
        return f"{base}{self.url_path}/{key}"


def make_store(settings: ServiceSettings) -> ImageStore:
    """The image store the settings choose."""
    if settings.storage_backend == "s3":
        from serve_app.s3_storage import S3ImageStore

        return S3ImageStore(settings)
    return LocalImageStore(settings.storage_dir, settings.public_base_url)
