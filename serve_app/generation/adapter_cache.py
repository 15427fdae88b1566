"""The adapters a worker replica keeps loaded: bounded in count and bytes, LRU out."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Generic, TypeVar

Value = TypeVar("Value")


class OverBudget(ValueError):
    """The adapters one batch needs do not fit in the cache together."""


@dataclass
class _Held(Generic[Value]):
    value: Value
    size: int


class AdapterCache(Generic[Value]):
    """Loaded adapters by digest; ``evict`` unloads one that has to make room."""

    def __init__(self, max_count: int, max_bytes: int, evict: Callable[[str, Value], None]) -> None:
        self.max_count = max_count
        self.max_bytes = max_bytes
        self._evict = evict
        self._held: OrderedDict[str, _Held[Value]] = OrderedDict()

    @property
    def digests(self) -> list[str]:
        """What it holds, least recently used first."""
        return list(self._held)

    @property
    def size(self) -> int:
        """Bytes held."""
        return sum(held.size for held in self._held.values())

    def get(self, digest: str) -> Value | None:
        """The loaded adapter, now the most recently used; None if not held."""
        held = self._held.get(digest)
        if held is None:
            return None
        self._held.move_to_end(digest)
        return held.value

    def make_room(self, size: int, keep: Collection[str]) -> list[str]:
        """Evict least recently used adapters, never one in ``keep``, until one more of ``size``
        bytes fits; the digests evicted. OverBudget if it can't fit beside ``keep``."""
        kept = sum(self._held[digest].size for digest in keep if digest in self._held)
        kept_count = sum(1 for digest in keep if digest in self._held)
        if kept + size > self.max_bytes or kept_count + 1 > self.max_count:
            raise OverBudget(
                f"{kept + size} bytes of adapters at once are more than this worker may hold "
                f"({self.max_bytes} bytes, FLUX_SERVE_LORA_CACHE_BYTES)"
            )
        evicted = []
        while self.size + size > self.max_bytes or len(self._held) + 1 > self.max_count:
            digest = next(digest for digest in self._held if digest not in keep)
            held = self._held.pop(digest)
            self._evict(digest, held.value)
            evicted.append(digest)
        return evicted

    def add(self, digest: str, value: Value, size: int) -> None:
        """Hold a loaded adapter (after make_room made space for it)."""
        self._held[digest] = _Held(value, size)

    def discard(self, digest: str) -> None:
        """Forget an adapter without evicting it (its loading failed half way)."""
        self._held.pop(digest, None)
