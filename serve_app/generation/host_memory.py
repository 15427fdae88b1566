"""Gives the host back the memory a worker's finished batches freed.

glibc's malloc keeps freed pages for the process's next allocations: a worker that made one large
batch (on a CPU, the activations of 16 images at 256x256) would hold that memory for good, and its
resident size creeps up with each batch of a new shape (a soak of mixed requests grows a worker
by hundreds of MiB over its first two minutes before it levels off). Trimming once the worker is
idle returns those pages; under load they stay for the next batch, which would fault them in again.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable


def _malloc_trim() -> Callable[[int], int] | None:
    library = ctypes.util.find_library("c")
    if library is None:
        return None
    try:
        return ctypes.CDLL(library).malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim this way
        return None


_MALLOC_TRIM = _malloc_trim()


def release_free_memory() -> None:
    """Return the free pages of the process's heaps to the host, where the C library can (glibc).
    Blocking: about 0.1 s when it gives back a GiB."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
