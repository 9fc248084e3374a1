"""glibc malloc settings that stop numpy's large temporaries from page-faulting.

By default glibc serves blocks over a dynamic threshold (128 KiB at start)
with mmap and gives freed memory back to the kernel, so every training step
re-faults the pages of its ~1 MiB activations and gradients. Keeping such
blocks on the heap and keeping the freed heap cut the MLP step of
bench/engine.py from ~13 ms to ~9 ms here, for the engine and for plain numpy
alike (what jemalloc/tcmalloc are recommended for in other frameworks).

Applied once when shoal.kernels is imported; set SHOAL_MALLOC_TUNE=0 to keep
the C library's defaults. A no-op where libc has no mallopt (musl, macOS).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3

MMAP_THRESHOLD = 32 << 20   # blocks below 32 MiB come from the heap (glibc's maximum)
TRIM_THRESHOLD = 512 << 20  # give memory back only when 512 MiB lie free at the heap top
TOP_PAD = 16 << 20          # grow the heap 16 MiB at a time


def tune_allocator() -> bool:
    """Apply the settings above; True if the C library took all of them."""
    if os.environ.get("SHOAL_MALLOC_TUNE", "1") == "0":
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return all(mallopt(opt, value) == 1 for opt, value in (
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        (_M_TOP_PAD, TOP_PAD)))
