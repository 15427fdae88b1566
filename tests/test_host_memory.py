"""A worker gives the host back the memory its batches freed (glibc only)."""

from __future__ import annotations

import platform

import psutil
import pytest

from serve_app.generation.host_memory import release_free_memory


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="malloc_trim is glibc's",
)
def test_freed_heap_memory_goes_back_to_the_host() -> None:
    process = psutil.Process()
    # Blocks below malloc's mmap threshold come from the heap; the last one, kept, stops free()
    # from shrinking the heap's top, as a worker's long-lived objects do.
    blocks = [bytearray(64 * 1024) for _ in range(4096)]
    kept = blocks.pop()
    del blocks
    held = process.memory_info().rss
    release_free_memory()
    released = held - process.memory_info().rss
    assert released > 128 * 2**20, f"only {released / 2**20:.0f} MiB went back"
    assert len(kept) == 64 * 1024
