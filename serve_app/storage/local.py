"""The default image store: a local folder that the ingress serves under ``/images/``."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from serve_app.storage.base import StorageError

# Keys are built by the service from a request id and an index; anything else is refused, so a
# key can never climb out of the store's folder.
_KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*\.[a-z0-9]+$")


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
