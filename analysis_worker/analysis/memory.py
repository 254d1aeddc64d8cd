"""Handing freed decoder memory back to the operating system after each pass.

FFmpeg's frame threads are created per decoder and allocate full-size frames from glibc
malloc arenas of their own. When a pass ends the frames are freed but the arenas keep the
pages, and the next pass's new threads may land on other arenas: a worker's RSS then creeps up
job after job (up to 8 arenas per core, each holding its high-water mark) although nothing
leaks -- Python's own allocations stay flat (scripts/soak_analysis.py --tracemalloc).
``malloc_trim(0)`` returns the free pages of every arena; it costs well under a millisecond
next to a pass. Elsewhere than glibc it is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        trim: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


def release_free_memory() -> bool:
    """Return freed heap pages to the OS; True when glibc's ``malloc_trim`` ran."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
