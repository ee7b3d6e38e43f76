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


# the kernel's out-of-memory killer scores each process by its memory, plus this (-1000 to
# 1000, scaled to the memory there is): at 1000 a child is taken before the process that
# started it, whatever their sizes. The service is the largest process and holds the state (its
# jobs, sessions and connections): under a container's memory cap it was the one killed, and
# every client with it; a helper or an ffmpeg killed fails one job or session, by name.
EXPENDABLE_OOM_SCORE = 1000


def expendable(pid: int) -> None:
    """Tell the kernel to kill process `pid` (a child) first when memory runs out. Raising a
    process's score needs no privilege; elsewhere than Linux this does nothing."""
    try:
        with open(f"/proc/{pid}/oom_score_adj", "w") as f:
            f.write(str(EXPENDABLE_OOM_SCORE))
    except OSError:  # not Linux, or the process has already ended
        pass
