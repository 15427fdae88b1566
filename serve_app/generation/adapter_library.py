"""The deployment's LoRA adapter library: what GET /loras lists and what a request may name.

The ingress checks each requested adapter here before any work is planned (known name, a LoRA
file of the transformer, within the size and rank limits) and pins its digest; a worker reads the
file again when it loads the adapter and refuses it if the content no longer has that digest.
Files are inspected from their headers once per version (size and mtime, or ETag), so a request
costs a stat (or a HEAD) per adapter.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from serve_app.generation.adapter_files import (
    HEADER_PREFIX_BYTES,
    AdapterFile,
    NotAnAdapter,
    header_length,
    read_adapter,
)
from serve_app.generation.adapter_sources import (
    AdapterSource,
    FileVersion,
    FolderSource,
    S3Source,
    digest_of,
)
from serve_app.models.tiny import TINY_LORAS_NAME, ensure_tiny_model
from serve_app.schemas import Lora, LoraInfo, LoraListing, RefusedLora
from serve_app.settings import EMBEDDED_MODEL, ServiceSettings

logger = logging.getLogger(__name__)


class AdapterRefused(ValueError):
    """A requested adapter can't be applied: a client error naming the entry (``loras.N.name``)."""

    def __init__(self, position: int, field: str, reason: str) -> None:
        # All three in args, so that the error survives pickling between Ray processes.
        super().__init__(position, field, reason)
        self.position = position
        self.field = field
        self.reason = reason

    @property
    def param(self) -> str:
        """The request field at fault, dotted."""
        return f"loras.{self.position}.{self.field}"

    def __str__(self) -> str:
        return self.reason


@dataclass(frozen=True)
class LoadedAdapter:
    """An adapter's file as a worker loads it: what it holds, and its tensors."""

    lora: Lora
    file: AdapterFile
    tensors: dict[str, Any]


@dataclass(frozen=True)
class _Entry:
    """What one version of a library file is: a usable adapter (with its digest), or why not."""

    version: FileVersion
    adapter: AdapterFile | None = None
    digest: str | None = None
    problem: str | None = None


def _source_for(settings: ServiceSettings) -> AdapterSource | None:
    if not settings.serves_loras:
        return None
    if settings.lora_s3_url:
        return S3Source(settings.lora_s3_url, settings)
    if settings.lora_dir:
        return FolderSource(settings.lora_dir)
    assert settings.model == EMBEDDED_MODEL  # what serves_loras means without a library
    return FolderSource(ensure_tiny_model(TINY_LORAS_NAME, settings.cache_dir))


class AdapterLibrary:
    """The adapters of one deployment, checked against its limits."""

    def __init__(self, settings: ServiceSettings, source: AdapterSource | None = None) -> None:
        self.settings = settings
        self.source = source if source is not None else _source_for(settings)
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()

    def _checked(self, adapter_size: int, read: Callable[[int, int], bytes]) -> AdapterFile:
        """The adapter in a file of ``adapter_size`` bytes; ``read(start, length)`` reads it.
        NotAnAdapter when it is not one this deployment serves."""
        limit = self.settings.lora_max_bytes
        if adapter_size > limit:
            raise NotAnAdapter(
                f"it is {adapter_size} bytes, over the limit of {limit} (FLUX_SERVE_LORA_MAX_BYTES)"
            )
        length = header_length(read(0, HEADER_PREFIX_BYTES))
        adapter = read_adapter(read(HEADER_PREFIX_BYTES, length), adapter_size)
        if adapter.rank > self.settings.lora_max_rank:
            raise NotAnAdapter(
                f"its rank {adapter.rank} is above the limit of {self.settings.lora_max_rank} "
                "(FLUX_SERVE_LORA_MAX_RANK)"
            )
        return adapter

    def _entry(self, name: str) -> _Entry | None:
        """The current version of ``name``, inspected once per version; None if there is none."""
        assert self.source is not None
        source = self.source
        version = source.version(name)
        if version is None:
            return None
        with self._lock:
            known = self._entries.get(name)
        if known is not None and known.version == version:
            return known
        try:
            adapter = self._checked(
                version.size, lambda start, length: source.read_range(name, start, length)
            )
        except NotAnAdapter as problem:
            logger.warning("adapter %r in %s is refused: %s", name, source.description, problem)
            entry = _Entry(version, problem=str(problem))
        else:
            entry = _Entry(version, adapter=adapter, digest=source.digest(name))
        with self._lock:
            self._entries[name] = entry
        return entry

    def _current(self) -> dict[str, _Entry]:
        """Every file of the library now, inspected, by name."""
        names = self.source.names() if self.source is not None else []
        found = {name: entry for name in names if (entry := self._entry(name)) is not None}
        with self._lock:  # forget files that are gone
            self._entries = {name: self._entries[name] for name in found if name in self._entries}
        return found

    def adapters(self) -> dict[str, AdapterFile]:
        """The usable adapters' contents, by name, read from their headers."""
        return {
            name: entry.adapter
            for name, entry in self._current().items()
            if entry.adapter is not None
        }

    def listing(self) -> LoraListing:
        """Every file of the library: the usable adapters, and the others with the reason."""
        usable: list[LoraInfo] = []
        refused: list[RefusedLora] = []
        for name, entry in self._current().items():
            if entry.adapter is None or entry.digest is None:
                refused.append(RefusedLora(name=name, reason=entry.problem or "unreadable"))
                continue
            adapter = entry.adapter
            usable.append(
                LoraInfo(
                    name=name,
                    digest=entry.digest,
                    size_bytes=entry.version.size,
                    rank=adapter.rank,
                    alpha=adapter.alpha,
                    layers=adapter.layer_kinds,
                    modules=len(adapter.layers),
                )
            )
        max_loras = self.settings.max_loras if self.source is not None else 0
        return LoraListing(loras=usable, refused=refused, max_per_request=max_loras)

    def resolve(self, loras: Sequence[Lora]) -> tuple[Lora, ...]:
        """The requested adapters with the digests of their files now; AdapterRefused naming the
        first entry that can't be used."""
        resolved: list[Lora] = []
        for position, lora in enumerate(loras):
            if self.source is None:
                raise AdapterRefused(position, "name", "this deployment serves no LoRA adapters")
            if any(earlier.name == lora.name for earlier in resolved):
                raise AdapterRefused(
                    position, "name", f"adapter {lora.name!r} is listed twice; list it once"
                )
            entry = self._entry(lora.name)
            if entry is None:
                raise AdapterRefused(
                    position, "name", f"no adapter {lora.name!r} in the library (GET /loras)"
                )
            if entry.problem is not None:
                raise AdapterRefused(
                    position, "name", f"adapter {lora.name!r} can't be used: {entry.problem}"
                )
            if lora.digest is not None and lora.digest != entry.digest:
                raise AdapterRefused(
                    position,
                    "digest",
                    f"adapter {lora.name!r} has changed: its file's digest is now {entry.digest}",
                )
            resolved.append(lora.model_copy(update={"digest": entry.digest}))
        return tuple(resolved)

    def load(self, lora: Lora, position: int) -> LoadedAdapter:
        """Read a resolved adapter's file for loading, checking it again from the bytes read."""
        from safetensors.torch import load as load_tensors

        if self.source is None:
            raise AdapterRefused(position, "name", "this deployment serves no LoRA adapters")
        if self.source.version(lora.name) is None:
            raise AdapterRefused(position, "name", f"no adapter {lora.name!r} in the library")
        data = self.source.read(lora.name)
        if digest_of([data]) != lora.digest:
            raise AdapterRefused(
                position, "digest", f"adapter {lora.name!r} has changed since it was requested"
            )
        try:
            adapter = self._checked(len(data), lambda start, length: data[start : start + length])
            tensors = load_tensors(data)
        except (NotAnAdapter, ValueError) as problem:  # safetensors raises ValueError subclasses
            raise AdapterRefused(
                position, "name", f"adapter {lora.name!r} can't be used: {problem}"
            ) from problem
        return LoadedAdapter(lora, adapter, tensors)
