"""Handing freed memory back to the system.

glibc keeps what a process frees in its heaps for reuse, and a thread's heap (each thread gets
its own) holds on to the pages of a large decode long after the arrays are gone: one request
with a 40 MP photo left a service ~450 MB larger for good. `give_back_memory` returns the free
pages of every heap (malloc_trim); it costs a few milliseconds, so it is called once a request
or a job is over, not inside a stage. Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def give_back_memory() -> None:
    """Return the free pages of this process's heaps to the system (glibc's malloc_trim)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
