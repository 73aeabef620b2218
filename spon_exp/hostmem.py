"""Keep freed host memory in the process instead of faulting it in again on every forward.

A CPU forward allocates and frees the same large temporaries (activations, masks, the kept
and dropped parts of a split input) call after call. glibc serves an allocation above its
*mmap threshold* with a fresh mapping and gives heap memory above its *trim threshold* back
to the kernel on free; both thresholds move with the allocation history, so whether a large
temporary reuses warm pages or is faulted in page by page depends on what ran before. A page
fault per page of every temporary can then cost more than the arithmetic on it, and the same
code on the same data runs at a speed that differs from one process to the next.

:func:`keep_freed_memory` fixes both thresholds (allocations up to 32 MB from the heap, the
largest glibc allows; freed heap memory kept up to 1 GiB), so that temporaries reuse warm
pages: the process keeps its peak heap instead of returning it between forwards. A user's own
``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` is left alone, as is any libc other
than glibc.

The setting is process-wide, so it is applied only where it pays and asked for:

- the ``spon-exp`` CLI applies it to CPU runs only (:func:`applies_to_run`: ``model.device=cpu``
  without ``model.device_map``), never to a GPU run, and not at all with ``malloc_tuning=false``
  (``conf/config.yaml``). Once set it stays for the process: in a sweep that runs its jobs in
  one process (Hydra's basic launcher), jobs after a CPU job run with it too;
- ``benchmarks/scale.py`` applies it as the CLI does (on the CPU only), for both of its arms;
- the library (``import spon_exp``) never applies it: call :func:`keep_freed_memory` yourself
  to time a CPU forward as ``spon-exp`` runs it.
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


def applies_to_run(device: str, device_map: str | None = None, enabled: bool = True) -> bool:
    """Whether a ``spon-exp`` run tunes malloc (:func:`keep_freed_memory`): a CPU run
    (``model.device`` ``cpu`` and no ``model.device_map``) with ``malloc_tuning`` on. A GPU run
    keeps its temporaries in GPU memory, so the host allocator is left as it is."""
    return bool(enabled) and str(device) == "cpu" and not device_map
