"""Keep freed host memory in the process instead of faulting it in again on every forward.

A CPU forward allocates and frees the same large temporaries (activations, masks, the kept
and dropped parts of a split input) call after call. glibc serves an allocation above its
*mmap threshold* with a fresh mapping and gives heap memory above its *trim threshold* back
to the kernel on free; both thresholds move with the allocation history, so whether a 4.7 MB
temporary reuses warm pages or is faulted in page by page depends on what ran before. In a
VM a fault costs ~2 µs: R-Sparse's split of a 2048 x 576 input took 0.26 ms in one process
and 4.6 ms (2,270 faults per call) in the next, same code and data.

:func:`keep_freed_memory` fixes both thresholds (allocations up to 32 MB from the heap, the
largest glibc allows; freed heap memory kept up to 1 GiB), so that temporaries reuse warm
pages: the process keeps its peak heap instead of returning it between forwards. The
``spon-exp`` runner and ``benchmarks/scale.py`` call it; a user's own ``MALLOC_MMAP_THRESHOLD_``
or ``MALLOC_TRIM_THRESHOLD_`` is left alone, as is any libc other than glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>
MMAP_THRESHOLD = 32 << 20  # glibc's upper limit for the mmap threshold on 64-bit
TRIM_THRESHOLD = 1 << 30
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def keep_freed_memory() -> bool:
    """Fix glibc's mmap and trim thresholds (see the module docstring); True if they were
    set, False where this is not glibc on Linux or the user set them."""
    if not sys.platform.startswith("linux") or any(name in os.environ for name in USER_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
