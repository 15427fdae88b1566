"""Where the adapter library's files live: a folder or an S3 prefix of ``<name>.safetensors`` files.

Clients name adapters; only these sources turn a name into a file, and a name never holds a path
separator (schemas.LORA_NAME_PATTERN), so a request can reach nothing outside the library.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from botocore.exceptions import BotoCoreError, ClientError

from serve_app.schemas import LORA_NAME_PATTERN
from serve_app.settings import ServiceSettings
from serve_app.storage.s3 import s3_client

SUFFIX = ".safetensors"
_NAME = re.compile(LORA_NAME_PATTERN)
_CHUNK = 1 << 20


class LibraryUnavailable(RuntimeError):
    """The library's folder or bucket can't be read now."""


@dataclass(frozen=True)
class FileVersion:
    """A file's size and a token that changes whenever its content may have."""

    size: int
    token: str


class AdapterSource(Protocol):
    """The files of an adapter library."""

    description: str

    def names(self) -> list[str]:
        """The adapter names the library holds, sorted."""

    def version(self, name: str) -> FileVersion | None:
        """The current version of adapter ``name``'s file; None if there is none."""

    def read_range(self, name: str, start: int, length: int) -> bytes:
        """``length`` bytes of the file from ``start``."""

    def read(self, name: str) -> bytes:
        """The whole file."""

    def digest(self, name: str) -> str:
        """``sha256:<hex>`` of the whole file, read in chunks."""


def digest_of(chunks: Iterable[bytes]) -> str:
    """The digest the API reports for a file's content, given in chunks."""
    hasher = hashlib.sha256()
    for chunk in chunks:
        hasher.update(chunk)
    return "sha256:" + hasher.hexdigest()


@contextlib.contextmanager
def _readable(path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as error:
        raise LibraryUnavailable(f"{path}: {error}") from error


class FolderSource:
    """Adapter files in a local folder (or a volume mounted on every node)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.description = str(folder)

    def _path(self, name: str) -> Path:
        return self.folder / f"{name}{SUFFIX}"

    def names(self) -> list[str]:
        try:
            paths = sorted(self.folder.glob(f"*{SUFFIX}"))
        except OSError as error:
            raise LibraryUnavailable(f"{self.folder}: {error}") from error
        return [path.stem for path in paths if path.is_file() and _NAME.match(path.stem)]

    def version(self, name: str) -> FileVersion | None:
        path = self._path(name)
        try:
            status = path.stat()
        except FileNotFoundError:
            return None
        except OSError as error:
            raise LibraryUnavailable(f"{path}: {error}") from error
        return FileVersion(status.st_size, f"{status.st_mtime_ns}:{status.st_ino}")

    def read_range(self, name: str, start: int, length: int) -> bytes:
        path = self._path(name)
        with _readable(path), path.open("rb") as file:
            file.seek(start)
            return file.read(length)

    def read(self, name: str) -> bytes:
        path = self._path(name)
        with _readable(path):
            return path.read_bytes()

    def digest(self, name: str) -> str:
        path = self._path(name)
        with _readable(path), path.open("rb") as file:
            return digest_of(iter(lambda: file.read(_CHUNK), b""))


class S3Source:
    """Adapter files under a prefix of an S3 bucket (the image store's endpoint and region)."""

    def __init__(self, url: str, settings: ServiceSettings) -> None:
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        self.bucket = bucket
        self.prefix = prefix
        self.description = url
        self.client = s3_client(settings)

    def _key(self, name: str) -> str:
        return f"{self.prefix}{name}{SUFFIX}"

    def _call(self, what: str, **arguments: Any) -> Any:
        try:
            return getattr(self.client, what)(Bucket=self.bucket, **arguments)
        except (BotoCoreError, ClientError) as error:
            raise LibraryUnavailable(f"{self.description}: {error}") from error

    def names(self) -> list[str]:
        names = []
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix
        )
        try:
            for page in pages:
                for item in page.get("Contents", []):
                    stem = item["Key"][len(self.prefix) :].removesuffix(SUFFIX)
                    if item["Key"].endswith(SUFFIX) and _NAME.match(stem):
                        names.append(stem)
        except (BotoCoreError, ClientError) as error:
            raise LibraryUnavailable(f"{self.description}: {error}") from error
        return sorted(names)

    def version(self, name: str) -> FileVersion | None:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(name))
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}:
                return None
            raise LibraryUnavailable(f"{self.description}: {error}") from error
        except BotoCoreError as error:
            raise LibraryUnavailable(f"{self.description}: {error}") from error
        return FileVersion(int(head["ContentLength"]), str(head["ETag"]))

    def read_range(self, name: str, start: int, length: int) -> bytes:
        span = f"bytes={start}-{start + length - 1}"
        body = self._call("get_object", Key=self._key(name), Range=span)["Body"]
        return body.read()  # type: ignore[no-any-return]

    def read(self, name: str) -> bytes:
        return self._call("get_object", Key=self._key(name))["Body"].read()  # type: ignore[no-any-return]

    def digest(self, name: str) -> str:
        body = self._call("get_object", Key=self._key(name))["Body"]
        try:
            return digest_of(body.iter_chunks(_CHUNK))
        except (BotoCoreError, ClientError) as error:
            raise LibraryUnavailable(f"{self.description}: {error}") from error
