"""Picks the image store the settings name; the one module that knows every backend."""

from __future__ import annotations

from serve_app.settings import ServiceSettings
from serve_app.storage.base import ImageStore
from serve_app.storage.local import LocalImageStore


def make_store(settings: ServiceSettings) -> ImageStore:
    """The image store the settings choose."""
    if settings.storage_backend == "s3":
        # Imported here: boto3 is loaded only by deployments that store in S3.
        from serve_app.storage.s3 import S3ImageStore

        return S3ImageStore(settings)
    return LocalImageStore(settings.storage_dir, settings.public_base_url)
